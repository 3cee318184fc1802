"""One POST to ``/chat/completions``, its answer read (whole, streamed, or capped in size).

``ChatClient.post`` never raises for what a server or network can do wrong: every HTTP status,
connection error, timeout and malformed body becomes an ``Attempt`` (``answers.py``: what each
of them means) that says whether it is final, retryable, and how long the server asked us to
wait.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, cast, get_args
from urllib.parse import urlsplit, urlunsplit

from batcher import jsonfast
from batcher.http.answers import (
    Attempt,
    broken_answer,
    classify,
    describe,
    transport_failure,
    without_secrets,
)
from batcher.http.h1 import H1Transport
from batcher.http.headers import check_headers
from batcher.http.redact import client_secrets
from batcher.http.streaming import EVENT_STREAM, StreamError, StreamReader
from batcher.http.transport import (
    AiohttpTransport,
    BodyError,
    HttpxTransport,
    Reply,
    Transport,
    TransportError,
)
from batcher.records import Usage

if TYPE_CHECKING:
    import httpx

#: The default cap on an answer's size once decoded (``limits.max_response_bytes``): far above
#: any real chat completion, far below what would exhaust memory.
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
#: The error code of an answer over that cap; not retried (the same request would most likely
#: bring the same answer, paid for again).
TOO_LARGE = "response_too_large"
#: The HTTP client requests go over: batcher's own on httptools' parser (the default,
#: ``batcher.http.h1``), aiohttp's, or pyreqwest (Rust's reqwest, the ``native`` extra;
#: ``batcher.http.native``).
HttpLibrary = Literal["httptools", "aiohttp", "pyreqwest"]


def http_library(name: str) -> HttpLibrary:
    """``name`` as an ``HttpLibrary`` (the job file has checked it: ``job_file.check_http``)."""
    if name not in get_args(HttpLibrary):
        raise ValueError(f"unknown HTTP client {name!r}")
    return cast(HttpLibrary, name)


class ChatClient:
    """A shared HTTP client for one endpoint.

    By default requests go over batcher's own keep-alive HTTP/1.1 pool (``h1.H1Transport``),
    over aiohttp's with ``http="aiohttp"`` (``transport.AiohttpTransport``) or over
    pyreqwest's with ``http="pyreqwest"`` (``native.ReqwestTransport``); an ``httpx``
    transport may be given instead (``httpx.ASGITransport`` for the simulator in-process,
    ``MockTransport`` in tests).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 600.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        http: HttpLibrary | None = None,
    ) -> None:
        if transport is not None and http is not None:
            raise ValueError("give either an httpx transport or http=..., not both")
        # refused here, the same for every client (each would fail in its own way)
        check_headers(headers or {})
        all_headers = {"content-type": "application/json", "accept": "application/json"}
        all_headers.update(headers or {})
        if api_key:
            check_api_key(api_key)
            all_headers["authorization"] = f"Bearer {api_key}"
        connect_timeout_s = min(timeout_s, 30.0)
        self._transport: Transport
        if http == "pyreqwest":
            from batcher.http.native import ReqwestTransport

            self._transport = ReqwestTransport(
                headers=all_headers,
                max_connections=max_connections,
                timeout_s=timeout_s,
                connect_timeout_s=connect_timeout_s,
            )
        elif http == "aiohttp":
            self._transport = AiohttpTransport(
                headers=all_headers,
                max_connections=max_connections,
                timeout_s=timeout_s,
                connect_timeout_s=connect_timeout_s,
            )
        elif transport is None:
            self._transport = H1Transport(
                headers=all_headers,
                max_connections=max_connections,
                timeout_s=timeout_s,
                connect_timeout_s=connect_timeout_s,
            )
        else:
            self._transport = HttpxTransport(
                transport,
                headers=all_headers,
                timeout_s=timeout_s,
                connect_timeout_s=connect_timeout_s,
            )
        self._timeout_s = timeout_s
        self._base_url = base_url
        self._secrets = client_secrets(base_url, api_key, headers)
        self._url = chat_completions_url(base_url)
        self._max_bytes = max_response_bytes

    async def post(self, body: Mapping[str, Any]) -> Attempt:
        """Send one request; return its ``Attempt`` (never raises for server or network faults)."""
        content = jsonfast.dumps(body)
        start = time.perf_counter()
        status: int | None = None
        try:
            # The transport's timeout covers the whole attempt, a body that trickles included.
            async with self._transport.post(self._url, content) as reply:
                status = reply.status
                if body.get("stream") is True:
                    attempt = await _read_stream(
                        reply, start, _usage_asked(body), max_bytes=self._max_bytes
                    )
                else:
                    try:
                        raw = await _read_capped(reply, self._max_bytes)
                    except (BodyError, _TooLarge) as exc:
                        # The server answered: a body that breaks off, lies about its encoding
                        # or is too large is an answer error, not an unreachable endpoint.
                        attempt = _body_failure(reply, exc, start)
                    else:
                        attempt = classify(status, reply.headers, raw, time.perf_counter() - start)
        except TransportError as exc:
            if status is not None and exc.code == "connection_error":
                # Cut off after the status line: the server answered, so it is up (no
                # outage); the answer is broken, and retried like any unusable answer.
                attempt = broken_answer(status, str(exc), start)
            else:
                attempt = transport_failure(exc.code, str(exc), start, exc.connect_failure)
        except Exception as exc:
            # Anything else a broken answer can make a library raise. Cancellation is not an
            # Exception, so it still propagates.
            attempt = transport_failure("invalid_response", describe(exc), start)
        if attempt.error_message is not None:
            # An HTTP library may quote the URL (its query's credentials), a server the key.
            attempt = without_secrets(attempt, self._secrets)
        return attempt

    @property
    def url(self) -> str:
        """The URL requests are POSTed to (``BASE_URL/chat/completions``)."""
        return self._url

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def __aenter__(self) -> ChatClient:
        self._transport.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def chat_completions_url(base_url: str) -> str:
    """The URL requests go to: ``/chat/completions`` appended to the base URL's path, its query
    string kept after it (``.../deployments/x?api-version=1`` becomes
    ``.../deployments/x/chat/completions?api-version=1``), any fragment dropped."""
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/") + "/chat/completions"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def check_api_key(api_key: str) -> None:
    """Refuse a key that cannot go in a header (a stray newline from a .env file, say).

    Raises ``ValueError`` without the key in its message: HTTP libraries quote a bad header
    value in their errors, which would put the key into every error record.
    """
    if not api_key.isascii() or not api_key.isprintable() or api_key != api_key.strip():
        raise ValueError(
            "the API key contains whitespace or control characters (is there a stray newline "
            "or carriage return in the variable?)"
        )


