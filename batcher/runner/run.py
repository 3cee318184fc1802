"""Sets up and runs a whole job: checks, endpoints, journal, writers, engine, summary.

Everything that can be checked before sending is checked here first (``checks.py``: input
readable, output folder writable, API key present where one is needed), so a bad job sends
nothing. What the run is built from (endpoints, pricer, budget) comes from ``wiring.py``,
shared with the Ray engine; the caller's options are gathered once into a ``RunOptions``
(``options.py``) that the run's steps take.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio

from batcher.config import JobConfig, VariantConfig
from batcher.cost.budget import check_priced
from batcher.cost.pricing import Pricer
from batcher.engine.control import Sinks
from batcher.engine.dispatch import Engine, Lane
from batcher.engine.endpoints import Endpoint
from batcher.errors import ConfigError, OutputError
from batcher.input.field_names import FieldNames, job_field_warnings
from batcher.input.sources import open_sources
from batcher.limits.known_limits import KnownLimits
from batcher.output.compaction import checked_journal
from batcher.output.formats import RejectsWriter, rejects_path
from batcher.output.journal import Journal, journal_path
from batcher.output.live_output import LiveOutput, finish_output, live_output_for
from batcher.output.provenance import provenance
from batcher.output.resume import ResumePlan, RetryErrors
from batcher.runner.checks import base_url_field, check_local_job, check_transport_choice
from batcher.runner.housekeeping import Housekeeping
from batcher.runner.lanes import count_from_now, lanes, open_readers
from batcher.runner.notify import Notices, notices_for
from batcher.runner.options import RunOptions
from batcher.runner.progress import Progress, format_summary, progress_for, split_off
from batcher.runner.quiet_stream import quiet
from batcher.runner.staging import stage
from batcher.runner.stats import RunStats, count_the_run, run_ending, run_warnings
from batcher.runner.status_file import RunStatus
from batcher.runner.wiring import (
    SimServer,
    base_urls,
    build_budget,
    build_pricer,
    endpoint_targets,
    engine_settings,
    open_endpoints,
)
from batcher.storage import origin_beside, origin_of

if TYPE_CHECKING:
    import httpx

    from batcher.output.shape import OutputShape

__all__ = ["RunOptions", "RunReport", "arun_job", "run_job"]


@dataclass(frozen=True, kw_only=True)
class RunReport:
    """What a finished run returns: its statistics and where its files are."""

    stats: RunStats
    output: Path
    rejects: Path | None
    summary: str

    @property
    def exit_code(self) -> int:
        return self.stats.exit_code


@dataclass(frozen=True, kw_only=True)
class _Setting:
    """A run's job, the caller's options and what the checks made of them, for its steps."""

    job: JobConfig
    options: RunOptions
    input_path: Path
    output: Path
    stream: IO[str]
    keys: list[str | None]
    pricer: Pricer
    notices: Notices


def run_job(
    job: JobConfig,
    *,
    restart: bool = False,
    retry_errors: RetryErrors = "none",
    transport: httpx.AsyncBaseTransport | None = None,
    handle_signals: bool = False,
    stream: IO[str] | None = None,
    housekeeping: Housekeeping | None = None,
    sim: SimServer | None = None,
    detach: bool = False,
    cancel: bool = False,
) -> RunReport:
    """Run a job to completion (blocking) and return its report; prints the summary.

    The same as ``arun_job`` (which see) on an event loop of its own.
    """
    run = functools.partial(
        arun_job, job, restart=restart, retry_errors=retry_errors, transport=transport,
        handle_signals=handle_signals, stream=stream, housekeeping=housekeeping, sim=sim,
        detach=detach, cancel=cancel,
    )  # fmt: skip
    return anyio.run(run)


async def arun_job(
    job: JobConfig,
    *,
    restart: bool = False,
    retry_errors: RetryErrors = "none",
    transport: httpx.AsyncBaseTransport | None = None,
    handle_signals: bool = False,
    stream: IO[str] | None = None,
    housekeeping: Housekeeping | None = None,
    sim: SimServer | None = None,
    detach: bool = False,
    cancel: bool = False,
) -> RunReport:
    """Run a job to completion on the running event loop; return its report, print the summary.

    A re-run of the same job resumes from its journal: requests recorded as done are skipped
    (``retry_errors`` re-sends recorded errors: ``"all"`` or only ``"retryable"`` ones), a line
    whose body changed is re-sent; ``restart=True`` forgets the journal and starts over.
    Raises ``ConfigError``/``InputError``/``OutputError`` before anything is sent when the job
    cannot run, and ``ConfigError`` after sending began if the endpoint showed that the job
    cannot work (its host does not resolve, or every answer is a 404: see ``setup_check``),
    with nothing recorded for the requests that met it. The options: see ``RunOptions``.

    A run whose journal starts empty writes its output, in input order, as it goes
    (``LiveOutput``); a run that resumes a journal writes it from the journal at the end
    (``write_output``).

    A job with ``mode = "batch"`` goes through the Batch API instead
    (``batcher.batch.runner.arun_batch_job``): ``detach`` returns once every batch is created,
    ``cancel`` cancels the job's batches; both only in batch mode.
    """
    check_transport_choice(job, transport)
    options = RunOptions(
        restart=restart, retry_errors=retry_errors, transport=transport,
        handle_signals=handle_signals, stream=stream, housekeeping=housekeeping, sim=sim,
        detach=detach, cancel=cancel,
    )  # fmt: skip
    # a remote input copied (a glob's files joined), a remote output's work folder: local
    staging = await anyio.to_thread.run_sync(functools.partial(stage, job, restart=restart))
    try:
        job = staging.job
        with notices_for(job, quiet(options.stream or sys.stderr)) as notices:
            if job.mode == "batch":
                report = await _run_batch(job, options)
            else:
                report = await _run_online(job, options, notices)
            say = functools.partial(print, file=quiet(options.stream or sys.stderr), flush=True)
            await anyio.to_thread.run_sync(staging.upload, say)
            notices.ended(report.stats, report.output)
    finally:
        staging.close()
    return report


async def _run_online(job: JobConfig, options: RunOptions, notices: Notices) -> RunReport:
    """A job sent request by request: checked, run under its journal, its summary printed."""
    for flag, given in (("--detach", options.detach), ("--cancel", options.cancel)):
        if given:
            raise ConfigError(flag, 'only with --mode batch (or [job] mode = "batch")')
    stream = quiet(options.stream or sys.stderr)  # a reader that goes away does not stop the run
    input_path, output = job.require_paths()
    keys = check_local_job(job, input_path, output, sim=options.sim is not None)
    setting = _Setting(
        job=job, options=options, input_path=input_path, output=output, stream=stream,
        keys=keys, pricer=build_pricer(job), notices=notices,
    )  # fmt: skip
    if job.limits.max_cost_usd is not None:  # a model with no price: nothing could be sent
        await anyio.to_thread.run_sync(check_priced, job, setting.pricer)
    # before the journal, so a missing input changes nothing
    sources = open_sources(input_path, max(1, len(job.variants)))
    try:
        # The simulator, if the job has a "sim" endpoint, before the journal: a [sim] table
        # it refuses changes nothing.
        with base_urls(job, options.sim) as urls:
            stats, rejected = await _run_journaled(setting, sources, urls)
    finally:
        for source in sources:
            if source is not sys.stdin.buffer:
                source.close()
    rej = rejects_path(output) if rejected else None
    summary = format_summary(
        stats, name=job.name, output=origin_of(output),
        rejects=origin_beside(output, rej) if rej else None,
        failed=split_off(job, output),
    )  # fmt: skip
    print(summary, file=stream, flush=True)
    return RunReport(stats=stats, output=output, rejects=rej, summary=summary)


async def _run_journaled(
    setting: _Setting, sources: list[IO[bytes]], urls: list[str]
) -> tuple[RunStats, int]:
    """The run under its journal, then its output; the stats and the lines rejected.

    The journal is locked before anything is deleted: ``restart`` empties it only once no
    other run holds it. The lock is held until the output is written.
    """
    job, output, stream, options = setting.job, setting.output, setting.stream, setting.options
    jpath = journal_path(output)
    fresh = options.restart or not jpath.exists()
    started_at = time.time()
    live: LiveOutput | None = None
    status = RunStatus(
        output, job=job.name, mode="online", input_path=setting.input_path, passes=len(sources)
    )
    # the status file only while the journal is ours: a run it refuses leaves it alone
    with checked_journal(jpath, output, restart=options.restart) as journal, status.running():
        try:
            if journal.torn_note:
                print(journal.torn_note, file=stream)
            plan = ResumePlan(journal.entries, retry_errors=options.retry_errors)
            metadata = functools.partial(provenance, job, setting.input_path)
            shape = functools.partial(_output_shape, job)  # pyarrow: made in the writer's thread
            variants, split = [v.name for v in job.variants], job.split_errors
            live = live_output_for(
                journal, output, setting.input_path, metadata, shape,
                variants=variants, split_errors=split,
            )  # fmt: skip
            stats, rejected = await _run_async(setting, sources, urls, journal, live, plan, status)
            if stats.config_error is not None:
                # The endpoint showed the job cannot work: no output (the except below
                # removes the live one's .partial), and the journal goes if it is empty.
                field = stats.config_error_field or base_url_field(job, stats.config_error_endpoint)
                if fresh:
                    journal.forget_if_empty()
                raise ConfigError(field, stats.config_error)
            journal.sync()  # the journal on disk before the output derived from it
            if options.housekeeping is not None:
                options.housekeeping.before_output()
            # in a thread: a notebook's event loop keeps serving while pyarrow writes
            finish = functools.partial(
                finish_output, variants=variants, split_errors=split,
                ending=functools.partial(run_ending, started_at=started_at),
            )  # fmt: skip
            await anyio.to_thread.run_sync(finish, journal, live, output, stats, metadata, shape)
        except BaseException:
            if live is not None:
                live.abort()  # the .partial, while the lock is ours; an output is left alone
            raise
    return stats, rejected


def _output_shape(job: JobConfig) -> OutputShape:
    """The output's typed columns (``output.shape``), imported with pyarrow when needed."""
    from batcher.output.shape import output_shape

    return output_shape(job)


