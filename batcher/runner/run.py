"""Sets up and runs a whole job: checks, endpoints, journal, writers, engine, summary.

Everything that can be checked before sending is checked here first (``checks.py``: input
readable, output folder writable, API key present where one is needed), so a bad job sends
nothing. What the run is built from (endpoints, pricer, budget) comes from ``wiring.py``,
shared with the Ray engine.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio

from batcher.config import JobConfig, VariantConfig
from batcher.cost.budget import Budget, check_priced
from batcher.cost.pricing import Pricer
from batcher.engine.control import Sinks
from batcher.engine.dispatch import Engine, Lane
from batcher.engine.endpoints import Endpoint
from batcher.errors import ConfigError, OutputError
from batcher.input.field_names import FieldNames, job_field_warnings
from batcher.input.reader import Reader
from batcher.input.sources import count_lines, open_sources
from batcher.limits.known_limits import KnownLimits
from batcher.output.formats import RejectsWriter, rejects_path
from batcher.output.journal import Journal, journal_path
from batcher.output.live_output import LiveOutput, live_output_for, write_output
from batcher.output.provenance import provenance
from batcher.output.resume import ResumePlan, RetryErrors
from batcher.runner.checks import (
    api_keys,
    base_url_field,
    check_not_the_input,
    check_output_writable,
    check_sim_available,
)
from batcher.runner.housekeeping import Housekeeping
from batcher.runner.lanes import count_from_now, lanes, open_readers
from batcher.runner.progress import Progress, format_summary
from batcher.runner.quiet_stream import quiet
from batcher.runner.stats import RunStats, answer_warnings
from batcher.runner.wiring import (
    SimServer,
    base_urls,
    build_budget,
    build_pricer,
    endpoint_targets,
    engine_settings,
    open_endpoints,
)

if TYPE_CHECKING:
    import httpx

__all__ = ["RunReport", "arun_job", "run_job"]


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
    """A run's job and the caller's choices for it, as the steps of a run need them."""

    job: JobConfig
    input_path: Path
    output: Path
    stream: IO[str]
    keys: list[str | None]
    transport: httpx.AsyncBaseTransport | None
    handle_signals: bool
    housekeeping: Housekeeping | None


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
        arun_job,
        job,
        restart=restart,
        retry_errors=retry_errors,
        transport=transport,
        handle_signals=handle_signals,
        stream=stream,
        housekeeping=housekeeping,
        sim=sim,
        detach=detach,
        cancel=cancel,
    )
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
    with nothing recorded for the requests that met it. ``transport`` replaces the HTTP
    transport (tests).

    A run whose journal starts empty writes its output as it goes (``LiveOutput``) when its
    input is a file of at most ``live_output.LIVE_OUTPUT_MAX_BYTES``; otherwise (a larger
    input, stdin, a resumed journal) it writes the output from the journal at the end
    (``write_output``).
    ``housekeeping``: what the process that owns the run does around it (the CLI's tuning);
    a library run has none and changes nothing process-wide. ``sim``: starts the simulator
    behind ``base_url = "sim"`` (without it such an endpoint is a ``ConfigError``).

    A job with ``mode = "batch"`` goes through the Batch API instead
    (``batcher.batch.runner.arun_batch_job``): ``detach`` returns once every batch is created,
    ``cancel`` cancels the job's batches; both only in batch mode.
    """
    if job.mode == "batch":
        return await _run_batch(job, restart, retry_errors, transport, handle_signals, stream,
                                sim, detach, cancel)  # fmt: skip
    for flag, given in (("--detach", detach), ("--cancel", cancel)):
        if given:
            raise ConfigError(flag, 'only with --mode batch (or [job] mode = "batch")')
    stream = quiet(stream or sys.stderr)  # a reader that goes away does not stop the run
    input_path, output = job.require_paths()
    keys = _check_job(job, input_path, output, sim is not None)
    setting = _Setting(
        job=job, input_path=input_path, output=output, stream=stream, keys=keys,
        transport=transport, handle_signals=handle_signals, housekeeping=housekeeping,
    )  # fmt: skip
    pricer = build_pricer(job)
    if job.limits.max_cost_usd is not None:  # a model with no price: nothing could be sent
        await anyio.to_thread.run_sync(check_priced, job, pricer)
    # before the journal, so a missing input changes nothing
    sources = open_sources(input_path, max(1, len(job.variants)))
    try:
        # The simulator, if the job has a "sim" endpoint, before the journal: a [sim] table
        # it refuses changes nothing.
        with base_urls(job, sim) as urls:
            stats, rejected = await _run_journaled(
                setting, sources, urls, pricer, restart, retry_errors
            )
    finally:
        for source in sources:
            if source is not sys.stdin.buffer:
                source.close()
    rej = rejects_path(output) if rejected else None
    summary = format_summary(
        stats, name=job.name, output=str(output), rejects=str(rej) if rej else None
    )
    print(summary, file=stream, flush=True)
    return RunReport(stats=stats, output=output, rejects=rej, summary=summary)


