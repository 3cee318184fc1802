"""The HTTP layer under ``ChatClient``: POST bytes, get a status, headers and a body back.

The transports share one small interface, so the client's logic (status mapping, streaming,
retries) is the same over each: ``h1.H1Transport`` (the default: batcher's own keep-alive
HTTP/1.1 client), ``native.ReqwestTransport`` (pyreqwest, opt-in), and these two:

* ``AiohttpTransport`` (``http = "aiohttp"``): aiohttp's connection pool, used directly. At
  hundreds of requests in flight httpx's own pool slows to a crawl (encode/httpx#3215), and
  httpx's layer over an aiohttp transport still costs about as much CPU as aiohttp itself
  (figures in bench/README.md), so no hot path has httpx in it.
* ``HttpxTransport``: any ``httpx.AsyncBaseTransport`` (``ASGITransport`` to run against the
  simulator in-process, ``MockTransport`` in tests, or a custom one a library user passes).

Transports raise only the errors below; everything else a server can do is an answer.
None follows redirects: a 3xx is an answer (``answers.classify`` makes it an error record),
since following one would send the key and the endpoint's headers wherever it points.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Literal, Protocol

import anyio

if TYPE_CHECKING:
    import aiohttp
    import httpx


#: Why a connection could not be made, where that tells what to do: the host name does not
#: exist (``"dns"``: waiting will not help), or nothing listens at the port (``"refused"``:
#: a server may be starting).
ConnectFailure = Literal["dns", "refused"]
#: getaddrinfo's answers that the name does not exist (not "try again": a resolver that did
#: not answer, as when the network is down, may answer later).
_NO_SUCH_NAME = frozenset(
    getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)
)


class TransportError(Exception):
    """A request that got no usable HTTP answer. ``code`` is the error code it is recorded as;
    ``connect_failure`` says why no connection was made, when that is known."""

    code = "connection_error"

    def __init__(self, message: str, *, connect_failure: ConnectFailure | None = None) -> None:
        super().__init__(message)
        self.connect_failure = connect_failure


class TransportTimeout(TransportError):
    """The transport's own timeout fired (connecting or reading)."""

    code = "timeout"


class InvalidResponse(TransportError):
    """The server answered something that is not valid HTTP (or a body that cannot be decoded)."""

    code = "invalid_response"


class BodyError(InvalidResponse):
    """The status and headers came, but the body broke off or could not be decoded (a
    ``Content-Encoding`` it does not have, a ``Content-Length`` it does not fill). Raised by a
    ``Reply``'s ``read`` and ``chunks``; a timeout while reading stays a ``TimeoutError``."""


