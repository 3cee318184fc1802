"""A job in batch mode (``[job] mode = "batch"``): its requests sent as Batch API files.

The same checks as an online run come first (output writable and not the input, API key).
The whole input is read (rejects written as online). A rerun first follows every chunk the
state journal shows uploaded and not collected, rebuilt from the members it journaled (not
from the current chunking settings or output spelling); only requests that are neither
recorded nor in such a chunk are planned into new chunks (one model each, cut by
``[batch] max_requests``/``max_bytes``), under keys never used before. Each chunk is uploaded
and its batch created (or adopted: ``submit``), then followed until it ends and collected
into the journal (``collect``). The output is written from the journal at the end, each id
once, with the ``batch_id`` that answered it. Ids the journal records (as their line is now)
are never asked again, and a created batch is never created twice.

``detach`` stops (exit 3) once every batch is created; a later run collects them.
``cancel`` cancels the job's running batches and records nothing. Ctrl+C while polling (with
``handle_signals``) leaves the batches running and stops with exit 3.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio
import anyio.abc

from batcher.batch.api import Batch
from batcher.batch.chunks import Chunk, batch_line, plan_chunks
from batcher.batch.client import BatchClient, ConflictError
from batcher.batch.collect import follow
from batcher.batch.online import pending, send_online
from batcher.batch.prepare import read_all
from batcher.batch.results import answer_of
from batcher.batch.state import ChunkState, StateJournal, check_cancellable, state_path
from batcher.batch.submit import BatchRun, Live, submit
from batcher.config import DEFAULT_HTTP_CLIENT, JobConfig
from batcher.cost.budget import check_priced
from batcher.engine.retry import Sleep
from batcher.errors import ConfigError
from batcher.input.tabular import check_input
from batcher.output.compaction import checked_journal
from batcher.output.formats import rejects_path
from batcher.output.journal import journal_path
from batcher.output.live_output import write_output
from batcher.output.provenance import provenance
from batcher.records import Request
from batcher.runner.checks import (
    api_keys,
    check_not_the_input,
    check_output_writable,
    check_sim_available,
    check_transport_choice,
)
from batcher.runner.progress import format_summary, split_off
from batcher.runner.quiet_stream import quiet
from batcher.runner.run import RunReport
from batcher.runner.stats import RunStats, run_ending
from batcher.runner.status_file import RunStatus
from batcher.runner.wiring import SimServer, base_urls, build_budget, build_pricer
from batcher.storage import origin_beside, origin_of

if TYPE_CHECKING:
    import httpx


def run_batch_job(
    job: JobConfig,
    *,
    restart: bool = False,
    detach: bool = False,
    cancel: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    stream: IO[str] | None = None,
    handle_signals: bool = False,
    sim: SimServer | None = None,
    sleep: Sleep | None = None,
    clock: Callable[[], float] | None = None,
) -> RunReport:
    """``arun_batch_job`` (which see) on an event loop of its own (blocking)."""
    run = functools.partial(
        arun_batch_job,
        job,
        restart=restart,
        detach=detach,
        cancel=cancel,
        transport=transport,
        stream=stream,
        handle_signals=handle_signals,
        sim=sim,
        sleep=sleep,
        clock=clock,
    )
    return anyio.run(run)


async def arun_batch_job(
    job: JobConfig,
    *,
    restart: bool = False,
    detach: bool = False,
    cancel: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    stream: IO[str] | None = None,
    handle_signals: bool = False,
    sim: SimServer | None = None,
    sleep: Sleep | None = None,
    clock: Callable[[], float] | None = None,
) -> RunReport:
    """Run ``job`` through the Batch API; return the same report an online run returns.

    ``restart`` forgets the journals and submits every chunk again; refused (``ConfigError``)
    while batches of an earlier run are still running (``cancel`` them first). ``sim``
    serves a ``base_url = "sim"`` job's simulator. ``sleep`` replaces the wait between
    two polls and ``clock`` (seconds since the epoch) the clock of the log lines, their
    timestamps and spacing (tests). Raises ``ConfigError`` before anything is sent when the
    job cannot run, and ``NotVisibleError`` (exit 2) when the key cannot see a journaled batch.
    """
    check_transport_choice(job, transport)
    stream = quiet(stream or sys.stderr)
    started = time.monotonic()
    started_at = time.time()
    input_path, output = job.require_paths()
    check_output_writable(output)
    check_not_the_input(input_path, output)
    check_input(job, input_path)
    if job.engine == "ray":
        raise ConfigError("job.mode", 'batch mode runs in this process: use engine "local"')
    check_sim_available(job, sim is not None)
    if cancel:
        check_cancellable(output)
    key = api_keys(job)[0]
    if job.endpoint.http != DEFAULT_HTTP_CLIENT:
        print(_http_warning(job.endpoint.http), file=stream)
    pricer = build_pricer(job, batch=True)
    if job.limits.max_cost_usd is not None:
        await anyio.to_thread.run_sync(check_priced, job, pricer)
    stats = RunStats()
    status = RunStatus(output, job=job.name, mode="batch")
    with (
        # restart: the batch state goes too; a job whose output is gone is refused first
        checked_journal(journal_path(output), output, restart=restart) as journal,
        status.running(),  # the status file only while the journal's lock is ours
    ):
        requests = await anyio.to_thread.run_sync(read_all, job, input_path, output, stats)
        status.follow(stats)
        status.total = len(requests) + stats.rejected
        with StateJournal(state_path(output)) as states, base_urls(job, sim) as urls:
            async with BatchClient(
                urls[0],
                api_key=key,
                retry=job.retry,
                headers=dict(job.endpoint.headers),
                transport=transport,
            ) as api:
                with tempfile.TemporaryDirectory(prefix="batcher-batch-") as folder:
                    run = BatchRun(
                        job=job,
                        name=job.name,
                        api=api,
                        states=states,
                        journal=journal,
                        pricer=pricer,
                        budget=build_budget(job, journal.spent_before),
                        stats=stats,
                        stream=stream,
                        folder=Path(folder),
                        recorded={k: e.hash for k, e in journal.entries.items()},
                        sleep=sleep or anyio.sleep,
                        base_url=urls[0],
                        api_key=key,
                        transport=transport,
                        total=status.total,
                        clock=clock or time.monotonic,
                        wall=clock or time.time,
                    )
                    stats.skipped = sum(1 for r in requests if _done(run, r))
                    finished = await _drive(run, requests, detach, cancel, handle_signals)
        stats.wall_s = time.monotonic() - started
        if finished:
            from batcher.output.shape import output_shape  # pyarrow, as the writer

            journal.sync()
            # the Batch API's 429s are not counted by time: the record leaves them out
            ending = functools.partial(run_ending, started_at=started_at, counts_429s=False)
            write = functools.partial(
                write_output, journal, output, stats, provenance(job, input_path),
                output_shape(job),
                variants=[v.name for v in job.variants], split_errors=job.split_errors,
                compact=not stats.stopped_early, ending=ending,
            )  # fmt: skip
            await anyio.to_thread.run_sync(write)
    for model in pricer.unknown_models:
        print(
            f"batcher: warning: no price known for model {model!r}: its cost is left empty; "
            f'set [pricing."{model}"] input/output (USD per million tokens) in the job',
            file=stream,
        )
    rejects = rejects_path(output) if stats.rejected else None
    summary = format_summary(
        stats, name=job.name, output=origin_of(output),
        rejects=origin_beside(output, rejects) if rejects else None,
        failed=split_off(job, output),
    )  # fmt: skip
    print(summary, file=stream, flush=True)
    return RunReport(stats=stats, output=output, rejects=rejects, summary=summary)


def _http_warning(http: str) -> str:
    """Why ``endpoint.http`` barely matters in batch mode: the Files and Batches API calls (a
    few uploads and polls, not one request a line) go over batch mode's own client."""
    return (
        f"batcher: warning: endpoint.http = {http!r} applies only to requests sent online "
        '(batch.unanswered = "online"): batch mode uploads, creates and polls its batches '
        "over its own HTTP client (httpx)"
    )


