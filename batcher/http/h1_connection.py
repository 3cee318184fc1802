"""One keep-alive HTTP/1.1 connection of ``batcher.http.h1``'s pool, as an asyncio protocol.

It writes a request's bytes and feeds what comes back to httptools' parser; the parser's
callbacks fill in the status, the headers and the body, and wake the one coroutine waiting on
the exchange. Whatever goes wrong (the server closes, sends what is not HTTP, sends bytes past
an answer's end, or the timer fires) becomes the exchange's ``TransportError`` and aborts the
connection, which is then never reused.
"""

from __future__ import annotations

import asyncio

import httptools

from batcher.http.transport import BodyError, InvalidResponse, TransportError, TransportTimeout


class H1Connection(asyncio.Protocol):
    """One keep-alive connection: sends a request, parses its answer, tells its waiter."""

    def __init__(self, origin: tuple[str, str, int]) -> None:
        self.origin = origin
        self.status = 0
        self.headers: ResponseHeaders = ResponseHeaders()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._parts: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._has_head = False
        self._complete = False
        self._until_close = False  # a body with neither a length nor chunks: it ends at close
        self._error: TransportError | None = None  # the answer cannot be had: raised to readers
        self._closing = False  # the server closes the connection after this answer
        self._busy = False

    @property
    def reusable(self) -> bool:
        """Whether another request can go over this connection."""
        return (
            self._transport is not None
            and self._error is None
            and not self._closing
            and not self._busy
            and not self._parts  # an answer not read to its end
        )

    # -- the exchange (client side) ----------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write a whole request; the answer's state starts afresh."""
        assert self._transport is not None
        self._busy = True
        self._parts, self._raw_headers = [], []
        self.status, self.headers = 0, ResponseHeaders()
        self._has_head = self._complete = self._until_close = False
        self._transport.write(data)

    async def head(self) -> None:
        """Wait for the status line and headers."""
        while not self._has_head:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def body(self) -> bytes:
        """Wait for the whole body."""
        while True:
            if self._error is not None:
                raise self._error
            if self._complete:
                parts, self._parts = self._parts, []
                return parts[0] if len(parts) == 1 else b"".join(parts)
            await self._wait()

    async def next_chunk(self) -> bytes | None:
        """What has come of the body since the last call (waiting for some); None at its end."""
        while True:
            if self._parts:
                parts, self._parts = self._parts, []
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            await self._wait()

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def time_out(self, timeout_s: float) -> None:
        """The exchange's timer fired: its waiter gets a ``TransportTimeout``."""
        self._fail(TransportTimeout(timed_out(timeout_s)))

    def close(self) -> None:
        """Close the connection (an idle one, or one not to be reused)."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _fail(self, error: TransportError) -> None:
        if self._error is None:
            self._error = error
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        self._wake()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if not self._busy:
            self._fail(InvalidResponse("the server sent data without a request"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # a 101 to a POST: not an answer batcher can read
            self._fail(InvalidResponse(f"the server switched protocols ({self.status})"))
        except httptools.HttpParserError as exc:
            kind = BodyError if self._has_head else InvalidResponse
            self._fail(kind(f"not a valid HTTP answer: {exc}"))

    def eof_received(self) -> bool:
        if self._busy and self._has_head and self._until_close and not self._complete:
            self.on_message_complete()  # the body was "everything until the connection closes"
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._busy and not self._complete:
            reason = f": {describe(exc)}" if exc else ""
            if self._has_head:
                self._fail(BodyError(f"the connection closed before the body's end{reason}"))
            else:
                self._fail(TransportError(f"the server closed the connection{reason}"))

    # -- httptools' callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            # bytes past an answer's end: the answer they follow cannot be trusted either
            raise _AfterTheEnd

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._has_head:  # after the head, a chunked body's trailers: not kept
            self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        raw, self._raw_headers = self._raw_headers, []
        if status == 101:
            self.status = status  # switching protocols: feed_data raises HttpParserUpgrade next
            return
        if 100 <= status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        self.status = status
        self.headers = ResponseHeaders.of(raw)
        self._until_close = (
            "content-length" not in self.headers and "transfer-encoding" not in self.headers
        )
        self._has_head = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._parts.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        if not self._has_head:
            return  # the end of an interim answer
        self._complete = True
        self._busy = False
        if not self._parser.should_keep_alive() or self._until_close:
            self._closing = True
        self._wake()


class _AfterTheEnd(Exception):
    """Raised from the parser's callback (httptools wraps it in an ``HttpParserError``)."""


class ResponseHeaders(dict[str, str]):
    """Response headers by lower-case name (repeated ones joined by commas), looked up in any
    case."""

    @classmethod
    def of(cls, raw: list[tuple[bytes, bytes]]) -> ResponseHeaders:
        headers = cls()
        for name_bytes, value_bytes in raw:
            name, value = name_bytes.decode("latin-1").lower(), value_bytes.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return headers

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name.lower() if isinstance(name, str) else name)

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(name.lower(), default)


def timed_out(timeout_s: float) -> str:
    """The message of a request that ran out of time."""
    return f"no answer within {timeout_s:g} s"


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["H1Connection", "ResponseHeaders", "describe", "timed_out"]