def _usage_asked(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


class _TooLarge(Exception):
    """The answer grew past ``max_bytes`` while it was read."""

    code = TOO_LARGE

    def __init__(self, max_bytes: int) -> None:
        super().__init__(
            f"the answer is larger than limits.max_response_bytes ({max_bytes:,} bytes, "
            "decoded); raise that limit if such answers are expected"
        )


async def _read_capped(reply: Reply, max_bytes: int) -> bytes:
    """The whole body, decoded, or ``_TooLarge`` as soon as it passes ``max_bytes``.

    A plain body that announces its length within the cap is read at once (the usual case,
    and the fastest); any other (compressed, chunked, or announcing more) is read piece by
    piece and counted, so a gzip bomb costs at most the cap in memory.
    """
    headers = reply.headers
    length = headers.get("content-length")
    if (
        length is not None
        and length.isdigit()
        and int(length) <= max_bytes
        and headers.get("content-encoding", "identity").lower() == "identity"
    ):
        return await reply.read()  # the transport reads no more than the announced length
    parts: list[bytes] = []
    size = 0
    async for chunk in reply.chunks():
        size += len(chunk)
        if size > max_bytes:
            raise _TooLarge(max_bytes)
        parts.append(chunk)
    return b"".join(parts)


def _body_failure(reply: Reply, exc: BodyError | _TooLarge, start: float) -> Attempt:
    """An answer whose status came but whose body could not be had."""
    return Attempt(
        ok=False,
        retryable=exc.code != TOO_LARGE,
        latency_s=time.perf_counter() - start,
        status_code=reply.status,
        request_id=reply.headers.get("x-request-id"),
        error_code=exc.code,
        error_message=f"{reply.status} with a body that could not be read: {exc}",
        headers=reply.headers,
    )


async def _read_stream(reply: Reply, start: float, usage_asked: bool, *, max_bytes: int) -> Attempt:
    """Read a ``stream: true`` answer and assemble its events into one answer.

    An error status, or a server that ignored ``stream`` and answered with plain JSON, is
    classified as a non-streamed answer. A stream that breaks off is a retryable
    ``invalid_response`` with the 200 it began with: the answer is incomplete (see
    ``StreamReader.problem``).
    """
    headers = reply.headers
    if not (200 <= reply.status < 300) or EVENT_STREAM not in headers.get("content-type", ""):
        try:
            raw = await _read_capped(reply, max_bytes)
        except (BodyError, _TooLarge) as exc:
            return _body_failure(reply, exc, start)
        return classify(reply.status, headers, raw, time.perf_counter() - start)
    reader = StreamReader(start, usage_asked=usage_asked)
    size = 0
    try:
        async for data in reply.chunks():
            size += len(data)
            if size > max_bytes:
                raise _TooLarge(max_bytes)
            reader.feed(data)
            if reader.done:
                break
        reader.finish()
        problem = reader.problem()
    except _TooLarge as exc:
        return _body_failure(reply, exc, start)
    except StreamError as exc:
        problem = str(exc)
    except Exception as exc:  # the connection dropped mid-stream, in any library's words
        problem = f"the stream broke off: {describe(exc)}"
    if problem is None:
        body = reader.body()
        outcome: dict[str, Any] = {"ok": True, "retryable": False, "body": body}
        outcome["usage"] = Usage.from_body(body)
    else:
        outcome = {"ok": False, "retryable": True, "error_code": "invalid_response"}
        outcome["error_message"] = f"{problem} (after {reader.chunks} chunks)"
    return Attempt(
        latency_s=time.perf_counter() - start,
        status_code=reply.status,
        request_id=headers.get("x-request-id"),
        headers=headers,
        ttft_s=reader.ttft_s,
        **outcome,
    )