async def _drive(
    run: BatchRun, requests: list[Request], detach: bool, cancel: bool, handle_signals: bool
) -> bool:
    """Submit, then follow (or cancel) the job's batches; true when every batch submitted was
    followed to its end (the output is then written), false when detached, cancelled or
    interrupted."""
    lives = _plan(run, requests)
    if cancel:
        await _cancel(run, lives)
        return False
    followed = False
    with anyio.CancelScope() as scope:
        if not handle_signals:
            followed = await _submit_and_follow(run, lives, detach)
        else:  # Ctrl+C or SIGTERM: stop here, the batches keep running
            try:
                async with anyio.create_task_group() as group:
                    await group.start(_watch_signals, scope)
                    followed = await _submit_and_follow(run, lives, detach)
                    group.cancel_scope.cancel()
            except BaseExceptionGroup as group_error:  # the error itself, not its group
                if len(group_error.exceptions) == 1:
                    raise group_error.exceptions[0] from None
                raise
    if scope.cancelled_caught:
        _stop(run.stats, "interrupted: the batches keep running; run again to collect them")
    return followed and not scope.cancelled_caught


def _plan(run: BatchRun, requests: list[Request]) -> list[Live]:
    """The chunks to follow: first every chunk the state journal shows uploaded and not
    collected, rebuilt from its journaled members; then new chunks of the requests neither
    recorded nor in one of those (a request whose line changed since goes in a new one)."""
    job = run.job
    by_key = {request.key: request for request in requests}
    tries: dict[str, int] = {}  # attempts used by requests a collected chunk sent on
    for state in run.states.states.values():
        if state.status == "collected":
            tries.update(state.resubmit)
    lives: list[Live] = []
    covered: set[str] = set()
    for state in list(run.states.states.values()):
        if not state.live:
            continue
        live = _rebuilt(state, by_key, tries)
        lives.append(live)
        covered.update(
            k for k, h in state.members.items() if k in by_key and by_key[k].body_hash == h
        )
    run.online.extend(pending(run, by_key))  # handed to the online engine by a collected chunk
    covered.update(r.key for r in run.online)
    fresh = [r for r in requests if not _done(run, r) and r.key not in covered]
    # keys never used before: a chunk's key, once journaled, names only that chunk
    plan = plan_chunks(
        fresh,
        job=f"{run.name}\x00{secrets.token_hex(8)}",
        max_requests=job.batch.max_requests,
        max_bytes=job.batch.max_bytes,
    )
    for request, reason in plan.refused:
        _refuse(run, request, reason)
    for chunk in plan.chunks:
        known = {r.key: tries[r.key] for r in chunk.requests if r.key in tries}
        lives.append(Live(chunk=chunk, tries=known))
    return lives


