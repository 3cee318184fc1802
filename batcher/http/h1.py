"""A lean HTTP/1.1 transport: keep-alive connections on asyncio protocols, httptools' parser.

A request is one ``write`` of prepared bytes (the request line and the fixed headers are built
once per URL) and one future resolved by the parser's callbacks: about half the CPU a request
of aiohttp's ``ClientSession``, whose request and response objects, tracing hooks and timers
are most of what a batch run spends in HTTP on a fast server (figures in bench/README.md). The
parsing is httptools' (llhttp, the parser Node.js and aiohttp use; also what serves the
simulator); what is here is the pool and the exchange.

It keeps ``AiohttpTransport``'s promises: at most ``max_connections`` connections, idle ones
kept for reuse, no redirects followed, no cookies kept, no proxy taken from the environment,
``gzip``/``deflate`` answers decoded as they arrive, one timeout over the whole attempt
(waiting for a connection, connecting, the status line and the body or stream), credentials in
the URL sent as Basic auth, and only the errors of ``batcher.http.transport``. A connection is
reused only after an answer read to its end that the server lets stay open; any other
(cancelled, cut off, timed out, not read to the end) is closed.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import quote, unquote, urlsplit

import aiohappyeyeballs
import idna

from batcher import __version__
from batcher.http.h1_connection import H1Connection, describe, timed_out
from batcher.http.transport import BodyError, TransportError, TransportTimeout, connect_failure

#: The largest piece a compressed body is decoded into at a time: a gzip bomb grows by at most
#: this much before the client's size cap sees it.
_DECODED_PIECE = 256 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: What stays as it is in a request's path and query (RFC 3986's sub-delims, ":" and "@", and
#: "%" so that escapes already there are not escaped twice).
_PATH_SAFE = "/%:@!$&'()*+,;=~"
_QUERY_SAFE = _PATH_SAFE + "?"
#: RFC 8305's recommended wait before trying the next address of a host.
_HAPPY_EYEBALLS_S = 0.25


@dataclass(frozen=True)
class _Target:
    """Where a URL's requests go and the bytes every request to it starts with."""

    origin: tuple[str, str, int]  # scheme, host, port
    head: bytes  # request line and headers, up to "content-length: "


class H1Transport:
    """HTTP/1.1 over at most ``max_connections`` keep-alive connections (all origins)."""

    def __init__(
        self,
        *,
        headers: Mapping[str, str],
        max_connections: int,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        try:
            self._headers = {
                name.lower(): value.encode("latin-1") for name, value in headers.items()
            }
        except UnicodeEncodeError:
            raise ValueError("a header cannot be sent (not shown: it may hold a key)") from None
        self._max_connections = max_connections
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._targets: dict[str, _Target] = {}
        self._idle: dict[tuple[str, str, int], deque[H1Connection]] = {}
        self._open_count = 0  # connections made and not yet closed, idle ones included
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def open(self) -> None:
        pass  # nothing to make ahead: connections are made on first use

    def post(self, url: str, content: bytes) -> _Exchange:
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = self._target(url)
        return _Exchange(self, target, content)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()

    # -- the pool ----------------------------------------------------------------------------

    async def _connection(self, target: _Target, deadline: float) -> H1Connection:
        """An idle connection to ``target``'s origin, or a new one once the pool has room."""
        while True:
            idle = self._idle.get(target.origin)
            while idle:
                connection = idle.pop()
                if connection.reusable:
                    return connection
                self._forget(connection)
            if self._open_count < self._max_connections or self._close_an_idle_one():
                break
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, but leaving (timed out, cancelled): pass it on
                raise
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)
        self._open_count += 1
        try:
            return await self._connect(target, deadline)
        except BaseException:
            self._open_count -= 1
            self._wake_one()
            raise

    async def _connect(self, target: _Target, deadline: float) -> H1Connection:
        scheme, host, port = target.origin
        loop = asyncio.get_running_loop()
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        connect_by = min(deadline, loop.time() + self._connect_timeout_s)
        try:
            async with asyncio.timeout_at(connect_by):
                addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                # aiohappyeyeballs (aiohttp's) keeps the errno when every address refuses, as
                # localhost's ::1 and 127.0.0.1 do while a server starts; asyncio's own
                # create_connection drops it, and with it the "nothing listens yet" wait.
                sock = await aiohappyeyeballs.start_connection(
                    addresses, happy_eyeballs_delay=_HAPPY_EYEBALLS_S
                )
                _, connection = await loop.create_connection(
                    lambda: H1Connection(target.origin),
                    sock=sock,
                    ssl=context,
                    server_hostname=host if context else None,
                )
        except TimeoutError as exc:
            waited = min(self._timeout_s, self._connect_timeout_s)
            message = f"could not connect to {host}:{port} within {waited:g} s"
            raise TransportTimeout(message) from exc
        return connection

    def _release(self, connection: H1Connection) -> None:
        """Take back ``connection`` after an exchange: kept if it can carry another."""
        if connection.reusable and not self._closed:
            self._idle.setdefault(connection.origin, deque()).append(connection)
        else:
            connection.close()
            self._open_count -= 1
        self._wake_one()

    def _forget(self, connection: H1Connection) -> None:
        connection.close()
        self._open_count -= 1

    def _close_an_idle_one(self) -> bool:
        """Make room for a connection to another origin by closing an idle one."""
        for idle in self._idle.values():
            if idle:
                self._forget(idle.popleft())
                return True
        return False

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _target(self, url: str) -> _Target:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            port = parts.port or _DEFAULT_PORTS.get(scheme)
        except ValueError as exc:  # a port that is not a number, or past 65535
            raise TransportError(f"invalid URL: {exc}") from None
        if scheme not in _DEFAULT_PORTS or not parts.hostname or port is None:
            raise TransportError("invalid URL: not an http:// or https:// URL with a host")
        host = _ascii_host(parts.hostname)
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address
        # spaces and non-ASCII percent-encoded, escapes already there kept (as yarl does)
        path = quote(parts.path or "/", safe=_PATH_SAFE)
        if parts.query:
            path += "?" + quote(parts.query, safe=_QUERY_SAFE)
        headers = {"host": (f"{shown}:{parts.port}" if parts.port else shown).encode()}
        headers.update(self._headers)
        headers.setdefault("accept-encoding", b"gzip, deflate")
        headers.setdefault("user-agent", f"batcher/{__version__}".encode())
        if parts.username is not None and "authorization" not in headers:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            headers["authorization"] = b"Basic " + base64.b64encode(pair.encode())
        lines = [f"POST {path} HTTP/1.1".encode()]
        for name, value in headers.items():
            lines.append(name.encode("latin-1") + b": " + value)
        lines.append(b"content-length: ")
        return _Target((scheme, host, port), b"\r\n".join(lines))


