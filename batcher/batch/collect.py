"""Following a batch job's batches to their end: poll, report progress, collect each ended
batch into the journal, and send what it did not answer into a batch of the next round.

Every request's record is appended to the journal once (``BatchRun.recorded``), then the
chunk is journaled ``collected`` with what goes into the next round: a crash in between
collects the batch again, skipping what was recorded. A request whose answer is a retryable
error goes into the next round while attempts remain (``retry.max_attempts``); one the batch
did not run (expired, cancelled, missing from its files) goes again without counting an
attempt, in at most ``MAX_ROUNDS`` batches in all; with ``[batch] unanswered = "online"`` it
goes to the online engine instead (``batch.online``), after the batches have been followed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from batcher.batch.api import ENDED, Batch
from batcher.batch.chunks import Chunk, plan_chunks
from batcher.batch.results import BatchAnswer, ReadBack, answer_of, read_back
from batcher.batch.submit import BatchRun, Live, done, forget_batch, note, submit, unrecorded
from batcher.records import Request, Result
from batcher.runner.progress import SILENT_MAX_S

#: The most batches one request is put in (expired or cancelled batches included).
MAX_ROUNDS = 8
#: The longest the log goes without a counted line while batches run: the display's
#: ``SILENT_MAX_S`` less a margin for the polls' own time.
LINE_EVERY_S = SILENT_MAX_S - 5.0
#: The batches named in a counted line; the rest are counted.
SHOWN_BATCHES = 8
#: The error of a batch refused for the enqueued-token limit (OpenAI's code).
TOKEN_LIMIT = "token_limit_exceeded"


def child_of(run: BatchRun, chunk: Chunk) -> Live | None:
    """The next round's chunk of a collected chunk (its ``resubmit`` requests, as the input
    has them now), if any. Its key hashes the parent's: unique, and the same if asked twice."""
    state = run.states.states.get(chunk.key)
    if state is None or state.status != "collected" or not state.resubmit:
        return None
    requests = [r for r in chunk.requests if r.key in state.resubmit]
    big = 2**62  # a subset of one chunk always fits where the chunk did
    plan = plan_chunks(
        requests, job=chunk.key, max_requests=big, max_bytes=big, round=chunk.round + 1
    )
    if not plan.chunks:
        return None
    return Live(chunk=plan.chunks[0], tries=dict(state.resubmit))


async def follow(run: BatchRun, lives: list[Live]) -> None:
    """Poll every ``poll_s`` until each chunk's batch (and its next rounds') has ended and
    been collected. A counted log line (``run.progress``: UTC timestamp, done/total, rate,
    tokens, cost, errors, each batch's state and counts) follows each poll that changed a
    batch, and comes at least every ``LINE_EVERY_S`` while none does, between polls too."""
    active = list(lives)
    last_overall = ""
    while active:
        still: list[Live] = []
        for live in active:
            kept = await _step(run, live, active)
            still.extend(kept)
        active = still
        if not active:
            run.progress.set_status("every batch collected")
            run.progress.log_line()
            break
        overall = _overall(run, active)
        run.progress.set_status(overall)
        if overall != last_overall or run.progress.silent_s() >= LINE_EVERY_S:
            run.progress.log_line()
            last_overall = overall
        await _wait(run, run.job.batch.poll_s)


async def _wait(run: BatchRun, seconds: float) -> None:
    """Wait ``seconds`` for the next poll, with a counted line (the batches as last polled)
    whenever ``LINE_EVERY_S`` pass without one: a ``poll_s`` over a minute leaves no gap."""
    left = seconds
    while left > 0:
        due = LINE_EVERY_S - run.progress.silent_s()
        if due <= 0:
            run.progress.log_line()
            continue
        step = min(left, due)
        await run.sleep(step)
        left -= step


async def _step(run: BatchRun, live: Live, active: list[Live]) -> list[Live]:
    """One poll of one chunk: what to keep following afterwards."""
    chunk = live.chunk
    state = run.states.states[chunk.key]
    if state.batch_id is None:  # refused by the queue: goes again once earlier batches end
        if _others_in_flight(run, live, active):
            return [live]
        live.waiting = False
        return [live] if await submit(run, live) else []
    batch = await run.api.retrieve(state.batch_id)
    if (batch.status, batch.request_counts) != (state.status, state.request_counts):
        note(run, chunk, batch)
        counts = batch.request_counts
        run.say(
            f"batch {batch.id} ({chunk.model}): {batch.status}, {counts.completed:,}/"
            f"{counts.total:,} done, {counts.failed:,} failed"
        )
    if not batch.ended:
        return [live]
    if batch.status == "failed" and any(e.code == TOKEN_LIMIT for e in batch.errors):
        live.refusals += 1
        if live.refusals < 2 or _others_in_flight(run, live, active):
            forget_batch(run, chunk)
            live.waiting = True
            run.say(
                f"batch {batch.id}: over the enqueued-token limit; it goes again when the "
                "earlier batches end"
            )
            return [live]
        # refused again with nothing else queued: it can never fit
        reason = (
            f"{TOKEN_LIMIT}: this chunk alone is over the queue's enqueued-token limit; lower "
            "batch.max_requests"
        )
        await _record_failed(run, live, batch, reason)
        return []
    child = await collect(run, live, batch)
    if child is None:
        return []
    return [child] if await submit(run, child) else []


def _others_in_flight(run: BatchRun, live: Live, active: list[Live]) -> bool:
    """Whether another chunk of the run has a batch that has not ended."""
    for other in active:
        if other is live:
            continue
        state = run.states.states.get(other.chunk.key)
        if state is not None and state.batch_id is not None and state.status not in _OVER:
            return True
    return False


