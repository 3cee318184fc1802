"""A batch job's shared state (``BatchRun``) and the submission of one chunk: reserve its
worst-case cost, upload its file, then create its batch or adopt the one a crashed run made.

Each step is journaled (``StateJournal``) before the next is taken, so a rerun resumes at the
step it died in: a chunk with a file id and no batch id lists the key's batches and adopts the
one carrying its metadata before creating another; a chunk with a batch id is never created
again. The upload journals the chunk's members (each request's key and body hash), from
which a rerun rebuilds it.

A request counts as done when the journal records it with the hash of the body it was sent
with (``run.recorded``): an answer is recorded against the body its batch was built from, so
a line changed since is sent again, as an online resume sends it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from batcher.batch.api import Batch
from batcher.batch.chunks import Chunk
from batcher.batch.client import BatchClient
from batcher.batch.results import adopt
from batcher.batch.state import StateJournal
from batcher.config import JobConfig
from batcher.cost.budget import Budget
from batcher.cost.pricing import Pricer
from batcher.engine.retry import Sleep
from batcher.output.journal import Journal
from batcher.records import Request
from batcher.runner.progress import Progress, utc_stamp
from batcher.runner.stats import RunStats


@dataclass(kw_only=True)
class Live:
    """A chunk this run follows: its requests' attempts used in earlier batches (``tries``),
    the dollars reserved for it under ``--max-cost``, and whether it waits for the queue (its
    batch was refused for the enqueued-token limit)."""

    chunk: Chunk
    tries: dict[str, int] = field(default_factory=dict)
    #: each request's body hash as the chunk was built (by default, its requests' own)
    hashes: dict[str, str] = field(default_factory=dict)
    reserved: float = 0.0
    waiting: bool = False
    refusals: int = 0  # times this run saw its batch refused by the queue

    def __post_init__(self) -> None:
        if not self.hashes:
            self.hashes = {request.key: request.body_hash for request in self.chunk.requests}


@dataclass(kw_only=True)
class BatchRun:
    """What every step of a batch job shares."""

    job: JobConfig
    name: str  # the job's name, as the batches' metadata carries it
    api: BatchClient
    states: StateJournal
    journal: Journal
    pricer: Pricer
    budget: Budget | None
    stats: RunStats
    stream: IO[str]
    folder: Path  # where input files are written before they are uploaded
    recorded: dict[str, str]  # request key -> the body hash its journal record carries
    sleep: Sleep
    stop_reason: str | None = None  # set when no more chunks may be submitted (--max-cost)
    #: requests no batch answered, to send through the online engine (``unanswered = "online"``)
    online: list[Request] = field(default_factory=list)
    base_url: str = ""  # the endpoint's, for the online engine
    api_key: str | None = None
    transport: Any = None  # an ``httpx.AsyncBaseTransport`` for the online engine (tests)
    total: int | None = None  # the requests and rejected lines of the run (log lines' total)
    #: seconds, monotonic (the log lines' spacing) and since the epoch (their timestamps)
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    #: the counted log lines (done/total, rate, tokens, cost, errors, the batches' states)
    progress: Progress = field(init=False)

    def __post_init__(self) -> None:
        self.progress = Progress(
            self.stats, total=self.total, enabled=False, stream=self.stream,
            clock=self.clock, wall=self.wall,
        )  # fmt: skip

    def say(self, message: str) -> None:
        """One progress line, with its UTC timestamp."""
        print(f"{utc_stamp(self.wall())} batcher: {message}", file=self.stream, flush=True)


def write_input(path: Path, lines: Iterable[bytes]) -> Path:
    """Write a batch input file (JSONL) to ``path``."""
    with path.open("wb") as f:
        f.writelines(lines)
    return path


def done(run: BatchRun, live: Live, request: Request) -> bool:
    """Whether ``request`` of ``live``'s chunk is recorded: against the body the chunk was
    built from, or against its body now (answered by a later chunk)."""
    got = run.recorded.get(request.key)
    return got is not None and got in (live.hashes.get(request.key), request.body_hash)


def unrecorded(run: BatchRun, live: Live) -> list[tuple[Request, bytes]]:
    """The chunk's requests (with their lines) that have no record yet."""
    chunk = live.chunk
    return [
        (request, line)
        for request, line in zip(chunk.requests, chunk.lines, strict=True)
        if not done(run, live, request)
    ]