def _check_job(job: JobConfig, input_path: Path, output: Path, sim: bool) -> list[str | None]:
    """The checks made before anything is sent; the endpoints' API keys."""
    check_output_writable(output)
    if output.is_dir():
        raise ConfigError(
            "job.output",
            f"{output} is a folder (the Ray engine's output?): choose another output, or run "
            "the job with --engine ray",
        )
    check_not_the_input(input_path, output)
    keys = api_keys(job)
    check_sim_available(job, sim)
    return keys


async def _run_journaled(
    setting: _Setting,
    sources: list[IO[bytes]],
    urls: list[str],
    pricer: Pricer,
    restart: bool,
    retry_errors: RetryErrors,
) -> tuple[RunStats, int]:
    """The run under its journal, then its output; the stats and the lines rejected.

    The journal is locked before anything is deleted: ``restart`` empties it only once no
    other run holds it. The lock is held until the output is written.
    """
    job, output, stream = setting.job, setting.output, setting.stream
    jpath = journal_path(output)
    fresh = restart or not jpath.exists()
    live: LiveOutput | None = None
    with Journal(jpath, restart=restart) as journal:
        try:
            if journal.torn_bytes:
                print(
                    f"batcher: the journal's last record was cut short ({journal.torn_bytes} "
                    "bytes, by a crash or a full disk); that request will be sent again",
                    file=stream,
                )
            plan = ResumePlan(journal.entries, retry_errors=retry_errors)
            live = live_output_for(
                journal, setting.output, setting.input_path,
                functools.partial(provenance, setting.job, setting.input_path),
            )  # fmt: skip
            stats, rejected = await _run_async(setting, sources, urls, journal, live, plan, pricer)
            if stats.config_error is not None:
                # The endpoint showed the job cannot work: no output (the except below
                # removes the live one's .partial), and the journal goes if it is empty.
                field = stats.config_error_field or base_url_field(job, stats.config_error_endpoint)
                if fresh:
                    journal.forget_if_empty()
                raise ConfigError(field, stats.config_error)
            journal.sync()  # the journal on disk before the output derived from it
            if setting.housekeeping is not None:
                setting.housekeeping.before_output()
            await _write(setting, journal, live, stats)
        except BaseException:
            if live is not None:
                live.abort()  # the .partial, while the lock is ours; an output is left alone
            raise
    return stats, rejected


async def _write(
    setting: _Setting, journal: Journal, live: LiveOutput | None, stats: RunStats
) -> None:
    """Finish the output: the live one, else (none, or it failed) from the journal. In a
    thread: a notebook's event loop keeps serving while pyarrow writes."""
    if live is not None and await anyio.to_thread.run_sync(live.close):
        stats.output_ok, stats.output_error = live.ok, live.error
        return
    metadata = provenance(setting.job, setting.input_path)
    await anyio.to_thread.run_sync(write_output, journal, setting.output, stats, metadata)