class Reply(Protocol):
    """An HTTP answer whose body has not been read yet."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Case-insensitive."""
        ...

    async def read(self) -> bytes:
        """The whole body."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        ...


class Transport(Protocol):
    """POSTs a body; the reply is valid inside the ``async with``."""

    def post(self, url: str, content: bytes) -> AbstractAsyncContextManager[Reply]: ...

    def open(self) -> None:
        """Get ready to send (inside the running loop), so the first request goes at once."""
        ...

    async def aclose(self) -> None: ...


class AiohttpTransport:
    """aiohttp's ``ClientSession`` with a pool of ``max_connections`` (no cookies kept)."""

    def __init__(
        self,
        *,
        headers: Mapping[str, str],
        max_connections: int,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        self._headers = dict(headers)
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        """Import aiohttp (0.1 s) and make the session, before the first request is timed."""
        if self._session is None:
            self._open()

    def _open(self) -> aiohttp.ClientSession:
        # Created in the running loop (aiohttp wants that): on entry, or on first use.
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            # total: the whole attempt, reading the body (or the stream) included
            timeout=aiohttp.ClientTimeout(
                total=self._timeout_s, sock_connect=self._connect_timeout_s
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )
        return self._session

    @asynccontextmanager
    async def post(self, url: str, content: bytes) -> AsyncIterator[Reply]:
        import aiohttp

        session = self._session or self._open()
        try:
            async with session.post(url, data=content, allow_redirects=False) as response:
                yield _AiohttpReply(response)
        except TransportError:
            raise
        except TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
            raise TransportTimeout(_timed_out(self._timeout_s, exc)) from exc
        except aiohttp.ClientResponseError as exc:  # a malformed status line or headers
            raise InvalidResponse(_describe(exc)) from exc
        except (aiohttp.ClientError, OSError) as exc:  # refused, reset, cut off mid-body
            raise TransportError(_describe(exc), connect_failure=connect_failure(exc)) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class _AiohttpReply:
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    async def read(self) -> bytes:
        import aiohttp

        try:
            return await self._response.read()
        except TimeoutError:
            raise  # a timeout (an OSError too) is the transport's: the body trickled too long
        except (aiohttp.ClientError, OSError) as exc:
            raise BodyError(_describe(exc)) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        import aiohttp

        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TimeoutError:
            raise
        except (aiohttp.ClientError, OSError) as exc:
            raise BodyError(_describe(exc)) from exc


class HttpxTransport:
    """An ``httpx.AsyncClient`` over the given httpx transport."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        headers: Mapping[str, str],
        timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        import httpx

        self._timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            headers=dict(headers),
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            transport=transport,
            follow_redirects=False,
        )

    def open(self) -> None:
        pass  # the client is made in __init__

    @asynccontextmanager
    async def post(self, url: str, content: bytes) -> AsyncIterator[Reply]:
        import httpx

        try:
            # fail_after covers what httpx's timeouts do not: a body that trickles forever.
            with anyio.fail_after(self._timeout_s):
                async with self._client.stream("POST", url, content=content) as response:
                    yield _HttpxReply(response)
        except TransportError:
            raise
        except TimeoutError as exc:
            raise TransportTimeout(_timed_out(self._timeout_s, exc)) from exc
        except httpx.TimeoutException as exc:
            # httpx-aiohttp maps every aiohttp connection error (refused, server disconnected)
            # to ConnectTimeout; only a real timeout underneath is a timeout.
            cause = exc.__cause__
            if cause is None or isinstance(cause, TimeoutError):
                raise TransportTimeout(_describe(exc)) from exc
            raise TransportError(_describe(exc), connect_failure=connect_failure(exc)) from exc
        except httpx.DecodingError as exc:  # e.g. a body that is not the gzip it claims to be
            raise InvalidResponse(_describe(exc)) from exc
        except (httpx.TransportError, OSError) as exc:
            raise TransportError(_describe(exc), connect_failure=connect_failure(exc)) from exc

    async def aclose(self) -> None:
        await self._client.aclose()


class _HttpxReply:
    __slots__ = ("_response",)

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    async def read(self) -> bytes:
        import httpx

        try:
            return await self._response.aread()
        except (httpx.DecodingError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise BodyError(_describe(exc)) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        import httpx

        try:
            async for chunk in self._response.aiter_bytes():
                yield chunk
        except (httpx.DecodingError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise BodyError(_describe(exc)) from exc


def connect_failure(exc: BaseException) -> ConnectFailure | None:
    """Whether ``exc`` (or what it was raised from) is a host name that does not exist or a
    refused connection. Libraries wrap these differently (aiohttp's ``ClientConnectorError``
    keeps the ``OSError`` as ``os_error``, httpx's ``ConnectError`` chains it), so the chain
    is walked."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return "dns" if current.errno in _NO_SUCH_NAME else None
        if isinstance(current, ConnectionRefusedError):
            return "refused"
        if isinstance(current, OSError) and current.errno == errno.ECONNREFUSED:
            return "refused"  # every address of a name refused (aiohappyeyeballs' OSError)
        inner = getattr(current, "os_error", None)  # aiohttp's ClientConnectorError
        if isinstance(inner, BaseException) and inner is not current:
            current = inner
            continue
        current = current.__cause__ or current.__context__
    return None


def _timed_out(timeout_s: float, exc: BaseException) -> str:
    detail = str(exc).strip()
    return f"no answer within {timeout_s:g} s" + (f" ({detail})" if detail else "")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = [
    "AiohttpTransport",
    "BodyError",
    "ConnectFailure",
    "HttpxTransport",
    "InvalidResponse",
    "Reply",
    "Transport",
    "TransportError",
    "TransportTimeout",
    "connect_failure",
]
