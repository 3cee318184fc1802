"""Where the engine's microseconds go: ``engine_path.py``'s rounds, each part of the request's
path switched off in turn, in one process.

    python bench/engine_parts.py                    # 20,000 requests, 128 workers, 20 ms, 5 sets
    python bench/engine_parts.py --parts journal-write,parquet --repeat 7

A sampling profiler spreads a request's ~80 µs over hundreds of frames, and its shares at this
grain move with the sampling (py-spy put 8 % in ``asyncio.current_task``, which costs 0.2 µs).
This asks each part directly: a set is one round as a run makes it, then one round per part
with that part replaced by the least that keeps the run going (a write skipped, a value made
once and reused); a part's cost is the median over the sets of (the set's full round minus its
round without the part). Rounds of one process agree within a few percent, so differences of
a microsecond or two show. The parts' costs do not add up to the whole: what is left is the
event loop, the tasks and the frames between the parts.

The process is tuned as the ``batcher`` command tunes its own (``cli.tuning``: the
collector's thresholds), so the figures are those of ``batcher run``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import engine_path

from batcher.cli.tuning import ProcessTuning
from batcher.cost.pricing import Pricer

Patch = Callable[[], Iterator[None]]


@contextmanager
def _replaced(owner: object, name: str, value: object) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def _made_once(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, called the first time only: its first value, reused."""
    kept: list[Any] = []

    def once(*args: Any, **kwargs: Any) -> Any:
        if not kept:
            kept.append(function(*args, **kwargs))
        return kept[0]

    return once


@contextmanager
def journal_write() -> Iterator[None]:
    """The journal's ``os.write`` (its size still counted: the output reads offsets)."""
    from batcher.output.journal import Journal

    def counted(self: Journal, data: bytes) -> None:
        self._size += len(data)

    with _replaced(Journal, "_write", counted):
        yield


@contextmanager
def journal_encode() -> Iterator[None]:
    """Encoding a result as its journal line (orjson over a dict of ~22 fields)."""
    import batcher.output.journal as journal

    with _replaced(journal, "encode", _made_once(journal.encode)):
        yield


@contextmanager
def rows() -> Iterator[None]:
    """Turning a result into its output row (Python values in column order)."""
    from batcher.output.split import OutputFiles

    with _replaced(OutputFiles, "row", _made_once(OutputFiles.row)):
        yield


@contextmanager
def parquet() -> Iterator[None]:
    """Writing rows: Arrow conversion, Parquet encoding and compression, the file."""
    from batcher.output.split import OutputFiles

    with _replaced(OutputFiles, "write_row", lambda self, row: None):
        yield


@contextmanager
def answer() -> Iterator[None]:
    """Reading an answer into an ``Attempt``: orjson's parse, the checks, the usage."""
    import batcher.http.client as client

    with _replaced(client, "classify", _made_once(client.classify)):
        yield


@contextmanager
def limiter() -> Iterator[None]:
    """The endpoint's concurrency limiter (anyio's ``CapacityLimiter``)."""
    from batcher.limits.endpoint import Limits

    class Unlimited:
        total_tokens = 1 << 30

        def acquire_nowait(self) -> None:
            pass

        async def acquire(self) -> None:
            pass

        def release(self) -> None:
            pass

    made = Limits.__init__

    def init(self: Limits, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        self.concurrency = Unlimited()  # type: ignore[assignment]

    with _replaced(Limits, "__init__", init):
        yield


@contextmanager
def counting() -> Iterator[None]:
    """The run's statistics and the progress bar's count.

    All but the count of answers, which the round checks."""
    from batcher.records import Result
    from batcher.runner.progress import Progress
    from batcher.runner.stats import RunStats

    def ok_counted(self: RunStats, result: Result) -> None:
        self.ok += 1

    with (
        _replaced(RunStats, "add", ok_counted),
        _replaced(Progress, "advance", lambda self, n=1: None),
    ):
        yield


@contextmanager
def usage_check() -> Iterator[None]:
    """The check of each answer's usage against the request (``engine.usage_check``)."""
    import batcher.engine.asking as asking

    with _replaced(asking, "usage_checked", lambda request, last: last):
        yield


@contextmanager
def attempt() -> Iterator[None]:
    """Routing, limits, meters, retries, outage and setup checks around the POST.

    What the answer tells the limits too; the POST itself is kept."""
    from batcher.engine.attempt import Sender, Sent

    async def posted(self: Sender, request: Any, router: Any, reserved: float = 0.0) -> Sent:
        endpoint = router.endpoints[0]
        return Sent(await endpoint.client.post(request.body), 1, endpoint.name)

    with _replaced(Sender, "send", posted):
        yield


@contextmanager
def ask() -> Iterator[None]:
    """``attempt``, and pricing, the usage check, the budget and the count of requests sent.

    The POST and the record are kept."""
    import time

    from batcher.engine.asking import Asker, result_of

    async def posted(self: Asker, request: Any, router: Any, *, first: bool = True) -> Any:
        endpoint = router.endpoints[0]
        last = await endpoint.client.post(request.body)
        return result_of(request, last, 1, time.time(), endpoint.name, model=None, cost=None)

    with _replaced(Asker, "ask", posted):
        yield


@contextmanager
def collector() -> Iterator[None]:
    """Python's cyclic garbage collector (at the thresholds the ``batcher`` command sets)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


PARTS: dict[str, Patch] = {
    "journal-write": journal_write,
    "journal-encode": journal_encode,
    "rows": rows,
    "parquet": parquet,
    "answer": answer,
    "limiter": limiter,
    "counting": counting,
    "usage-check": usage_check,
    "attempt": attempt,
    "ask": ask,
    "collector": collector,
}


def main() -> int:
    """Run the sets and print each part's cost."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5, help="sets of rounds")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"of: {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts: {', '.join(unknown)}")
    ProcessTuning().start()
    requests = engine_path._requests(args.n)
    Pricer().price("gpt-4o-mini")
    gc.freeze()
    latency_s = args.latency_ms / 1000

    def round_() -> float:
        return engine_path.one_round(requests, args.workers, "live", latency_s)

    round_()  # imports, first allocations
    whole: list[float] = []
    saved: dict[str, list[float]] = {p: [] for p in parts}
    for _ in range(args.repeat):
        full = round_()
        whole.append(full)
        for part in parts:
            with PARTS[part]():
                saved[part].append(full - round_())
    total = statistics.median(whole)
    rounds = ", ".join(f"{x:.1f}" for x in whole)
    print(f"engine path (live): {total:.1f} µs a request (rounds: {rounds})")
    print(f"{'part':16s} {'µs':>6s} {'share':>6s}  what")
    for part in parts:
        cost = statistics.median(saved[part])
        doc = (PARTS[part].__doc__ or " ").splitlines()[0]
        print(f"{part:16s} {cost:6.1f} {cost / total:6.1%}  {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
