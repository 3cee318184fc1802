"""Sporadic failures against failing servers, through the engine over a real loopback socket
(the retries' waits recorded by an injected sleep): a request's bad luck on a steady endpoint
waits the backoff's first step each time; a server that fails most attempts gets the growing
backoff."""

from __future__ import annotations

import io
import json
import random
from typing import Any

import anyio
import anyio.lowlevel

from batcher.config import RetryConfig
from batcher.cost.budget import Budget
from batcher.cost.pricing import Price, Pricer
from batcher.engine.control import EngineSettings, Sinks
from batcher.engine.dispatch import Engine
from batcher.engine.endpoints import Endpoint
from batcher.engine.outage import Outage
from batcher.engine.retry import Sleep
from batcher.http.client import ChatClient
from batcher.limits.endpoint import Limits
from batcher.records import Reject, Request
from batcher.runner.progress import Progress
from batcher.runner.stats import RunStats
from tests.engine.test_dispatch import Collected
from tests.loopback import chat_answer, read_body, serving

CONFIG = RetryConfig(max_attempts=6, backoff_initial_s=1.0, backoff_max_s=60.0)


def _app(fails: Any) -> Any:
    """A server that answers 500 while ``fails(question, its count so far)``, else 200."""
    counts: dict[str, int] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        question = json.loads(await read_body(receive))["messages"][0]["content"]
        counts[question] = counts.get(question, 0) + 1
        if fails(question, counts[question]):
            status, answer = 500, {"error": {"message": "boom", "type": "server_error"}}
        else:
            status, answer = 200, chat_answer("m", {"prompt_tokens": 1, "completion_tokens": 1})
        head = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    return app


def _run(
    base_url: str, n: int, *, budget: Budget | None = None, sleep: Sleep | None = None
) -> tuple[Collected, list[float]]:
    """``n`` requests through an engine of 4 workers; the results and every retry's wait
    (``sleep``: the waits' own, after they are noted)."""
    sink, stats = Collected(), RunStats()
    progress = Progress(stats, total=None, enabled=False, stream=io.StringIO())
    sinks = Sinks(results=sink, rejects=sink, stats=stats, progress=progress)
    waits: list[float] = []

    async def noted(seconds: float) -> None:
        waits.append(seconds)
        await (sleep or _no_wait)(seconds)

    requests: list[Request | Reject] = [
        Request(
            custom_id=f"r{i}",
            line=i + 1,
            body={
                "model": "m",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": f"q{i}"}],
            },
            body_hash=f"h{i}",
            prompt_tokens=8,
            completion_budget=8,
        )
        for i in range(n)
    ]

    async def main() -> None:
        async with ChatClient(base_url, api_key=None, max_connections=4) as client:
            endpoint = Endpoint(name="e", client=client, limits=Limits(concurrency=4),
                                outage=Outage(patience_s=5))  # fmt: skip
            settings = EngineSettings(retry=CONFIG, grace_s=1)
            pricer = Pricer({"m": Price(input=1.0, output=1.0, cached=1.0, source="test")})
            engine = Engine([endpoint], settings, sinks, pricer=pricer, budget=budget, sleep=noted)
            await engine.run(iter([requests]))

    anyio.run(main)
    return sink, waits


async def _no_wait(seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


def _most_waiting_at_once(budget: Budget | None) -> int:
    """The most requests waiting for a retry at once, of 200 through 4 workers where one in
    eight fails its first attempt (a steady server: waiting requests lend their places)."""
    waiting = most = 0

    async def sleep(seconds: float) -> None:
        nonlocal waiting, most
        waiting += 1
        most = max(most, waiting)
        try:
            await anyio.sleep(0.2)  # long enough for the others to go on meanwhile
        finally:
            waiting -= 1

    with serving(_app(lambda q, count: int(q[1:]) % 8 == 0 and count == 1)) as url:
        sink, waits = _run(url, 200, budget=budget, sleep=sleep)
    results = [r for r, provisional in sink.results if not provisional]
    assert len(results) == 200 and all(r.status == "ok" for r in results)
    assert len(waits) == 25
    return most


def test_under_a_budget_a_lane_lends_at_most_its_own_size() -> None:
    random.seed(11)
    # Each waiting request keeps its worst-case reservation: lending four times the pool
    # would hold that much more of the cap in requests that are not being sent. With a
    # budget, the 4 workers and the 4 places they lend may all be waiting; without, more.
    assert _most_waiting_at_once(None) > 8
    assert _most_waiting_at_once(Budget(100.0)) <= 8


def test_a_request_unlucky_on_a_steady_server_waits_the_first_step_each_time() -> None:
    random.seed(11)
    # q0 fails its first five attempts; the other 59 requests are answered at once
    with serving(_app(lambda q, count: q == "q0" and count <= 5)) as url:
        sink, waits = _run(url, 60)
    results = {r.custom_id: r for r, provisional in sink.results if not provisional}
    assert len(results) == 60 and all(r.status == "ok" for r in results.values())
    assert results["r0"].attempts == 6
    assert len(waits) == 5 and all(0 <= w <= CONFIG.backoff_initial_s for w in waits)


def test_a_server_failing_most_attempts_gets_the_growing_backoff() -> None:
    random.seed(11)
    with serving(_app(lambda q, count: count <= 4)) as url:  # every request fails 4 times
        sink, waits = _run(url, 12)
    results = [r for r, provisional in sink.results if not provisional]
    assert len(results) == 12 and all(r.status == "ok" and r.attempts == 5 for r in results)
    assert len(waits) == 48
    # the first waits come while the endpoint still looks steady; once most attempts fail,
    # the backoff grows with each request's failures (caps 2, 4, 8 s for the later retries)
    assert max(waits) > 2 * CONFIG.backoff_initial_s
