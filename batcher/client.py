"""One POST to ``/chat/completions`` and the mapping of its outcome to an ``Attempt``.

``ChatClient.post`` never raises for what a server or network can do wrong: every HTTP status,
connection error, timeout and malformed body becomes an ``Attempt`` that says whether it is
final, retryable, and how long the server asked us to wait.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from batcher import jsonfast
from batcher.records import Usage
from batcher.streaming import EVENT_STREAM, StreamError, StreamReader
from batcher.transport import (
    AiohttpTransport,
    ConnectFailure,
    HttpxTransport,
    Reply,
    Transport,
    TransportError,
)

if TYPE_CHECKING:
    import httpx

#: Statuses worth another attempt (the rules openai-python settled on).
RETRYABLE_STATUSES = frozenset({408, 409, 429})
_TEXT_SNIPPET = 200
#: Error codes of attempts that failed without a usable HTTP answer; all may clear by themselves.
TRANSIENT_ERROR_CODES = frozenset({"timeout", "connection_error", "invalid_response"})


def is_retryable_failure(status_code: int | None, error_code: str | None) -> bool:
    """Whether a failed request's final outcome is of a class that may clear by itself."""
    if error_code == "insufficient_quota":
        return False
    if error_code in TRANSIENT_ERROR_CODES:
        return True
    return status_code is not None and (status_code in RETRYABLE_STATUSES or status_code >= 500)


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """The outcome of one HTTP attempt."""

    ok: bool
    retryable: bool
    latency_s: float
    status_code: int | None = None
    body: Any = None
    usage: Usage | None = None
    request_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    retry_after: float | None = None
    headers: Mapping[str, str] | None = None
    ttft_s: float | None = None
    #: Why no connection was made, when known: the host does not resolve, or was refused.
    connect_failure: ConnectFailure | None = None


class ChatClient:
    """A shared HTTP client for one endpoint.

    By default requests go over aiohttp's pool directly (``transport.AiohttpTransport``); an
    ``httpx`` transport may be given instead (``httpx.ASGITransport`` for the simulator
    in-process, ``MockTransport`` in tests).
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
    ) -> None:
        all_headers = {"content-type": "application/json", "accept": "application/json"}
        all_headers.update(headers or {})
        if api_key:
            check_api_key(api_key)
            all_headers["authorization"] = f"Bearer {api_key}"
        connect_timeout_s = min(timeout_s, 30.0)
        self._transport: Transport
        if transport is None:
            self._transport = AiohttpTransport(
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
        self._url = chat_url(base_url)

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
                    return await _read_stream(reply, start, _usage_asked(body))
                raw = await reply.read()
                return classify(status, reply.headers, raw, time.perf_counter() - start)
        except TransportError as exc:
            if status is not None and exc.code == "connection_error":
                # Cut off after the status line: the server answered, so it is up (no
                # outage); the answer is broken, and retried like any unusable answer.
                return _broken_answer(status, str(exc), start)
            return _transport_failure(exc.code, str(exc), start, exc.connect_failure)
        except Exception as exc:
            # Anything else a broken answer can make a library raise. Cancellation is not an
            # Exception, so it still propagates.
            return _transport_failure("invalid_response", _describe(exc), start)

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


def chat_url(base_url: str) -> str:
    """``BASE_URL/chat/completions``, a query in the base URL kept after the path (Azure's
    ``?api-version=``, a gateway's key)."""
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))


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


def classify(status: int, headers: Mapping[str, str], raw: bytes, latency_s: float) -> Attempt:
    """Map an HTTP answer to an ``Attempt``: ok, retryable, or final error."""
    body, is_json = _parse_body(raw)
    code: str | None = None
    message: str | None = None
    if 200 <= status < 300:
        if not is_json:
            code, message = "invalid_response", f"{status} with a body that is not JSON: "
            message += _snippet(body)
        elif not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            code = "invalid_response"
            message = f"{status} with a JSON body that has no 'choices' list"
        # a 2xx that is not usable is retried: the server produced nothing to keep
        retryable = code is not None
    else:
        code, message = _error_of(status, body, is_json)
        retryable = is_retryable_failure(status, code)
    return Attempt(
        ok=code is None,
        retryable=retryable,
        latency_s=latency_s,
        status_code=status,
        body=body,
        usage=Usage.from_body(body) if code is None else None,
        request_id=headers.get("x-request-id"),
        error_code=code,
        error_message=message,
        retry_after=None if code is None else retry_after_s(headers),
        headers=headers,
    )


def retry_after_s(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, then ``retry-after``.

    ``retry-after`` may be seconds or an HTTP date. Unparseable or negative values are ignored.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    delay = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, delay)


def _parse_body(raw: bytes) -> tuple[Any, bool]:
    if not raw:
        return None, False
    try:
        return jsonfast.loads_answer(raw), True
    except (ValueError, RecursionError):
        return raw.decode("utf-8", "replace"), False


def _error_of(status: int, body: Any, is_json: bool) -> tuple[str, str]:
    """The error code and message of a non-2xx answer, from an OpenAI-shaped body if any."""
    if is_json and isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            code = err.get("code") or err.get("type") or f"http_{status}"
            message = err.get("message") or f"HTTP {status}"
            return str(code), str(message)
        if isinstance(err, str):  # vLLM and some gateways
            return f"http_{status}", err
    text = _snippet(body) if body is not None else "(empty body)"
    return f"http_{status}", f"HTTP {status}: {text}"


def _usage_asked(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


async def _read_stream(reply: Reply, start: float, usage_asked: bool) -> Attempt:
    """Read a ``stream: true`` answer and assemble its events into one answer.

    An error status, or a server that ignored ``stream`` and answered with plain JSON, is
    classified as a non-streamed answer. A stream that breaks off is a retryable
    ``invalid_response`` with the 200 it began with: the answer is incomplete (see
    ``StreamReader.problem``).
    """
    headers = reply.headers
    if not (200 <= reply.status < 300) or EVENT_STREAM not in headers.get("content-type", ""):
        raw = await reply.read()
        return classify(reply.status, headers, raw, time.perf_counter() - start)
    reader = StreamReader(start, usage_asked=usage_asked)
    try:
        async for data in reply.chunks():
            reader.feed(data)
            if reader.done:
                break
        reader.finish()
        problem = reader.problem()
    except StreamError as exc:
        problem = str(exc)
    except Exception as exc:  # the connection dropped mid-stream, in any library's words
        problem = f"the stream broke off: {_describe(exc)}"
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


def _transport_failure(
    code: str, message: str, start: float, connect_failure: ConnectFailure | None = None
) -> Attempt:
    return Attempt(
        ok=False,
        retryable=True,
        latency_s=time.perf_counter() - start,
        error_code=code,
        error_message=message,
        connect_failure=connect_failure,
    )


def _broken_answer(status: int, message: str, start: float) -> Attempt:
    return Attempt(
        ok=False,
        retryable=True,
        latency_s=time.perf_counter() - start,
        status_code=status,
        error_code="invalid_response",
        error_message=f"the answer ({status}) broke off: {message}",
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _snippet(body: Any) -> str:
    text = body if isinstance(body, str) else json.dumps(body)
    text = " ".join(text.split())
    return text if len(text) <= _TEXT_SNIPPET else text[: _TEXT_SNIPPET - 3] + "..."
