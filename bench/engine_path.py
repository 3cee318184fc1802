"""The engine's own cost, in process: CPU a request from a read line to its output row, with
the HTTP client's transport replaced by one that answers at once.

    python bench/engine_path.py                 # 20,000 requests, 128 workers, 20 ms, 5 rounds
    python bench/engine_path.py --sink none     # the engine alone, results kept in a list

Each round runs N requests (bodies and hashes as the reader makes them) through an ``Engine``
over one endpoint whose ``ChatClient`` posts to an in-memory transport: the body is serialised
and the answer (the simulator's, with its headers) parsed and classified as over a socket, but
no socket, no HTTP library and no server are involved. ``--sink live`` (the default) records
into a fresh journal and live Parquet output as a run does; ``--sink none`` keeps the results
in a list. What batcher adds above an HTTP library, measured without its noise. Rounds of one
process agree within a few percent, separate processes within about 10 %: compare a change
by alternating runs of both and taking medians, and trust only differences above that.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import orjson

from batcher.config import RetryConfig
from batcher.cost.pricing import Pricer
from batcher.engine.control import EngineSettings, Sinks
from batcher.engine.dispatch import Engine
from batcher.engine.endpoints import Endpoint
from batcher.engine.outage import Outage
from batcher.http.client import ChatClient
from batcher.limits.endpoint import Limits
from batcher.output.body_hash import request_hash
from batcher.output.journal import Journal
from batcher.output.live_output import LiveOutput
from batcher.records import Reject, Request, Result
from batcher.runner.progress import Progress
from batcher.runner.stats import RunStats
from batcher.sim.answers import completion


class _Reply:
    """A whole answer, already here."""

    def __init__(self, body: bytes, headers: Mapping[str, str]) -> None:
        self.status = 200
        self.headers = headers
        self._body = body

    async def read(self) -> bytes:
        return self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self._body


class CannedTransport:
    """Answers every POST with the same chat completion ``latency_s`` later (as a server would:
    the loop's waits for answers are when the reading thread runs; with none, the workers
    would outrun the reader and wait for lines as no run does)."""

    def __init__(self, answer: bytes, latency_s: float) -> None:
        self._latency_s = latency_s
        self._reply = _Reply(answer, {"content-type": "application/json",
                                      "content-length": str(len(answer)),
                                      "x-request-id": "req-bench"})  # fmt: skip

    @asynccontextmanager
    async def post(self, url: str, content: bytes) -> AsyncIterator[_Reply]:
        await asyncio.sleep(self._latency_s)
        yield self._reply

    def open(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class _Kept:
    """A result sink that keeps the results (``--sink none``)."""

    def __init__(self) -> None:
        self.results: list[Result] = []

    def append(self, result: Result, body_hash: str, *, provisional: bool = False) -> None:
        self.results.append(result)

    def write(self, reject: Reject) -> None:
        pass


def _requests(n: int) -> list[Request | Reject]:
    requests: list[Request | Reject] = []
    for i in range(n):
        question = f"Question number {i}: what is {i} + 1?"
        body = {"model": "gpt-4o-mini", "max_tokens": 64,
                "messages": [{"role": "user", "content": question}]}  # fmt: skip
        requests.append(Request(custom_id=f"req-{i}", line=i + 1, body=body,
                                body_hash=request_hash(body), completion_budget=64))  # fmt: skip
    return requests


def _answer() -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "What is 1 + 1?"}],
            "max_tokens": 64}  # fmt: skip
    return orjson.dumps(completion(body, 14, natural_max=64, broken=lambda: False))


def one_round(requests: list[Request | Reject], workers: int, sink: str, latency_s: float) -> float:
    """CPU µs a request of one engine run over ``requests``."""
    answer = _answer()
    with tempfile.TemporaryDirectory(prefix="batcher-engine-") as folder:
        journal = Journal(Path(folder) / "out.parquet.journal")
        live = LiveOutput(journal, Path(folder) / "out.parquet", dict) if sink == "live" else None
        if live is not None:
            live._prepare()  # the writer's import and metadata, made in a thread in a run
        results = live if live is not None else _Kept()
        stats = RunStats()
        progress = Progress(stats, total=None, enabled=False, stream=io.StringIO())
        sinks = Sinks(results=results, rejects=_Kept(), stats=stats, progress=progress)

        async def main() -> float:
            client = ChatClient("http://bench.invalid/v1", api_key=None, max_connections=workers)
            client._transport = CannedTransport(answer, latency_s)  # the one part replaced
            limits = Limits(concurrency=workers)
            endpoint = Endpoint(name="bench", client=client, limits=limits,
                                outage=Outage(patience_s=5))  # fmt: skip
            settings = EngineSettings(retry=RetryConfig(), concurrency=workers, grace_s=1)
            engine = Engine([endpoint], settings, sinks, pricer=Pricer())
            if live is not None:
                live.follow(engine.watermark.low)
            batches = [requests[i : i + 256] for i in range(0, len(requests), 256)]
            started = time.process_time()
            await engine.run(iter(batches))
            if live is not None:
                live.close(compact=True)
            return time.process_time() - started

        elapsed = anyio.run(main)
        journal.close()
    assert stats.ok == len(requests), f"{stats.ok} of {len(requests)} ok"
    return elapsed / len(requests) * 1e6


def main() -> int:
    """Run the rounds and print each and their median."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sink", choices=("live", "none"), default="live")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    requests = _requests(args.n)
    Pricer().price("gpt-4o-mini")  # the price tables loaded before the clock starts
    gc.freeze()
    latency_s = args.latency_ms / 1000
    rounds = [one_round(requests, args.workers, args.sink, latency_s) for _ in range(args.repeat)]
    listed = ", ".join(f"{x:.1f}" for x in rounds)
    median = statistics.median(rounds)
    print(f"engine path ({args.sink}): {median:.1f} µs a request (rounds: {listed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
