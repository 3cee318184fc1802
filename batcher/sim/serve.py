"""Serving the simulator over a socket: ``serve`` (``batcher sim``, blocking) and ``running_sim``
(a background thread on a free loopback port, for tests and ``base_url = "sim"``).

    with running_sim(SimConfig()) as handle: handle.base_url      # over a loopback socket
    serve(SimConfig(), port=8000)                                 # `batcher sim`
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from batcher.sim.app import Simulator
from batcher.sim.config import SimConfig


class _QuietHangUps(logging.Filter):
    """Drops uvicorn's complaint about the responses the simulator breaks off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("ASGI callable returned without completing")


logging.getLogger("uvicorn.error").addFilter(_QuietHangUps())


def tcp_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket for uvicorn, made with ``IPPROTO_TCP`` as its protocol.

    ``socket.create_server`` makes sockets whose protocol is 0, and asyncio turns Nagle's
    algorithm off only on accepted sockets whose protocol is ``IPPROTO_TCP``: on such a socket
    a response sent as a head and a body waits for the client's delayed ACK of the head,
    adding ~40 ms to every answer on a kept-alive connection after the first.

    An IPv6 address listens on IPv6 only (``IPV6_V6ONLY``), as ``socket.create_server`` does
    by default: ``--host ::`` takes what it names and no IPv4 port with it, on every system
    alike (Linux would otherwise follow ``net.ipv6.bindv6only``, BSD and Windows are IPv6-only
    by default). A local simulator has no need for both; ``--host 0.0.0.0`` serves IPv4.
    """
    if not 0 <= port <= 65535:  # getaddrinfo would take it modulo 65536
        raise ValueError(f"port must be 0..65535, got {port}")
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address[:2])
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True, kw_only=True)
class SimHandle:
    """A simulator running in a background thread, as yielded by ``running_sim``."""

    base_url: str
    port: int
    simulator: Simulator


class _ThreadServer(uvicorn.Server):
    """A uvicorn server that tells another thread when its startup is over, however it ended."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.ready.set()


def _uvicorn_config(sim: Simulator, log_level: str, **extra: Any) -> uvicorn.Config:
    # ws="none": the simulator speaks no WebSocket, and importing a websockets backend only
    # risks deprecation warnings. The graceful-shutdown bound keeps a stuck client from
    # holding a shutdown (and a test) hostage.
    return uvicorn.Config(
        sim,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        ws="none",
        timeout_graceful_shutdown=5,
        **extra,
    )


def listening_url(host: str, sock: socket.socket) -> str:
    """The base URL a listener serves at: ``host`` (an IPv6 address in brackets) with the
    port it is bound to (the one the system chose for port 0)."""
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


def serve(
    config: SimConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "warning",
    on_listening: Callable[[str], object] | None = None,
) -> None:
    """Serve the simulator with uvicorn until Ctrl+C (or SIGTERM); blocks.

    The socket is bound here, before uvicorn starts, so a port in use raises ``OSError``
    instead of uvicorn's ``sys.exit``; ``on_listening`` then gets its base URL.
    """
    sock = tcp_listener(host, port)
    server = uvicorn.Server(_uvicorn_config(Simulator(config), log_level))
    try:
        if on_listening is not None:
            on_listening(listening_url(host, sock))
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn has already shut down gracefully; it re-raises the captured SIGINT so that
        # the default handler runs, which for us only means "stop" — not a traceback.
        pass
    finally:
        sock.close()


@contextmanager
def running_sim(
    config: SimConfig | None = None, *, startup_timeout: float = 10.0
) -> Iterator[SimHandle]:
    """Run a simulator on a free loopback port in a daemon thread for the ``with`` block.

    The thread has its own event loop, so this works from sync code and from inside another
    event loop alike. uvicorn only installs signal handlers from the main thread, so Ctrl+C
    still reaches the caller. Logging is left as the caller configured it.
    """
    sim = Simulator(config)
    sock = tcp_listener("127.0.0.1", 0)
    port: int = sock.getsockname()[1]
    server = _ThreadServer(_uvicorn_config(sim, "warning", log_config=None))

    def run() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            server.ready.set()  # also when startup failed before reaching our hook

    thread = threading.Thread(target=run, name=f"batcher-sim-{port}", daemon=True)
    thread.start()
    try:
        if not server.ready.wait(startup_timeout) or not server.started:
            raise RuntimeError(f"the simulator did not start on 127.0.0.1:{port}")
        yield SimHandle(base_url=f"http://127.0.0.1:{port}/v1", port=port, simulator=sim)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
