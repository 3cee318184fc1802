"""Serving the simulator over a socket."""

from __future__ import annotations

import asyncio
import socket

import pytest

from batcher.sim.serve import tcp_listener


def test_accepted_connections_get_nagle_turned_off_by_asyncio() -> None:
    """asyncio sets TCP_NODELAY only on sockets whose protocol is IPPROTO_TCP; a listener from
    ``socket.create_server`` (protocol 0) left Nagle on, and every answer after the first on a
    kept-alive connection waited ~40 ms for the client's delayed ACK."""

    async def main() -> int:
        listener = tcp_listener("127.0.0.1", 0)
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
            nodelay = await asyncio.wait_for(accepted, 10)
            writer.close()
        return nodelay

    assert asyncio.run(main()) != 0


def test_a_port_in_use_raises_oserror() -> None:
    with tcp_listener("127.0.0.1", 0) as first:
        port = first.getsockname()[1]
        try:
            tcp_listener("127.0.0.1", port).close()
        except OSError:
            return
    raise AssertionError("a second listener on the same port was allowed")


def _ipv6_loopback() -> bool:
    """Whether this machine can listen on IPv6 at all (a container may have it off)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 on this machine")
def test_an_ipv6_address_listens_on_ipv6_only() -> None:
    # "::" (not "::1": Linux makes a socket bound to a specific IPv6 address IPv6-only anyway)
    with tcp_listener("::", 0) as listener:
        assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        port = listener.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            # a dual-stack listener would have accepted this IPv4 connection
            assert client.connect_ex(("127.0.0.1", port)) != 0


def test_a_port_past_65535_is_refused_not_wrapped() -> None:
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        tcp_listener("127.0.0.1", 65536)  # getaddrinfo alone would bind port 0
