"""An OpenAI-compatible chat-completion simulator, as a raw ASGI app.

It stands in for a real endpoint in tests, demos (``base_url = "sim"``) and benchmarks: answers
are deterministic functions of the request (``expected_content``), so a test can check that
every answer went back to the request that asked for it; RPM/TPM limits answer 429 with
OpenAI's headers; faults (5xx, an HTML 502, truncated JSON, a missing ``usage``) are injected
at a seeded rate. It is a bare ASGI callable with no framework, because it has to outrun the
client it is measuring.

    sim = Simulator(SimConfig(rpm=600, error_rate=0.01))
    httpx.AsyncClient(transport=httpx.ASGITransport(app=sim))   # in-process
    with running_sim(SimConfig()) as handle: handle.base_url      # over a loopback socket
    serve(SimConfig(), port=8000)                                 # `batcher sim`
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import anyio
import uvicorn

from batcher.cost.tokens import count_message_tokens, encoding_for_model
from batcher.sim import json_values as sim_json
from batcher.sim.batches import PREFIXES as BATCH_PREFIXES
from batcher.sim.batches import BatchService
from batcher.sim.faults import (
    EVENT_STREAM_TYPE,
    FAULT_KINDS,
    STREAM_FAULTS,
    TRANSPORT_FAULTS,
    BadRequest,
    RateLimits,
    error_body,
    fault_response,
    is_int,
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

__all__ = [
    "FAULT_KINDS",
    "SimConfig",
    "SimHandle",
    "SimStats",
    "Simulator",
    "count_prompt_tokens",
    "expected_content",
    "running_sim",
    "serve",
]


MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "sim-echo")
"""The ids listed by ``GET /v1/models``; chat completions accept any model name."""

_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_MODELS_PATHS = frozenset({"/v1/models", "/models"})
_FINGERPRINT = "fp_sim0001"
_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "one", "two", "three", "four", "five", "six",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """How the simulator behaves. Every field has a harmless default: fast, unlimited, no faults.

    ``max_completion_tokens`` is the longest answer the simulated model writes on its own; a
    request's ``max_tokens``/``max_completion_tokens`` below an answer's natural length cuts it
    and gives ``finish_reason: "length"``. ``burst_s`` is how many seconds' worth of ``rpm`` and
    ``tpm`` may be spent at once (see ``batcher.sim.faults.Bucket``). ``error_rate`` is drawn
    per attempt from a ``random.Random(seed)``, so a retried request can succeed and a run with
    requests sent in the same order is reproducible. A ``stream: true`` request gets its first
    chunk after the latency and each later chunk (one word a chunk) ``stream_chunk_ms`` after
    the one before. A request with a ``response_format`` gets JSON made to fit its schema
    (``batcher.sim.json_values``), broken on purpose at ``schema_error_rate`` (drawn per choice).
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    error_rate: float = 0.0
    error_kinds: tuple[str, ...] = ("500", "502", "503", "malformed")
    seed: int = 0
    max_completion_tokens: int = 64
    burst_s: float = 1.0
    stream_chunk_ms: float = 0.0
    schema_error_rate: float = 0.0
    fault_retry_after_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("latency_ms", "latency_jitter_ms", "stream_chunk_ms"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and value >= 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("error_rate", "schema_error_rate"):
            rate = getattr(self, name)
            if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):
                raise ValueError(f"{name} must be within [0, 1], got {rate!r}")
        kinds = tuple(self.error_kinds)
        unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
        if not kinds or unknown or isinstance(self.error_kinds, str):
            known = ", ".join(sorted(FAULT_KINDS))
            raise ValueError(f"error_kinds must be a non-empty tuple of {known}; got {kinds!r}")
        # Frozen: accept a list from a caller but keep the hashable tuple the annotation promises.
        object.__setattr__(self, "error_kinds", kinds)
        if not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not (is_int(self.max_completion_tokens) and self.max_completion_tokens >= 1):
            raise ValueError(
                f"max_completion_tokens must be an integer >= 1, got {self.max_completion_tokens!r}"
            )
        if not (
            isinstance(self.fault_retry_after_s, int | float) and self.fault_retry_after_s >= 0
        ):
            raise ValueError(
                f"fault_retry_after_s must be a number >= 0, got {self.fault_retry_after_s!r}"
            )
        if not (isinstance(self.burst_s, int | float) and 0 < self.burst_s <= 60):
            raise ValueError(f"burst_s must be within (0, 60], got {self.burst_s!r}")


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