def _rebuilt(state: ChunkState, by_key: dict[str, Request], tries: dict[str, int]) -> Live:
    """A journaled chunk as the run follows it: its members that the input still has, with
    the body hashes it was built from."""
    requests = tuple(by_key[k] for k in state.members if k in by_key)
    model = state.model or next((str(r.body.get("model")) for r in requests), "")
    chunk = Chunk(
        key=state.chunk,
        model=model,
        round=state.round,
        requests=requests,
        lines=tuple(batch_line(r) for r in requests),  # uploaded already: never sent again
    )
    known = {r.key: tries[r.key] for r in requests if r.key in tries}
    return Live(chunk=chunk, tries=known, hashes=dict(state.members))


def _done(run: BatchRun, request: Request) -> bool:
    """Whether the journal records ``request`` as its line is now."""
    return run.recorded.get(request.key) == request.body_hash


async def _submit_and_follow(run: BatchRun, lives: list[Live], detach: bool) -> bool:
    """Submit every chunk that has no batch yet, then follow them all unless ``detach``."""
    submitted = [live for live in lives if await submit(run, live)]
    if run.stop_reason is not None:
        _stop(run.stats, run.stop_reason)
    if detach:
        _stop(
            run.stats,
            f"detached: {len(submitted)} batch(es) submitted; run the same command again "
            "without --detach to collect them (--cancel cancels them)",
        )
        return False
    await follow(run, submitted)
    await send_online(run)
    if run.stop_reason is not None:  # a later round's chunk over --max-cost
        _stop(run.stats, run.stop_reason)
    return True


async def _watch_signals(
    scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    import signal

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            scope.cancel()
            return


async def _cancel(run: BatchRun, lives: list[Live]) -> None:
    """Cancel every batch of the job that has not ended; journal what the server says."""
    cancelled = 0
    for live in lives:
        state = run.states.states.get(live.chunk.key)
        if state is None or state.batch_id is None or state.status in _ENDED:
            continue
        try:
            batch = await run.api.cancel(state.batch_id)
        except ConflictError:  # it ended since the journal last saw it: nothing to cancel
            batch = await run.api.retrieve(state.batch_id)
            run.states.record(
                live.chunk.key, status=batch.status, request_counts=batch.request_counts
            )
            run.say(f"batch {batch.id}: {batch.status} already")
            continue
        run.states.record(live.chunk.key, status=batch.status, request_counts=batch.request_counts)
        run.say(f"batch {batch.id}: {batch.status}")
        cancelled += 1
    _stop(run.stats, f"cancelled {cancelled} batch(es); run again to collect what they answered")


_ENDED = frozenset({"completed", "failed", "expired", "cancelled", "cancelling"})


def _stop(stats: RunStats, reason: str) -> None:
    stats.stopped_early = True
    stats.stop_reason = reason


def _refuse(run: BatchRun, request: Request, reason: str) -> None:
    """An error record for a request no batch can hold."""
    item = {"error": {"code": "batch_refused", "message": reason}}
    result = answer_of(request, item, Batch(id="", status="failed"), attempt=1).result
    result = dataclasses.replace(result, batch_id=None, attempts=0, endpoint=run.job.endpoint.name)
    run.journal.append(result, request.body_hash)
    run.recorded[request.key] = request.body_hash
    run.stats.add(result)