async def _run_async(
    setting: _Setting,
    sources: list[IO[bytes]],
    urls: list[str],
    journal: Journal,
    live: LiveOutput | None,
    plan: ResumePlan,
    pricer: Pricer,
) -> tuple[RunStats, int]:
    """The requests sent, recorded to ``live`` (the journal and the output) when given, else
    to the journal; the stats and the lines rejected. ``sources`` holds the input opened once
    per variant (once for a job without variants); ``urls``: the endpoints' base URLs."""
    job, output = setting.job, setting.output
    stats = RunStats()
    fields = FieldNames()  # a near-miss name warned about in the job is not warned again
    for message in job_field_warnings(job, fields):
        print(message, file=setting.stream, flush=True)
    progress = await _progress(setting, stats, len(sources))
    variants: list[VariantConfig | None] = list(job.variants) or [None]
    known = KnownLimits.default()
    targets = endpoint_targets(job, urls, setting.keys, known)
    readers = open_readers(job, sources, variants, targets, progress, fields)
    budget = build_budget(job, journal.spent_before)
    endpoints: list[Endpoint] = []
    try:
        rejects_path(output).unlink(missing_ok=True)  # this run's rejects only, or none
        with RejectsWriter(rejects_path(output)) as rejects:
            async with contextlib.AsyncExitStack() as clients:
                endpoints = await open_endpoints(
                    job, targets, clients, known=known, transport=setting.transport,
                    warn=progress.note,
                )  # fmt: skip
                sinks = Sinks(
                    results=journal if live is None else live,
                    rejects=rejects,
                    stats=stats,
                    progress=progress,
                )
                engine = Engine(
                    endpoints, engine_settings(job), sinks, plan=plan, pricer=pricer,
                    budget=budget, on_token_limit=functools.partial(count_from_now, readers),
                )  # fmt: skip
                await _run_engine(setting, engine, lanes(readers, variants, endpoints))
            rejected = rejects.count
    except OSError as exc:
        raise OutputError(f"cannot write rejects: {exc.strerror or exc}") from None
    finally:
        progress.close()
    _count_the_run(stats, readers, endpoints, budget)
    _warn_after_run(setting, stats, pricer)
    return stats, rejected


async def _progress(setting: _Setting, stats: RunStats, passes: int) -> Progress:
    """The progress display (its total: the input's lines, once per pass over it)."""
    job = setting.job
    total = (
        await anyio.to_thread.run_sync(count_lines, setting.input_path) if job.progress else None
    )
    if total is not None:
        total *= passes
    return Progress(stats, total=total, enabled=job.progress, stream=setting.stream)


async def _run_engine(setting: _Setting, engine: Engine, lanes: list[Lane]) -> None:
    """Run the engine over the lanes (one lane on every endpoint: its batches alone), with
    the owning process's housekeeping beside it."""
    one = len(lanes) == 1 and lanes[0].endpoints is None
    async with anyio.create_task_group() as background:
        if setting.housekeeping is not None:
            background.start_soon(setting.housekeeping.during_run)
        await engine.run(lanes[0].batches if one else lanes, handle_signals=setting.handle_signals)
        background.cancel_scope.cancel()


def _count_the_run(
    stats: RunStats, readers: list[Reader], endpoints: list[Endpoint], budget: Budget | None
) -> None:
    """What the run's parts counted, into its stats; a budget stopped before anything was
    sent is the job's configuration error."""
    stats.lines_read = readers[0].lines_read
    stats.rate_limited = sum(e.limits.rate_limited for e in endpoints)
    stats.overloaded = sum(e.limits.overloaded for e in endpoints)
    if budget is not None and budget.misconfigured and not stats.submitted:
        # stopped by the job's configuration (a model with no price) before sending anything
        reason = stats.stop_reason or "no price known for a model of the job"
        stats.config_error = reason.removeprefix("--max-cost: ")
        stats.config_error_field = "--max-cost"


def _warn_after_run(setting: _Setting, stats: RunStats, pricer: Pricer) -> None:
    """Models without a price, and what the answers suggest about the job."""
    stream = setting.stream
    for model in pricer.unknown_models:
        print(
            f"batcher: warning: no price known for model {model!r}: its cost is left empty; "
            f'set [pricing."{model}"] input/output (USD per million tokens) in the job',
            file=stream,
        )
    streamed = setting.job.request.get("stream") is True
    for message in answer_warnings(stats, streamed=streamed):
        print(message, file=stream)


async def _run_batch(
    job: JobConfig,
    restart: bool,
    retry_errors: RetryErrors,
    transport: httpx.AsyncBaseTransport | None,
    handle_signals: bool,
    stream: IO[str] | None,
    sim: SimServer | None,
    detach: bool,
    cancel: bool,
) -> RunReport:
    """A batch-mode job, through the Batch API (its modules imported only for one)."""
    from batcher.batch.runner import arun_batch_job

    if retry_errors != "none":
        raise ConfigError(
            "--retry-errors", "not in batch mode: failed requests go into a later batch"
        )

    if detach and any(e.is_sim for e in job.all_endpoints):
        raise ConfigError(
            "--detach",
            'the built-in simulator (base_url = "sim") lasts as long as this process, so its '
            "batches could not be collected later: start `batcher sim` and give its URL instead",
        )

    return await arun_batch_job(
        job, restart=restart, detach=detach, cancel=cancel, transport=transport, stream=stream,
        handle_signals=handle_signals, sim=sim,
    )  # fmt: skip