class _QuietHangUps(logging.Filter):
    """Drops uvicorn's complaint about the responses the simulator breaks off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("ASGI callable returned without completing")


logging.getLogger("uvicorn.error").addFilter(_QuietHangUps())


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]], model: str | None = None) -> int:
    """The prompt tokens the simulator bills for ``messages``: tiktoken, as OpenAI counts them.

    The encoding follows the model (``o200k_base`` for the gpt-4o family, else ``cl100k_base``;
    see ``batcher.cost.tokens``); each message costs 3 tokens of framing and the reply 3 more.
    """
    return count_message_tokens(messages, encoding_for_model(model))


def expected_content(
    body: Mapping[str, Any], index: int = 0, *, max_completion_tokens: int = 64
) -> str:
    """The content the simulator answers to request ``body`` for choice ``index``.

    ``"sim-<12 hex> word word …"``: the hex is from a sha256 of the canonical JSON of the
    request's ``model``, ``messages``, ``seed`` and ``temperature`` and the choice index; the
    number of words is the completion tokens. Pass the ``max_completion_tokens`` of the
    ``SimConfig`` in use when it is not the default.
    """
    return _choice(body, index, max_completion_tokens, _request_cap(body))[0]


def _choice(
    body: Mapping[str, Any], index: int, natural_max: int, request_cap: int | None
) -> tuple[str, int, str]:
    """``(content, completion_tokens, finish_reason)`` for one choice."""
    digest = _digest(body, index)
    natural = 1 + int.from_bytes(digest[:4], "big") % natural_max
    tokens = natural if request_cap is None else min(natural, request_cap)
    words = " ".join(_WORDS[(digest[j % 32] + j) % len(_WORDS)] for j in range(tokens))
    finish = "length" if tokens < natural else "stop"
    return f"sim-{digest.hex()[:12]} {words}", tokens, finish


def _wanted_json(body: Mapping[str, Any]) -> Any:
    """The schema a request's ``response_format`` asks for (``{}`` for ``json_object``, any
    object), or ``None`` when it asks for text."""
    fmt = body.get("response_format")
    if not isinstance(fmt, Mapping):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "object", "properties": {"answer": {"type": "string"}}}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        return (spec.get("schema") if isinstance(spec, Mapping) else None) or {}
    return None


def _json_choice(
    body: Mapping[str, Any], index: int, schema: Any, request_cap: int | None, wrong: bool
) -> tuple[str, int, str]:
    """``(content, completion_tokens, finish_reason)`` of a JSON answer: about 4 characters a
    token; a cap below that cuts the text (no longer JSON) with ``finish_reason: "length"``."""
    value = sim_json.instance(schema, _digest(body, index))
    if wrong:
        value = sim_json.broken(schema, value)
    content = json.dumps(value)
    tokens = max(1, math.ceil(len(content) / 4))
    if request_cap is not None and request_cap < tokens:
        return content[: request_cap * 4], request_cap, "length"
    return content, tokens, "stop"


def _digest(body: Mapping[str, Any], index: int) -> bytes:
    key = {name: body.get(name) for name in ("model", "messages", "seed", "temperature")}
    key["index"] = index
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest()


def _request_cap(body: Mapping[str, Any]) -> int | None:
    given: list[int] = [
        cap for cap in (body.get("max_tokens"), body.get("max_completion_tokens")) if is_int(cap)
    ]
    return min(given) if given else None


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
        self.batches = BatchService(self._answer)  # the Files and Batches API

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
        cap = _request_cap(body) or self.config.max_completion_tokens
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

        answer = self._answer(body, prompt_tokens)
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

    def _answer(self, body: Mapping[str, Any], prompt_tokens: int) -> dict[str, Any]:
        cap = _request_cap(body)
        natural_max = self.config.max_completion_tokens
        n = body.get("n") or 1
        schema = _wanted_json(body)
        if schema is None:
            results = [_choice(body, i, natural_max, cap) for i in range(n)]
        else:
            rate = self.config.schema_error_rate
            results = [
                _json_choice(body, i, schema, cap, rate > 0 and self._schema_rng.random() < rate)
                for i in range(n)
            ]
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "finish_reason": finish,
                "logprobs": None,
            }
            for index, (content, _, finish) in enumerate(results)
        ]
        completion_tokens = sum(tokens for _, tokens, _ in results)
        return {
            # The request's hash, as in choice 0's "sim-<hex>" tag: ids are reproducible too.
            "id": "chatcmpl-" + results[0][0][4:16],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": _FINGERPRINT,
        }

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


# -- serving -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SimHandle:
    """A simulator running in a background thread, as yielded by ``running_sim``."""

    base_url: str
    port: int
    simulator: Simulator


class _ThreadServer(uvicorn.Server):
    """A uvicorn server that tells another thread when its startup is over, however it ended."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.ready.set()


def _uvicorn_config(sim: Simulator, log_level: str, **extra: Any) -> uvicorn.Config:
    # ws="none": the simulator speaks no WebSocket, and importing a websockets backend only
    # risks deprecation warnings. The graceful-shutdown bound keeps a stuck client from
    # holding a shutdown (and a test) hostage.
    return uvicorn.Config(
        sim,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        ws="none",
        timeout_graceful_shutdown=5,
        **extra,
    )


def serve(
    config: SimConfig, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning"
) -> None:
    """Serve the simulator with uvicorn until Ctrl+C (or SIGTERM); blocks.

    The socket is bound here, before uvicorn starts, so a port in use raises ``OSError``
    instead of uvicorn's ``sys.exit``.
    """
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.create_server(address[:2], family=family)
    server = uvicorn.Server(_uvicorn_config(Simulator(config), log_level))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn has already shut down gracefully; it re-raises the captured SIGINT so that
        # the default handler runs, which for us only means "stop" — not a traceback.
        pass
    finally:
        sock.close()


@contextmanager
def running_sim(
    config: SimConfig | None = None, *, startup_timeout: float = 10.0
) -> Iterator[SimHandle]:
    """Run a simulator on a free loopback port in a daemon thread for the ``with`` block.

    The thread has its own event loop, so this works from sync code and from inside another
    event loop alike. uvicorn only installs signal handlers from the main thread, so Ctrl+C
    still reaches the caller. Logging is left as the caller configured it.
    """
    sim = Simulator(config)
    sock = socket.create_server(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    server = _ThreadServer(_uvicorn_config(sim, "warning", log_config=None))

    def run() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            server.ready.set()  # also when startup failed before reaching our hook

    thread = threading.Thread(target=run, name=f"batcher-sim-{port}", daemon=True)
    thread.start()
    try:
        if not server.ready.wait(startup_timeout) or not server.started:
            raise RuntimeError(f"the simulator did not start on 127.0.0.1:{port}")
        yield SimHandle(base_url=f"http://127.0.0.1:{port}/v1", port=port, simulator=sim)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
