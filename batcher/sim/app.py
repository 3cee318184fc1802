"""An OpenAI-compatible chat-completion simulator, as a raw ASGI app.

It stands in for a real endpoint in tests, demos (``base_url = "sim"``) and benchmarks: answers
are deterministic functions of the request (``batcher.sim.answers``), so a test can check that
every answer went back to the request that asked for it; RPM/TPM limits answer 429 with
OpenAI's headers; faults (5xx, an HTML 502, truncated JSON, a missing ``usage``) are injected
at a seeded rate (``batcher.sim.faults``). It is a bare ASGI callable with no framework, because
it has to outrun the client it is measuring. Its settings are a ``SimConfig``
(``batcher.sim.config``); ``batcher.sim.serve`` serves it over a socket.

    sim = Simulator(SimConfig(rpm=600, error_rate=0.01))
    httpx.AsyncClient(transport=httpx.ASGITransport(app=sim))   # in-process
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import anyio

from batcher.sim.answers import completion, count_prompt_tokens, request_cap
from batcher.sim.batches import PREFIXES as BATCH_PREFIXES
from batcher.sim.batches import BatchService
from batcher.sim.config import SimConfig
from batcher.sim.faults import (
    EVENT_STREAM_TYPE,
    STREAM_FAULTS,
    TRANSPORT_FAULTS,
    BadRequest,
    RateLimits,
    error_body,
    fault_response,
    validate_request,
)
from batcher.sim.wire import (
    Headers,
    Receive,
    Response,
    Scope,
    Send,
    include_usage,
    send_response,
    stream_events,
)

MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "sim-echo")
"""The ids listed by ``GET /v1/models``; chat completions accept any model name."""

_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_MODELS_PATHS = frozenset({"/v1/models", "/models"})


@dataclass(kw_only=True)
class SimStats:
    """Counters of what the simulator answered; ``GET /stats`` serves ``as_dict()``.

    Counted: requests to the chat-completion route and to unknown routes, so that
    ``requests_received == answered_ok + rejected_429 + faults_injected + bad_requests``.
    ``answered_ok`` and the ``*_tokens_served`` figures cover only well-formed 200 answers with
    ``usage``; an injected ``malformed`` or ``no_usage`` 200 is a fault, not an answer.
    ``tokens_charged`` is what the TPM limit was charged (prompt + completion budget of every
    admitted request), the figure a TPM limit is measured against.
    """

    requests_received: int = 0
    answered_ok: int = 0
    rejected_429: int = 0
    faults_injected: int = 0
    bad_requests: int = 0
    prompt_tokens_served: int = 0
    completion_tokens_served: int = 0
    total_tokens_served: int = 0
    tokens_charged: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class SimLog:
    """When chat requests arrived and when 429s were answered, in seconds since ``started``
    (the simulator's clock); ``GET /log`` serves it. Bounded: the last million of each."""

    started: float
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=1_000_000))
    rate_limited: deque[float] = field(default_factory=lambda: deque(maxlen=1_000_000))

    def as_dict(self) -> dict[str, Any]:
        return {"arrivals": list(self.arrivals), "rate_limited": list(self.rate_limited)}