async def _run_async(
    setting: _Setting,
    sources: list[IO[bytes]],
    urls: list[str],
    journal: Journal,
    live: LiveOutput | None,
    plan: ResumePlan,
    status: RunStatus,
) -> tuple[RunStats, int]:
    """The requests sent, recorded to ``live`` (the journal and the output) when given, else
    to the journal; the stats and the lines rejected. ``sources`` holds the input opened once
    per variant (once for a job without variants); ``urls``: the endpoints' base URLs."""
    job, output, options = setting.job, setting.output, setting.options
    stats = RunStats()
    fields = FieldNames()  # a near-miss name warned about in the job is not warned again
    for message in job_field_warnings(job, fields):
        print(message, file=setting.stream, flush=True)
    progress = await progress_for(
        stats, setting.input_path, passes=len(sources), enabled=job.progress,
        stream=setting.stream, variants=[v.name for v in job.variants],
    )  # fmt: skip
    variants: list[VariantConfig | None] = list(job.variants) or [None]
    known = KnownLimits.default()
    targets = endpoint_targets(job, urls, setting.keys, known)
    readers = open_readers(job, sources, variants, targets, progress, fields)
    budget = build_budget(job, journal.spent_before)
    setting.notices.follow(stats, budget, progress)
    endpoints: list[Endpoint] = []
    try:
        rejects_path(output).unlink(missing_ok=True)  # this run's rejects only, or none
        with RejectsWriter(rejects_path(output)) as rejects:
            async with contextlib.AsyncExitStack() as clients:
                endpoints = await open_endpoints(
                    job, targets, clients, known=known, transport=options.transport,
                    warn=progress.note,
                )  # fmt: skip
                progress.watch_endpoints(endpoints)
                status.follow(stats, endpoints)
                sinks = Sinks(
                    results=journal if live is None else live,
                    rejects=rejects,
                    stats=stats,
                    progress=progress,
                )
                engine = Engine(
                    endpoints, engine_settings(job), sinks, pricer=setting.pricer, plan=plan,
                    budget=budget, on_token_limit=functools.partial(count_from_now, readers),
                )  # fmt: skip
                if live is not None:  # rows written in input order as the lines are settled
                    live.follow(engine.watermark.low)
                await _run_engine(setting, engine, lanes(readers, variants, endpoints), progress)
            rejected = rejects.count
    except OSError as exc:
        raise OutputError(f"cannot write rejects: {exc.strerror or exc}") from None
    finally:
        progress.close()
    count_the_run(stats, readers, endpoints, budget)
    streamed = job.request.get("stream") is True
    for message in run_warnings(stats, setting.pricer, streamed=streamed):
        print(message, file=setting.stream)
    return stats, rejected


