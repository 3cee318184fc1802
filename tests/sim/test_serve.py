"""Serving the simulator over a socket."""

from __future__ import annotations

import asyncio
import socket

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