async def submit(run: BatchRun, live: Live) -> bool:
    """Make sure ``live``'s chunk has a batch: upload, then create or adopt. Returns false
    when it has nothing left to ask (journaled ``collected``) or ``--max-cost`` refuses it.
    A chunk whose batch runs already has its worst case reserved (a rerun's), never refused."""
    chunk = live.chunk
    state = run.states.states.get(chunk.key)
    if state is not None and state.batch_id is not None:
        reserve(run, live, [request for request, _ in unrecorded(run, live)], running=True)
        return True
    todo = unrecorded(run, live)
    if not todo:
        run.states.record(chunk.key, status="collected")
        return False
    if not reserve(run, live, [request for request, _ in todo]):
        return False
    if state is None or state.file_id is None:
        path = write_input(run.folder / f"{chunk.key}.jsonl", (line for _, line in todo))
        try:
            file_id = await run.api.upload(path)
        finally:
            path.unlink(missing_ok=True)
        members = {request.key: live.hashes[request.key] for request, _ in todo}
        state = run.states.record(
            chunk.key,
            status="uploaded",
            file_id=file_id,
            model=chunk.model,
            round=chunk.round,
            members=members,
        )
    else:
        found = await find_made(run, chunk, state.file_id, state.refused)
        if found is not None:
            run.say(f"batch {found.id} ({chunk.model}): adopted ({found.status})")
            note(run, chunk, found)
            return True
    assert state.file_id is not None
    batch = await run.api.create(
        state.file_id,
        metadata=chunk.metadata(run.name),
        completion_window=run.job.batch.completion_window,
    )
    note(run, chunk, batch)
    run.stats.submitted += len(todo)
    run.say(f"batch {batch.id} ({chunk.model}, {len(todo):,} requests): created")
    return True


async def find_made(
    run: BatchRun, chunk: Chunk, file_id: str | None, refused: tuple[str, ...] = ()
) -> Batch | None:
    """The batch a run that died after creating it left for ``chunk`` (found by metadata;
    not one the queue ``refused``)."""
    since = await run.api.file_created_at(file_id) if file_id else None
    batches = [b for b in await run.api.list_all(since=since) if b.id not in refused]
    return adopt([chunk], batches, job=run.name).get(chunk.key)


def note(run: BatchRun, chunk: Chunk, batch: Batch) -> None:
    """Journal what the server shows of the chunk's batch."""
    run.states.record(
        chunk.key, status=batch.status, batch_id=batch.id, request_counts=batch.request_counts
    )


def forget_batch(run: BatchRun, chunk: Chunk) -> None:
    """Journal the chunk as uploaded with no batch (its batch was refused by the queue): the
    next ``submit`` creates another of the same file."""
    state = run.states.states[chunk.key]
    refused = (*state.refused, state.batch_id) if state.batch_id else state.refused
    run.states.record(chunk.key, status="uploaded", batch_id=None, refused=refused)


def reserve(run: BatchRun, live: Live, requests: list[Request], *, running: bool = False) -> bool:
    """Reserve the chunk's worst-case cost under ``--max-cost`` (once): false, with the
    reason in ``run.stop_reason``, when it cannot be sent. A ``running`` chunk (its batch
    made by an earlier run) is being paid for already: what fits is reserved, and when it
    does not all fit no new chunk goes (``run.stop_reason``)."""
    budget = run.budget
    if budget is None or live.reserved or (run.stop_reason is not None and not running):
        return running or run.stop_reason is None
    total = 0.0
    for request in requests:
        price = run.pricer.price(request.body.get("model"))
        got = budget.reserve_for(request, price, run.job.limits.encoding)
        if isinstance(got, str) and running:
            run.stop_reason = run.stop_reason or got
            continue
        if isinstance(got, str):
            budget.settle(total, 0.0)  # give back what this chunk had reserved
            run.stop_reason = got
            return False
        total += got
    live.reserved = total
    return True