async def _run_engine(
    setting: _Setting, engine: Engine, lanes: list[Lane], progress: Progress
) -> None:
    """Run the engine over the lanes (one lane on every endpoint: its batches alone), with
    the owning process's housekeeping, the display's heartbeat and the notices' watch
    (stalls, budget) beside it."""
    one = len(lanes) == 1 and lanes[0].endpoints is None
    housekeeping = setting.options.housekeeping
    async with anyio.create_task_group() as background:
        if housekeeping is not None:
            background.start_soon(housekeeping.during_run)
        background.start_soon(progress.heartbeat)
        background.start_soon(setting.notices.watch)
        handle_signals = setting.options.handle_signals
        await engine.run(lanes[0].batches if one else lanes, handle_signals=handle_signals)
        background.cancel_scope.cancel()


async def _run_batch(job: JobConfig, options: RunOptions) -> RunReport:
    """A batch-mode job, through the Batch API (its modules imported only for one)."""
    from batcher.batch.runner import arun_batch_job

    if options.retry_errors != "none":
        raise ConfigError(
            "--retry-errors", "not in batch mode: failed requests go into a later batch"
        )
    if options.detach and any(e.is_sim for e in job.all_endpoints):
        raise ConfigError(
            "--detach",
            'the built-in simulator (base_url = "sim") lasts as long as this process, so its '
            "batches could not be collected later: start `batcher sim` and give its URL instead",
        )
    return await arun_batch_job(
        job, restart=options.restart, detach=options.detach, cancel=options.cancel,
        transport=options.transport, stream=options.stream,
        handle_signals=options.handle_signals, sim=options.sim,
    )  # fmt: skip