def _ascii_host(host: str) -> str:
    """``host`` as sent: an internationalised name in its IDNA 2008 form (UTS 46, as browsers
    and yarl map it: ``straße`` stays ``xn--strae-oqa``, not the ``strasse`` of Python's own
    codec, another domain)."""
    if host.isascii():
        return host
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise TransportError(f"invalid URL: the host name cannot be encoded ({exc})") from None


class _Exchange:
    """``async with transport.post(url, content) as reply``: one request and its answer."""

    __slots__ = ("_connection", "_content", "_target", "_timer", "_transport")

    def __init__(self, transport: H1Transport, target: _Target, content: bytes) -> None:
        self._transport = transport
        self._target = target
        self._content = content
        self._connection: H1Connection | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> _Reply:
        transport = self._transport
        loop = asyncio.get_running_loop()
        deadline = loop.time() + transport._timeout_s
        try:
            connection = await transport._connection(self._target, deadline)
        except TimeoutError as exc:  # no room in the pool in time
            raise TransportTimeout(timed_out(transport._timeout_s)) from exc
        except OSError as exc:  # refused, no such host, TLS refused (SSLError is an OSError)
            raise TransportError(describe(exc), connect_failure=connect_failure(exc)) from exc
        self._connection = connection
        self._timer = loop.call_at(deadline, connection.time_out, transport._timeout_s)
        content = self._content
        try:
            connection.send(b"%b%d\r\n\r\n%b" % (self._target.head, len(content), content))
            await connection.head()
        except BaseException:
            await self.__aexit__(None, None, None)  # not called when __aenter__ raises
            raise
        return _Reply(connection)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
        connection = self._connection
        if connection is not None:
            self._connection = None
            self._transport._release(connection)


class _Reply:
    """The answer on a connection; its body is read through ``read`` or ``chunks``."""

    __slots__ = ("_connection", "_headers", "_status")

    def __init__(self, connection: H1Connection) -> None:
        self._connection = connection
        # kept here: they stay the answer's once the connection carries the next request
        self._status = connection.status
        self._headers = connection.headers

    @property
    def status(self) -> int:
        return self._status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    async def read(self) -> bytes:
        if _Decoder.of(self._headers.get("content-encoding")) is None:
            return await self._connection.body()
        return b"".join([piece async for piece in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        connection = self._connection
        decoder = _Decoder.of(self._headers.get("content-encoding"))
        while (chunk := await connection.next_chunk()) is not None:
            if decoder is None:
                yield chunk
                continue
            for piece in decoder.feed(chunk):
                yield piece
        if decoder is not None and (rest := decoder.finish()):
            yield rest


class _Decoder:
    """A compressed body (``gzip`` or ``deflate``, the ones asked for) decoded as it comes,
    in pieces of at most ``_DECODED_PIECE`` bytes."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, by its header
        self._fed = False

    @classmethod
    def of(cls, encoding: str | None) -> _Decoder | None:
        """The decoder for a ``Content-Encoding`` (None for none); ``BodyError`` for one not
        asked for."""
        name = (encoding or "").strip().lower()
        if name in ("", "identity"):
            return None
        if name in ("gzip", "x-gzip", "deflate"):
            return cls(name)
        raise BodyError(f"the body's Content-Encoding {name!r} was not asked for")

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        try:
            if not self._fed and self._name == "deflate":
                chunk = self._sniff_raw_deflate(chunk)
            self._fed = True
            piece = self._zlib.decompress(chunk, _DECODED_PIECE)
            while piece:
                yield piece
                piece = self._zlib.decompress(self._zlib.unconsumed_tail, _DECODED_PIECE)
        except zlib.error as exc:
            raise BodyError(f"the body is not the {self._name} it claims: {exc}") from exc

    def finish(self) -> bytes:
        """What is left once the body has ended; ``BodyError`` if it ended early."""
        if not self._fed:
            return b""  # an empty body (a 204, an empty 429) needs no decoding
        try:
            rest = self._zlib.flush()
        except zlib.error as exc:
            raise BodyError(f"the body is not the {self._name} it claims: {exc}") from exc
        if not self._zlib.eof:
            raise BodyError(f"the {self._name} body ends before its end of stream")
        return rest

    def _sniff_raw_deflate(self, chunk: bytes) -> bytes:
        """``deflate`` as sent without its zlib header (as some servers do, and aiohttp
        accepts): decoded raw instead."""
        try:
            zlib.decompressobj(zlib.MAX_WBITS | 32).decompress(chunk[:2])
        except zlib.error:
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
        return chunk


__all__ = ["H1Transport"]
