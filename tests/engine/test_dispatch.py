"""The engine driven directly, as the runner and the Ray workers drive it: endpoints, its
settings and its sinks, over a real loopback socket to the simulator."""

from __future__ import annotations

import io
from pathlib import Path

import anyio

from batcher.config import RetryConfig
from batcher.cost.pricing import Price, Pricer
from batcher.engine.control import EngineSettings, Sinks
from batcher.engine.dispatch import Engine
from batcher.engine.endpoints import Endpoint
from batcher.engine.outage import Outage
from batcher.http.client import ChatClient
from batcher.limits.endpoint import Limits
from batcher.records import Reject, Request, Result
from batcher.runner.progress import Progress
from batcher.runner.stats import RunStats
from batcher.sim.config import SimConfig
from batcher.sim.serve import running_sim
from tests.helpers import requests_of, write_input


class Collected:
    """A result and reject sink that keeps what it is given."""

    def __init__(self) -> None:
        self.results: list[tuple[Result, bool]] = []
        self.rejects: list[Reject] = []

    def append(self, result: Result, body_hash: str, *, provisional: bool = False) -> None:
        self.results.append((result, provisional))

    def write(self, reject: Reject) -> None:
        self.rejects.append(reject)


def run_engine(
    base_url: str,
    batches: list[list[Request | Reject]],
    concurrency: int,
    pricer: Pricer | None = None,
) -> tuple[Collected, RunStats]:
    sink, stats = Collected(), RunStats()
    sinks = Sinks(
        results=sink,
        rejects=sink,
        stats=stats,
        progress=Progress(stats, total=None, enabled=False, stream=io.StringIO()),
    )

    async def main() -> None:
        async with ChatClient(base_url, api_key=None, max_connections=concurrency) as client:
            limits = Limits(concurrency=concurrency)
            endpoint = Endpoint(
                name="sim", client=client, limits=limits, outage=Outage(patience_s=5)
            )
            settings = EngineSettings(retry=RetryConfig(max_attempts=2), grace_s=1)
            engine = Engine([endpoint], settings, sinks, pricer=pricer or Pricer())
            await engine.run(iter(batches))

    anyio.run(main)
    return sink, stats


def test_an_engine_records_every_request_once_and_each_reject(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 9)
    requests = list(requests_of(src, {"model": "m"}).values())
    bad = Reject(line=10, reason="not JSON", text="{")
    batches: list[list[Request | Reject]] = [list(requests[:4]), [*requests[4:], bad]]
    with running_sim(SimConfig(latency_ms=1)) as sim:
        sink, stats = run_engine(sim.base_url, batches, concurrency=3)
    ids = sorted(r.custom_id for r, provisional in sink.results if not provisional)
    assert ids == sorted(r.custom_id for r in requests)
    assert all(r.status == "ok" for r, _ in sink.results)
    assert sink.rejects == [bad] and stats.rejected == 1
    assert stats.ok == stats.submitted == stats.done == 9


def test_an_engine_prices_answers_with_the_pricer_it_is_given(tmp_path: Path) -> None:
    # The job's [pricing] reaches the records only through the pricer the caller builds
    # (runner.wiring.build_pricer): the engine has no pricer of its own to fall back on.
    src = write_input(tmp_path / "in.jsonl", 3)
    requests = list(requests_of(src, {"model": "m"}).values())
    price = Price(input=1.0, output=2.0, cached=1.0, source="the job")
    with running_sim(SimConfig(latency_ms=1)) as sim:
        sink, _ = run_engine(sim.base_url, [list(requests)], 2, Pricer({"m": price}))
    assert len(sink.results) == 3
    for result, _ in sink.results:
        assert result.usage is not None and result.usage.prompt_tokens
        assert result.cost_usd == price.cost(result.usage)