class Simulator:
    """The simulator: an ASGI app (``__call__``) with its config, rate limits and ``stats``.

    ``clock`` (seconds, monotonic) drives the rate limits, so tests can move time by hand.
    """

    def __init__(
        self, config: SimConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or SimConfig()
        self.stats = SimStats()
        self._clock = clock
        self.log = SimLog(started=clock())
        self._limits = RateLimits(self.config.rpm, self.config.tpm, self.config.burst_s)
        # Separate streams, so the fault sequence for a seed does not depend on latency settings.
        self._fault_rng = random.Random(self.config.seed)
        self._latency_rng = random.Random(f"latency-{self.config.seed}")
        self._schema_rng = random.Random(f"schema-{self.config.seed}")
        # the Files and Batches API
        self.batches = BatchService(self._answer, self.config.batch_config())

    def reset_stats(self) -> None:
        """Zero the counters and the log (not the rate-limit buckets)."""
        self.stats = SimStats()
        self.log = SimLog(started=self._clock())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope (``http`` or ``lifespan``)."""
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        if path in _CHAT_PATHS and method == "POST":
            raw = await _read_body(receive)
            if raw is None:
                return  # the client hung up before sending its body: nobody to answer
            response = await self._chat(raw)
        elif path.startswith(BATCH_PREFIXES):
            raw = await _read_body(receive)
            if raw is None:
                return
            response = await self.batches.handle(scope, raw)
        elif path in _MODELS_PATHS and method == "GET":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "sim"} for m in MODELS]
            response = _json_response(200, {"object": "list", "data": data})
        elif path == "/stats" and method == "GET":
            response = _json_response(200, self.stats.as_dict() | self.batches.stats())
        elif path == "/log" and method == "GET":
            response = _json_response(200, self.log.as_dict())
        elif path == "/stats/reset" and method == "POST":
            self.reset_stats()
            response = _json_response(200, self.stats.as_dict())
        else:
            self.stats.requests_received += 1
            self.stats.bad_requests += 1
            message = f"Invalid URL ({method} {path})"
            response = Response(404, error_body(message, "invalid_request_error"), _request_id())
            self._count(404)
        await send_response(send, response, receive, self.config.stream_chunk_ms / 1000)

    async def _chat(self, raw: bytes) -> Response:
        stats = self.stats
        stats.requests_received += 1
        try:
            body = validate_request(raw)
        except BadRequest as exc:
            stats.bad_requests += 1
            self._count(400)
            error = error_body(exc.message, "invalid_request_error", None, exc.param)
            return Response(400, error, _request_id())
        prompt_tokens = count_prompt_tokens(body["messages"], body.get("model"))
        # TPM is charged up front on the worst case, as OpenAI does: the answer is not known yet.
        cap = request_cap(body) or self.config.max_completion_tokens
        reserve = prompt_tokens + cap * (body.get("n") or 1)

        headers = _request_id()
        now = self._clock()
        self.log.arrivals.append(now - self.log.started)
        refusal = self._limits.admit(self._clock, reserve, headers)
        if refusal is not None:
            stats.rejected_429 += 1
            self._count(429)
            self.log.rate_limited.append(now - self.log.started)
            return Response(429, refusal, headers)
        stats.tokens_charged += reserve

        # Drawn on arrival, not after the sleep, so the fault sequence for a seed follows the
        # order requests came in whatever the latency jitter. An admitted request that then
        # fails has still spent its rate limit, as on a real endpoint.
        fault = None
        if self.config.error_rate and self._fault_rng.random() < self.config.error_rate:
            fault = self._fault_rng.choice(self.config.error_kinds)
        delay = self.config.latency_ms
        if self.config.latency_jitter_ms:
            jitter = self.config.latency_jitter_ms
            delay = max(0.0, delay + self._latency_rng.uniform(-jitter, jitter))
        if delay > 0:
            await anyio.sleep(delay / 1000)
        headers.append((b"openai-processing-ms", str(round(delay)).encode()))

        answer = completion(
            body,
            prompt_tokens,
            natural_max=self.config.max_completion_tokens,
            broken=self._broken_json,
        )
        streamed = body.get("stream") is True
        if streamed and fault in STREAM_FAULTS:
            return self._stream_fault(fault, answer, body, headers)
        if fault is not None:
            status, payload, content_type = fault_response(fault, answer)
            if fault in ("429", "overloaded"):
                wait = self.config.fault_retry_after_s
                headers.append((b"retry-after", str(math.ceil(wait)).encode()))
                headers.append((b"retry-after-ms", str(round(wait * 1000)).encode()))
                self.log.rate_limited.append(self._clock() - self.log.started)
            elif fault == "retry_after_date":  # the HTTP-date form of retry-after, no -ms
                when = time.time() + self.config.fault_retry_after_s + 1
                headers.append((b"retry-after", formatdate(when, usegmt=True).encode()))
                self.log.rate_limited.append(self._clock() - self.log.started)
            stats.faults_injected += 1
            self._count(status)
            transport = fault if fault in TRANSPORT_FAULTS else None
            return Response(status, payload, headers, content_type, transport_fault=transport)
        usage = answer["usage"]
        stats.answered_ok += 1
        stats.prompt_tokens_served += usage["prompt_tokens"]
        stats.completion_tokens_served += usage["completion_tokens"]
        stats.total_tokens_served += usage["total_tokens"]
        self._count(200)
        if streamed:
            events = stream_events(answer, include_usage=include_usage(body))
            return Response(200, b"", headers, EVENT_STREAM_TYPE, events=events)
        return Response(200, json.dumps(answer, separators=(",", ":")).encode(), headers)

    def _stream_fault(
        self, fault: str, answer: dict[str, Any], body: Mapping[str, Any], headers: Headers
    ) -> Response:
        """A fault of a streamed answer: the stream itself goes wrong, after a 200."""
        self.stats.faults_injected += 1
        self._count(200)
        usage = include_usage(body)
        if fault == "no_usage":
            usage = False
        elif fault == "huge":
            answer["choices"][0]["message"]["content"] += " lorem" * 350_000
        events = stream_events(answer, include_usage=usage)
        if fault == "malformed":  # ends cleanly half way: no [DONE]
            events = events[: len(events) // 2]
        elif fault == "stream_error":  # an error event in place of the rest
            message = "The server had an error while processing your request."
            events = [
                *events[: len(events) // 2],
                b"data: " + error_body(message, "server_error") + b"\n\n",
            ]
        transport = fault if fault in TRANSPORT_FAULTS else None
        return Response(200, b"", headers, EVENT_STREAM_TYPE, transport, events)

    def _answer(self, body: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:
        """The chat completion answering ``body``, as the chat route builds it."""
        return completion(
            body,
            prompt_tokens,
            natural_max=self.config.max_completion_tokens,
            broken=self._broken_json,
        )

    def _broken_json(self) -> bool:
        """Whether this JSON choice is broken on purpose (drawn at ``schema_error_rate``)."""
        rate = self.config.schema_error_rate
        return rate > 0 and self._schema_rng.random() < rate

    def _count(self, status: int) -> None:
        by_status = self.stats.by_status
        key = str(status)
        by_status[key] = by_status.get(key, 0) + 1


def _request_id() -> Headers:
    return [(b"x-request-id", b"req_" + os.urandom(16).hex().encode())]


def _json_response(status: int, payload: Any) -> Response:
    return Response(status, json.dumps(payload, separators=(",", ":")).encode(), [])


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
