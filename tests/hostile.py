"""A configurable hostile HTTP server on 127.0.0.1, over a raw socket.

A raw socket, not an ASGI app, because the point is to answer what no well-behaved server
framework would let one send: a ``Content-Length`` the body does not fill, a ``Content-Encoding``
the body does not have, a status line that is not HTTP, a body that trickles or breaks off.

``HostileServer(behaviour)`` runs in daemon threads for a ``with`` block; ``behaviour`` gets
each request (``Seen``) and the connection, and writes whatever it likes. Every connection is
closed after one answer, so a lie never leaks into the next request. The helpers below build
the usual behaviours.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

#: An answer batcher keeps: one choice with its message, and usage.
GOOD_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-hostile",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


@dataclass(frozen=True)
class Seen:
    """A request the server received."""

    method: str
    target: str  # path and query, as sent
    headers: dict[str, str]  # lower-case names
    body: bytes


Behaviour = Callable[[Seen, socket.socket], None]


@dataclass
class HostileServer:
    """Serves ``behaviour`` on a free loopback port; ``seen`` lists every request received."""

    behaviour: Behaviour
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    @contextlib.contextmanager
    def running(self) -> Iterator[HostileServer]:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=5)
            listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                request = _read_request(conn)
                if request is None:
                    return
                with self._lock:
                    self.seen.append(request)
                self.behaviour(request, conn)
            except OSError:
                pass  # the client hung up: what a hostile server does next does not matter


def _read_request(conn: socket.socket) -> Seen | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return Seen(method, target, headers, body)


def head(status: int, headers: dict[str, str], *, reason: str = "X") -> bytes:
    """A status line and headers (``Connection: close`` added), as bytes."""
    lines = [f"HTTP/1.1 {status} {reason}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def answer(
    status: int = 200,
    body: bytes | dict[str, Any] | list[Any] = GOOD_ANSWER,
    *,
    headers: dict[str, str] | None = None,
    content_length: int | None = None,
) -> Behaviour:
    """Answer with ``body`` (JSON if not bytes); ``content_length`` may lie."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json"}
    all_headers["Content-Length"] = str(len(raw) if content_length is None else content_length)
    all_headers.update(headers or {})

    def behave(seen: Seen, conn: socket.socket) -> None:
        conn.sendall(head(status, all_headers) + raw)

    return behave


def raw_bytes(data: bytes) -> Behaviour:
    """Send exactly ``data`` (a status line that is not HTTP, say) and close."""

    def behave(seen: Seen, conn: socket.socket) -> None:
        conn.sendall(data)

    return behave


def redirect(status: int, location: str) -> Behaviour:
    """A redirect to ``location`` with a small body, as real servers send."""
    return answer(status, b"moved", headers={"Location": location, "Content-Type": "text/plain"})


def gzip_bomb(inflated: int) -> Behaviour:
    """A 200 whose gzip body inflates to ``inflated`` bytes of spaces (made piecewise, so the
    test never holds the inflated body itself)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    piece = b" " * (1 << 20)
    parts = [packer.compress(b"{")]
    for _ in range(inflated // len(piece)):
        parts.append(packer.compress(piece))
    parts.append(packer.flush())
    return answer(200, b"".join(parts), headers={"Content-Encoding": "gzip"})


def endless_stream(piece: bytes) -> Behaviour:
    """A ``text/event-stream`` 200 that sends ``piece`` until the client hangs up."""

    def behave(seen: Seen, conn: socket.socket) -> None:
        conn.sendall(head(200, {"Content-Type": "text/event-stream"}))
        while True:
            conn.sendall(piece)

    return behave


def trickle(body: bytes, *, every_s: float) -> Behaviour:
    """A 200 that announces ``body`` and sends it one byte every ``every_s`` seconds."""

    def behave(seen: Seen, conn: socket.socket) -> None:
        conn.sendall(
            head(200, {"Content-Type": "application/json", "Content-Length": str(len(body))})
        )
        for i in range(len(body)):
            time.sleep(every_s)
            conn.sendall(body[i : i + 1])

    return behave


def truncated(body: bytes, *, sent: int) -> Behaviour:
    """A 200 that announces ``body`` whole, sends ``sent`` bytes of it, and hangs up."""

    def behave(seen: Seen, conn: socket.socket) -> None:
        conn.sendall(
            head(200, {"Content-Type": "application/json", "Content-Length": str(len(body))})
        )
        conn.sendall(body[:sent])

    return behave


def in_turn(*behaviours: Behaviour) -> Behaviour:
    """The n-th request gets the n-th behaviour (the last one from then on)."""
    count = iter(range(1 << 30))
    lock = threading.Lock()

    def behave(seen: Seen, conn: socket.socket) -> None:
        with lock:
            n = next(count)
        behaviours[min(n, len(behaviours) - 1)](seen, conn)

    return behave
