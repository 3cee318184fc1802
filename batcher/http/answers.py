"""What an HTTP answer or fault means: an ``Attempt`` (ok, retryable or final, the wait the
server asked for), made from a status, headers and body (``classify``) or from a network fault
(``transport_failure``, ``broken_answer``). No I/O here: the online client
(``batcher.http.client``) and the Batch API's result lines are judged by the same rules.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batcher import jsonfast
from batcher.http.redact import redact_url, scrub_json, url_origin
from batcher.http.transport import ConnectFailure
from batcher.records import Usage

#: Statuses worth another attempt (the rules openai-python settled on).
RETRYABLE_STATUSES = frozenset({408, 409, 429})
_TEXT_SNIPPET = 200
#: Error codes of attempts that failed without a usable HTTP answer; all may clear by themselves.
TRANSIENT_ERROR_CODES = frozenset({"timeout", "connection_error", "invalid_response"})
#: The error code of a 3xx: redirects are never followed (see ``classify``).
REDIRECT = "redirect"


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


def classify(status: int, headers: Mapping[str, str], raw: bytes, latency_s: float) -> Attempt:
    """Map an HTTP answer to an ``Attempt``: ok, retryable, or final error."""
    body, is_json = _parse_body(raw)
    code: str | None = None
    message: str | None = None
    if 200 <= status < 300:
        if not is_json:
            code, message = "invalid_response", f"{status} with a body that is not JSON: "
            message += _snippet(body)
        else:
            message = _unusable(status, body)
            code = None if message is None else "invalid_response"
        # a 2xx that is not usable is retried: the server produced nothing to keep
        retryable = code is not None
    elif 300 <= status < 400:
        # Never followed (as the openai SDK): a redirect would carry the key and the endpoint's
        # headers to wherever it points, and a 301/302 turns the POST into a GET.
        code, message, retryable = REDIRECT, _redirect_message(status, headers), False
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


def _unusable(status: int, body: Any) -> str | None:
    """Why a 2xx JSON body is not an answer to keep, or ``None`` when it is one."""
    if not isinstance(body, dict):
        return f"{status} with a JSON body that is not an object"
    error = body.get("error")
    if error:
        detail = error.get("message") if isinstance(error, dict) else None
        return f"{status} with an error object: {_snippet(detail or error)}"
    choices = body.get("choices")
    if not isinstance(choices, list):
        return f"{status} with a JSON body that has no 'choices' list"
    if not choices:
        return f"{status} with an empty 'choices' list"
    if not all(isinstance(choice, dict) for choice in choices):
        return f"{status} with a choice that is not an object"
    return None


def _redirect_message(status: int, headers: Mapping[str, str]) -> str:
    location = headers.get("location")
    if location is None:
        where = "without a Location"
    else:
        origin = url_origin(location)
        where = f"to {redact_url(origin)}" if origin else "to another path on the same server"
    return (
        f"HTTP {status}: the endpoint redirects {where}; redirects are not followed (they "
        "would carry the key elsewhere): set base_url to the address that answers"
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


def transport_failure(
    code: str, message: str, start: float, connect_failure: ConnectFailure | None = None
) -> Attempt:
    """No usable answer: the network failed (``code``), retried; ``start``: the attempt's
    ``perf_counter`` at its start."""
    return Attempt(
        ok=False,
        retryable=True,
        latency_s=time.perf_counter() - start,
        error_code=code,
        error_message=message,
        connect_failure=connect_failure,
    )


def broken_answer(status: int, message: str, start: float) -> Attempt:
    """An answer cut off after its status line: the server is up, the answer unusable."""
    return Attempt(
        ok=False,
        retryable=True,
        latency_s=time.perf_counter() - start,
        status_code=status,
        error_code="invalid_response",
        error_message=f"the answer ({status}) broke off: {message}",
    )


def without_secrets(attempt: Attempt, secrets: Sequence[str]) -> Attempt:
    """``attempt`` with each of ``secrets`` replaced in its error message and body: an HTTP
    library may quote the URL, and a server the key it was sent (a gateway's 401 that names
    it); neither may reach a record, a log or the summary."""
    message = attempt.error_message
    clean = None if message is None else scrub_json(message, secrets)
    body = attempt.body
    if isinstance(body, str | dict | list):
        body = scrub_json(body, secrets)
    if clean == message and body == attempt.body:
        return attempt
    return dataclasses.replace(attempt, error_message=clean, body=body)


def describe(exc: BaseException) -> str:
    """An exception as one line: its type, then its message if any."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _snippet(body: Any) -> str:
    text = body if isinstance(body, str) else json.dumps(body)
    text = " ".join(text.split())
    return text if len(text) <= _TEXT_SNIPPET else text[: _TEXT_SNIPPET - 3] + "..."