#: Chunk statuses of a batch that holds nothing in the queue any more.
_OVER = frozenset({*ENDED, "collected"})


def _overall(run: BatchRun, active: list[Live]) -> str:
    """Each followed batch's state and counts (the first ``SHOWN_BATCHES``, then how many
    more), and the requests ended in them: ``2 batches: batch_1 in_progress 3/4 (1 failed),
    batch_2 validating 0/4; 3 of 8 ended``."""
    parts = []
    total = ended = 0
    for live in active:
        state = run.states.states.get(live.chunk.key)
        if state is None or state.batch_id is None:
            parts.append(f"{live.chunk.model} waiting for the queue")
            continue
        counts = state.request_counts
        # a batch being validated counts nothing yet: its size is what was uploaded
        size = counts.total or len(state.members) or len(live.chunk.requests)
        done = counts.completed + counts.failed
        total += size
        ended += done
        failed = f" ({counts.failed:,} failed)" if counts.failed else ""
        parts.append(f"{state.batch_id} {state.status} {done:,}/{size:,}{failed}")
    shown = ", ".join(parts[:SHOWN_BATCHES])
    more = f", {len(parts) - SHOWN_BATCHES} more" if len(parts) > SHOWN_BATCHES else ""
    return f"{len(active)} batches: {shown}{more}; {ended:,} of {total:,} ended"


async def collect(run: BatchRun, live: Live, batch: Batch) -> Live | None:
    """Record what an ended batch answered; return the next round's chunk, if any."""
    chunk = live.chunk
    if batch.status == "failed":
        first = batch.errors[0] if batch.errors else None
        reason = f"{first.code}: {first.message}" if first else "no reason given"
        await _record_failed(run, live, batch, reason)
        return None
    got = await _read_files(run, chunk, batch)
    resubmit: dict[str, int] = {}
    online: list[Request] = []
    to_online = run.job.batch.unanswered == "online"
    spent = 0.0
    max_attempts = run.job.retry.max_attempts
    for request in chunk.requests:
        if done(run, live, request):
            continue
        answer = got.answers.get(request.key) or _missing(request, batch)
        prior = live.tries.get(request.key, 0)
        used = prior + 1 if answer.answered else prior
        if to_online and not answer.answered:  # not run: the online engine sends it
            online.append(request)
            continue
        if answer.retryable:
            again = used < max_attempts if answer.answered else chunk.round + 1 < MAX_ROUNDS
            if again:
                resubmit[request.key] = used
                continue
        spent += _record(run, live, request, answer.result, used)
    run.journal.sync()
    if run.budget is not None:
        run.budget.settle(live.reserved, spent)
        live.reserved = 0.0
    run.states.record(
        chunk.key, status="collected", resubmit=resubmit, online=tuple(r.key for r in online)
    )
    run.online.extend(online)
    if resubmit:
        run.say(f"batch {batch.id}: {len(resubmit):,} requests go into a new batch")
    if online:
        run.say(f"batch {batch.id}: {len(online):,} requests it did not run go online")
    return child_of(run, chunk)


async def _record_failed(run: BatchRun, live: Live, batch: Batch, reason: str) -> None:
    """A batch that failed as a whole: an error record for each of its requests, naming the
    line of the input file each validation error names."""
    by_line = {e.line: e for e in batch.errors if e.line}
    spent = 0.0
    for number, (request, _) in enumerate(unrecorded(run, live), start=1):
        error = by_line.get(number)
        if error is not None:
            message = f"line {number} of the batch's input file: {error.code}: {error.message}"
            run.say(f"batch {batch.id} failed validation: {message} (id {request.custom_id!r})")
        else:
            message = f"the batch failed ({reason}); this request was not run"
        item: dict[str, Any] = {"error": {"code": "batch_failed", "message": message}}
        result = answer_of(request, item, batch, attempt=1).result
        spent += _record(run, live, request, result, live.tries.get(request.key, 0) + 1)
    run.journal.sync()
    if run.budget is not None:
        run.budget.settle(live.reserved, spent)
        live.reserved = 0.0
    run.states.record(live.chunk.key, status="collected", resubmit={})


def _missing(request: Request, batch: Batch) -> BatchAnswer:
    """The outcome of a request no line of the batch's files names: not run."""
    item = {"error": {"code": "batch_expired", "message": "no line of the batch's files names it"}}
    return answer_of(request, item, batch, attempt=1)


async def _read_files(run: BatchRun, chunk: Chunk, batch: Batch) -> ReadBack:
    """The batch's output and error files, streamed to disk and read line by line."""
    paths = []
    try:
        for n, file_id in enumerate((batch.output_file_id, batch.error_file_id)):
            if file_id:
                path = run.folder / f"{chunk.key}.{n}.jsonl"
                paths.append(path)
                await run.api.download_to(file_id, path)
        return read_back(chunk, batch, paths)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def _record(run: BatchRun, live: Live, request: Request, result: Result, attempts: int) -> float:
    """Journal one request's final record (cost at the batch price) against the body hash
    its chunk was built from; returns its cost."""
    cost = None
    if result.status == "ok":
        cost = run.pricer.cost_of(request.body.get("model"), result.model, result.usage)
    result = dataclasses.replace(
        result,
        attempts=max(1, attempts),
        cost_usd=cost,
        endpoint=run.job.endpoint.name,
    )
    body_hash = live.hashes.get(request.key, request.body_hash)
    run.journal.append(result, body_hash)
    run.recorded[request.key] = body_hash
    run.stats.add(result)
    return cost or 0.0
