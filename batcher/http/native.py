"""A transport over pyreqwest: Rust's reqwest/hyper HTTP client, driven from asyncio.

The connection pool, HTTP/1.1 parsing, gzip and timeouts run in Rust (a tokio runtime on its
own thread); Python sees one awaitable per request and one per body. Measured against
aiohttp's transport in bench/transports.py (figures in bench/README.md). Chosen with
``ChatClient(..., http="pyreqwest")``; needs the ``native`` extra.

Behaves as ``AiohttpTransport`` does: no redirects followed, no cookies kept, no proxy taken
from the environment, one timeout over
the whole attempt (connecting, the status line, and the body or stream), and only the errors of
``batcher.http.transport``. pyreqwest reports a fault as a short message ("connection error")
with its causes in ``details``; the causes are what the messages here are made of, and what
tells a name that does not exist and a refused connection apart.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

from batcher.http.transport import (
    BodyError,
    ConnectFailure,
    InvalidResponse,
    Reply,
    TransportError,
    TransportTimeout,
)

if TYPE_CHECKING:
    from pyreqwest.client import Client
    from pyreqwest.response import Response

#: How getaddrinfo says a name does not exist (glibc's and musl's ``gai_strerror`` texts for
#: EAI_NONAME and EAI_NODATA), as the resolver's message ends. "Temporary failure in name
#: resolution" (EAI_AGAIN) is not among them: a resolver that did not answer may answer later.
_NO_SUCH_NAME = (
    "Name or service not known",
    "No address associated with hostname",
    "Name does not resolve",
    "nodename nor servname provided, or not known",
)
_REFUSED = f"(os error {errno.ECONNREFUSED})"
#: How long ``aclose`` leaves pyreqwest's runtime thread to finish closing (see there).
_SETTLE_S = 0.05
#: The causes that only repeat the URL (its query string included): left out of messages.
_URL_CAUSES = ("error sending request for url", "builder error for url")


def available() -> bool:
    """Whether pyreqwest is installed (the ``native`` extra)."""
    return importlib.util.find_spec("pyreqwest") is not None


class ReqwestTransport:
    """pyreqwest's ``Client``: at most ``max_connections`` requests in flight, as many
    connections kept alive, no cookies, no redirects."""

    def __init__(
        self,
        *,
        headers: Mapping[str, str],
        max_connections: int,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        if not available():
            raise ImportError(
                "the pyreqwest transport needs the pyreqwest package: pip install 'batcher[native]'"
            )
        self._headers = dict(headers)
        self._max_connections = max_connections
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._client: Client | None = None

    def open(self) -> None:
        """Make the client (its runtime starts with it), before the first request is timed."""
        if self._client is None:
            self._open()

    def _open(self) -> Client:
        from pyreqwest.client import ClientBuilder

        try:
            builder = ClientBuilder().default_headers(self._headers)
        except ValueError:
            # pyreqwest quotes the header (the key, maybe); ChatClient refuses such headers first
            raise ValueError("a header cannot be sent (not shown: it may hold a key)") from None
        self._client = (
            builder
            # max_connections bounds requests in flight, so it bounds connections in use;
            # the idle ones kept for reuse are bounded the same, as aiohttp's limit does.
            .max_connections(self._max_connections)
            .pool_max_idle_per_host(self._max_connections)
            # total: from connecting until the body (or the stream) is read to its end
            .timeout(timedelta(seconds=self._timeout_s))
            .connect_timeout(timedelta(seconds=self._connect_timeout_s))
            .follow_redirects(False)
            # reqwest would send through HTTP(S)_PROXY from the environment, the key with it;
            # aiohttp's transport ignores those, and so does this one.
            .no_proxy()
            .default_cookie_store(False)
            .referer(False)
            .build()
        )
        return self._client

    @asynccontextmanager
    async def post(self, url: str, content: bytes) -> AsyncIterator[Reply]:
        from pyreqwest import exceptions as rq

        client = self._client or self._open()
        try:
            # No read-ahead: with it, pyreqwest reads the body's first 64 KiB before it gives
            # the status, so a body that breaks off would lose the status it came with.
            request = client.post(url).body_bytes(content).streamed_read_buffer_limit(0)
        except ValueError as exc:  # a URL reqwest cannot parse: a port past 65535, a bad host
            raise TransportError(_invalid_url(exc)) from exc
        try:
            async with request.build_streamed() as response:
                yield _ReqwestReply(response)
        except TransportError:
            raise
        except TimeoutError as exc:  # pyreqwest's timeouts are TimeoutErrors
            raise TransportTimeout(_timed_out(self._timeout_s, exc)) from exc
        except rq.BuilderError as exc:  # a request reqwest will not send (a scheme not http)
            raise TransportError(_invalid_url(exc)) from exc
        except rq.DecodeError as exc:  # a status line or headers that are not HTTP
            raise InvalidResponse(describe(exc)) from exc
        except rq.RequestError as exc:  # refused, reset, closed before the answer
            raise TransportError(describe(exc), connect_failure=connect_failure(exc)) from exc

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            # pyreqwest's runtime thread finishes closing the pool after close() returns, and
            # takes the GIL to do it. Were the interpreter finalizing by then, the process
            # would abort ("Fatal Python error: PyGILState_Release"): 3 of 40 processes that
            # exited right after a run did with no pause here, none of 40 with it.
            await asyncio.sleep(_SETTLE_S)


class _ReqwestReply:
    __slots__ = ("_response",)

    def __init__(self, response: Response) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers  # a case-insensitive HeaderMap, valid after the reply

    async def read(self) -> bytes:
        from pyreqwest import exceptions as rq

        try:
            return (await self._response.bytes()).to_bytes()
        except TimeoutError:
            raise  # the whole attempt's timeout, while the body was read: the transport's
        except rq.RequestError as exc:  # cut off, or not the encoding it claims
            raise BodyError(describe(exc)) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        from pyreqwest import exceptions as rq

        reader = self._response.body_reader
        try:
            while (chunk := await reader.read_chunk()) is not None:
                yield chunk.to_bytes()  # decoded (gunzipped), as it arrives
        except TimeoutError:
            raise
        except rq.RequestError as exc:
            raise BodyError(describe(exc)) from exc


def _causes(exc: BaseException) -> list[str]:
    details = getattr(exc, "details", None)
    causes = details.get("causes") if isinstance(details, Mapping) else None
    if not isinstance(causes, list):
        return []
    return [
        str(cause["message"])
        for cause in causes
        if isinstance(cause, Mapping) and isinstance(cause.get("message"), str)
    ]


def describe(exc: BaseException) -> str:
    """``Type: message: cause: cause...``, without the cause that only repeats the URL."""
    message = getattr(exc, "message", None)  # str(exc) would be the repr of its args
    parts = [(message if isinstance(message, str) else str(exc)).strip()]
    for cause in _causes(exc):
        if cause and not cause.startswith(_URL_CAUSES) and cause not in parts:
            parts.append(cause)
    text = ": ".join(part for part in parts if part)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def connect_failure(exc: BaseException) -> ConnectFailure | None:
    """``"dns"`` for a host name that does not exist, ``"refused"`` for a port nothing listens
    at, read from the causes pyreqwest gives (it keeps no ``OSError`` to look at)."""
    for cause in _causes(exc):
        if _REFUSED in cause or cause.endswith("Connection refused"):
            return "refused"
        if cause.endswith(_NO_SUCH_NAME):
            return "dns"
    return None


def _invalid_url(exc: BaseException) -> str:
    """A URL the request cannot be built from: a ``connection_error``, as aiohttp's transport
    reports the same URL (its ``InvalidUrlClientError`` and ``NonHttpUrlClientError``)."""
    return f"invalid URL: {describe(exc)}"


def _timed_out(timeout_s: float, exc: BaseException) -> str:
    return f"no answer within {timeout_s:g} s ({describe(exc)})"


__all__ = ["ReqwestTransport", "available", "connect_failure", "describe"]
