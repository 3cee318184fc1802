"""The failure modes of the simulator: 400s, injected faults, and rate limits (429s).

Kept apart from ``batcher.sim.app`` so the app module reads as routing and answering, while the
shapes of things going wrong (what a proxy's 502 looks like, how OpenAI spells a reset
duration, how a continuous bucket decides) live here. Nothing in this module does I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, TypeGuard

FAULT_KINDS: frozenset[str] = frozenset(
    {
        "500",
        "502",
        "503",
        "504",
        "malformed",
        "no_usage",
        "no_choices",
        "wrong_content_type",
        "huge",
        "400",
        "429",
        "overloaded",
        "retry_after_date",
        "401",
        "quota",
        "reset_headers",
        "reset_body",
        "stall",
        "stream_error",
    }
)
#: Faults of the connection itself rather than of the answer: the app breaks the response off
#: (after the headers, or halfway through the body) or stalls before the body.
TRANSPORT_FAULTS = frozenset({"reset_headers", "reset_body", "stall"})
#: Faults a streamed answer gets as a broken stream after a 200 (``malformed``: the stream ends
#: half way without ``[DONE]``; ``stream_error``: an error event half way). The others are
#: answered as for a request that does not stream.
STREAM_FAULTS = frozenset({"malformed", "no_usage", "huge", "stream_error", *TRANSPORT_FAULTS})
"""Every fault the simulator can inject; ``SimConfig.error_kinds`` picks among these."""

JSON_TYPE = b"application/json"
EVENT_STREAM_TYPE = b"text/event-stream; charset=utf-8"
HTML_TYPE = b"text/html; charset=utf-8"

# What a proxy in front of the model (nginx, Cloudflare) answers when the upstream is down:
# clients must cope with a body that is not JSON at all.
_BAD_GATEWAY_HTML = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    """Serialise an error the way OpenAI does: ``{"error": {message, type, param, code}}``."""
    error = {"message": message, "type": type_, "param": param, "code": code}
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def fault_response(kind: str, answer: dict[str, Any]) -> tuple[int, bytes, bytes]:
    """Return ``(status, body, content_type)`` for an injected fault of ``kind``.

    ``answer`` is the well-formed chat completion the request would have received; the
    ``malformed`` and ``no_usage`` kinds are damaged copies of it, so they look like a real
    answer that went wrong rather than a canned string.
    """
    if kind in ("500", "stream_error"):  # stream_error, when not streamed, is a plain 500
        message = "The server had an error while processing your request. Sorry about that!"
        return 500, error_body(message, "server_error"), JSON_TYPE
    if kind == "502":
        return 502, _BAD_GATEWAY_HTML, HTML_TYPE
    if kind == "503":
        message = "The engine is currently overloaded, please try again later."
        return 503, error_body(message, "server_error"), JSON_TYPE
    if kind == "malformed":
        full = json.dumps(answer, separators=(",", ":")).encode()
        # Cutting a JSON object anywhere before its closing brace leaves it unparseable: this
        # is what a connection dropped mid-body by a proxy looks like to the client.
        return 200, full[: max(1, len(full) // 2)], JSON_TYPE
    if kind == "504":
        return (
            504,
            _BAD_GATEWAY_HTML.replace(b"502 Bad Gateway", b"504 Gateway Time-out"),
            HTML_TYPE,
        )
    if kind == "no_choices":
        stripped = {key: value for key, value in answer.items() if key != "choices"}
        return 200, json.dumps(stripped, separators=(",", ":")).encode(), JSON_TYPE
    if kind == "wrong_content_type":  # a captive portal or a proxy's login page, with a 200
        return 200, b"<html><body>Please sign in to continue.</body></html>", HTML_TYPE
    if kind == "huge":  # a well-formed answer of about 2 MB
        big = json.loads(json.dumps(answer))
        big["choices"][0]["message"]["content"] += " lorem" * 350_000
        return 200, json.dumps(big, separators=(",", ":")).encode(), JSON_TYPE
    if kind == "400":
        message = "Invalid value for 'temperature': must be between 0 and 2."
        return 400, error_body(message, "invalid_request_error", "invalid_value"), JSON_TYPE
    if kind in TRANSPORT_FAULTS:
        return 200, json.dumps(answer, separators=(",", ":")).encode(), JSON_TYPE
    if kind in ("429", "retry_after_date"):  # a limit the client was not told about
        message = "Rate limit reached for requests. Please try again later."
        return 429, error_body(message, "requests", "rate_limit_exceeded"), JSON_TYPE
    if kind == "overloaded":  # a busy server (or a gateway in front of one), not a limit
        message = "The server is currently overloaded with other requests. Please retry."
        return 429, error_body(message, "server_error", "overloaded"), JSON_TYPE
    if kind == "401":
        message = "Incorrect API key provided. You can find your API key in your account."
        return 401, error_body(message, "invalid_request_error", "invalid_api_key"), JSON_TYPE
    if kind == "quota":
        message = "You exceeded your current quota, please check your plan and billing details."
        return 429, error_body(message, "insufficient_quota", "insufficient_quota"), JSON_TYPE
    if kind == "no_usage":
        stripped = {key: value for key, value in answer.items() if key != "usage"}
        return 200, json.dumps(stripped, separators=(",", ":")).encode(), JSON_TYPE
    raise ValueError(f"unknown fault kind {kind!r}")


class BadRequest(Exception):
    """A request the simulator refuses with 400 ``invalid_request_error``, as OpenAI would."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def validate_request(raw: bytes) -> dict[str, Any]:
    """Parse and check a chat-completion body; raise ``BadRequest`` (a 400) when OpenAI would."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of message objects", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest(f"stream must be a boolean, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or stream is not True):
        message = "stream_options must be an object, and is only allowed when stream is true"
        raise BadRequest(message, "stream_options")
    n = body.get("n")
    if n is not None and not (is_int(n) and 1 <= n <= 128):
        raise BadRequest(f"n must be an integer between 1 and 128, got {n!r}", "n")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and not (is_int(value) and value >= 1):
            raise BadRequest(f"{name} must be an integer >= 1, got {value!r}", name)
    return body


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool`` (JSON ``true`` must not pass for ``1``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def format_duration(seconds: float) -> str:
    """Format a wait as OpenAI's ``x-ratelimit-reset-*`` headers do (Go durations).

    ``0s``, ``20ms``, ``1s``, ``2.5s``, ``6m0s``, ``1h0m0s``. Rounded *up* to the millisecond, so
    a client that waits exactly this long finds the capacity back.
    """
    millis = math.ceil(max(seconds, 0.0) * 1000 - 1e-6)
    if millis <= 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


class Bucket:
    """A continuous token bucket for one per-minute limit (requests or tokens).

    The state is the ``deficit``: how much has been taken and not yet refilled; it drains at
    ``limit / 60`` per second. A cost is admitted when ``deficit + cost <= capacity``, where the
    capacity is ``burst_s`` seconds' worth of the limit (at least 1). That is how a per-minute
    limit "enforced over shorter periods" behaves: the long-run rate is exactly the limit, and
    no minute-sized burst gets through at once. A cost larger than the capacity but within
    the per-minute limit is admitted when the bucket is full and drives it into debt, so a big
    request is slow to follow rather than impossible.
    """

    __slots__ = ("capacity", "deficit", "limit", "rate", "updated")

    def __init__(self, limit: int, burst_s: float) -> None:
        self.limit = limit
        self.rate = limit / 60.0
        self.capacity = max(self.rate * burst_s, 1.0)
        self.deficit = 0.0
        self.updated: float | None = None

    def refill(self, now: float) -> None:
        """Drain the deficit for the time elapsed since the last call."""
        if self.updated is not None and now > self.updated:
            self.deficit = max(0.0, self.deficit - (now - self.updated) * self.rate)
        # A clock that stepped back (or a test that rewound it) must not create capacity.
        if self.updated is None or now > self.updated:
            self.updated = now

    def wait_for(self, cost: float) -> float | None:
        """Seconds until ``cost`` fits (0 when it fits now); ``None`` when it never will."""
        if cost > self.limit:
            return None
        need = min(cost, self.capacity)
        excess = self.deficit + need - self.capacity
        # The tolerance keeps float noise from turning an exact fit into a 1 ms wait.
        return 0.0 if excess <= 1e-9 else excess / self.rate

    def take(self, cost: float) -> None:
        """Charge ``cost`` (after ``wait_for`` said it fits)."""
        self.deficit += cost

    def remaining(self) -> int:
        """What could be sent right now without a 429."""
        return max(0, math.floor(self.capacity - self.deficit + 1e-9))

    def reset_after(self) -> float:
        """Seconds until the bucket is full again."""
        return self.deficit / self.rate


class RateLimits:
    """The RPM and TPM buckets of one simulator; either may be absent (``None`` = unlimited).

    A request must fit both. One that does not is refused without being charged: OpenAI says
    failed requests count against the limit, but charging refusals lets a retry storm lock a
    client out for good, which tests nothing useful.
    """

    def __init__(self, rpm: int | None, tpm: int | None, burst_s: float) -> None:
        self._buckets: list[tuple[Bucket, str]] = []
        if rpm is not None:
            self._buckets.append((Bucket(rpm, burst_s), "requests"))
        if tpm is not None:
            self._buckets.append((Bucket(tpm, burst_s), "tokens"))

    def admit(
        self, clock: Callable[[], float], tokens: int, headers: list[tuple[bytes, bytes]]
    ) -> bytes | None:
        """Charge one request of ``tokens``, or return the body of its 429.

        Appends the ``x-ratelimit-*`` headers (and for a 429 ``retry-after``/``-ms``, from
        when the request would fit) to ``headers`` either way.
        """
        if not self._buckets:
            return None
        now = clock()
        costs = {"requests": 1, "tokens": tokens}
        # The slowest bucket decides: retrying after its wait finds room in both.
        worst: tuple[float, Bucket, str] | None = None
        for bucket, kind in self._buckets:
            bucket.refill(now)
            wait = bucket.wait_for(costs[kind])
            wait_key = math.inf if wait is None else wait
            if wait_key > 0 and (worst is None or wait_key > worst[0]):
                worst = (wait_key, bucket, kind)
        if worst is None:
            for bucket, kind in self._buckets:
                bucket.take(costs[kind])
        for bucket, kind in self._buckets:
            name = kind.encode()
            headers += [
                (b"x-ratelimit-limit-" + name, str(bucket.limit).encode()),
                (b"x-ratelimit-remaining-" + name, str(bucket.remaining()).encode()),
                (b"x-ratelimit-reset-" + name, format_duration(bucket.reset_after()).encode()),
            ]
        if worst is None:
            return None

        wait, bucket, kind = worst
        cost = costs[kind]
        unit = "RPM" if kind == "requests" else "TPM"
        if math.isinf(wait):
            # OpenAI's "Request too large": no wait helps, so no retry-after either.
            message = (
                f"Request too large on {kind} per min ({unit}): "
                f"Limit {bucket.limit}, Requested {cost}."
            )
        else:
            headers.append((b"retry-after", str(max(1, math.ceil(wait))).encode()))
            headers.append((b"retry-after-ms", str(max(1, math.ceil(wait * 1000))).encode()))
            message = (
                f"Rate limit reached in organization org-sim on {kind} per min ({unit}): "
                f"Limit {bucket.limit}, Used {math.ceil(bucket.deficit)}, Requested {cost}. "
                f"Please try again in {format_duration(wait)}."
            )
        return error_body(message, kind, "rate_limit_exceeded")
