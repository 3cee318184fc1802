"""Sets up and runs a whole job: checks, simulator, client, writers, engine, summary.

Everything that can be checked before sending is checked here first (input readable, output
folder writable, API key present where one is needed), so a bad job sends nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio

from batcher.config import DEFAULT_BASE_URL, EndpointConfig, JobConfig, VariantConfig
from batcher.cost.budget import Budget, check_priced
from batcher.cost.pricing import Pricer, parse_pricing
from batcher.cost.tokens import release_encodings, trim_malloc
from batcher.engine.core import READ_BATCH, Engine, Lane
from batcher.engine.endpoints import Endpoint
from batcher.engine.outage import Outage
from batcher.errors import ConfigError, OutputError
from batcher.http.client import ChatClient, check_api_key
from batcher.input.field_names import FieldNames, job_field_warnings
from batcher.input.reader import Reader, count_lines, open_input
from batcher.limits.endpoint import Limits
from batcher.limits.known_limits import KnownLimits
from batcher.output.formats import RejectsWriter, output_format
from batcher.output.journal import Journal, journal_path
from batcher.output.live_output import LiveOutput
from batcher.output.provenance import provenance
from batcher.output.resume import ResumePlan, RetryErrors
from batcher.runner.housekeeping import Housekeeping
from batcher.runner.progress import Progress, format_summary
from batcher.runner.quiet_stream import quiet
from batcher.runner.stats import RunStats, answer_warnings

if TYPE_CHECKING:
    import httpx

#: Below this much free space in the output folder, a run does not start.
MIN_FREE_BYTES = 16 * 2**20
#: Seconds between two ``malloc_trim`` calls during a lean run (see ``_trim_malloc_every``).
TRIM_EVERY_S = 1.0
#: The largest input a lean run (the CLI's) writes its output for as it goes (see
#: ``_small_input``): about 35,000 short requests.
LIVE_OUTPUT_MAX_BYTES = 8 * 2**20
#: Lines in the first trip to the reading thread; each later trip reads twice as many, up to
#: ``READ_BATCH``. The pool then opens a few requests at a time: each few's connections are
#: made and their requests written while the next are read and started. Read 256 at once,
#: all 256 connections were opened before the first request was written, ~50 ms later at 256
#: in flight; the whole run ended ~60 ms later at 5,000 requests.
FIRST_READ_BATCH = 4
#: Parquet row groups of an output written as the run goes from a small input (at most
#: ``LIVE_OUTPUT_MAX_BYTES``), instead of the writer's 5,000: the last row group is written
#: after the last answer, so a smaller one ends the run sooner (5,000 rows took ~20 ms, 1,000
#: ~5 ms), for a file ~5 % larger. Large inputs keep 5,000: every row group's footer
#: metadata (~28 KB) stays in memory until the file is closed.
SMALL_ROW_GROUP_SIZE = 1_000
#: Rows between two ``malloc_trim`` calls while a lean run writes its output (a row group).
TRIM_EVERY_ROWS = 5_000


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


def rejects_path(output: Path) -> Path:
    """Where rejected lines go: ``OUTPUT.rejects.jsonl`` beside the output."""
    return output.with_name(output.name + ".rejects.jsonl")


def run_job(
    job: JobConfig,
    *,
    restart: bool = False,
    retry_errors: RetryErrors = "none",
    transport: httpx.AsyncBaseTransport | None = None,
    handle_signals: bool = False,
    stream: IO[str] | None = None,
    lean: bool = False,
    housekeeping: Housekeeping | None = None,
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
        lean=lean,
        housekeeping=housekeeping,
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
    lean: bool = False,
    housekeeping: Housekeeping | None = None,
) -> RunReport:
    """Run a job to completion on the running event loop; return its report, print the summary.

    A re-run of the same job resumes from its journal: requests recorded as done are skipped
    (``retry_errors`` re-sends recorded errors: ``"all"`` or only ``"retryable"`` ones), a line
    whose body changed is re-sent; ``restart=True`` forgets the journal and starts over.
    Raises ``ConfigError``/``InputError``/``OutputError`` before anything is sent when the job
    cannot run, and ``ConfigError`` after sending began if the endpoint showed that the job
    cannot work (its host does not resolve, or every answer is a 404: see ``setup_check``),
    with nothing recorded for the requests that met it. ``transport`` replaces the HTTP
    transport (tests). ``lean`` frees the token tables (about 45 MB; loaded only when a TPM
    limit or ``--max-cost`` needs counts) before the output is finished, looks model prices
    up in a child process (see ``Pricer``), and returns free heap pages to the system every
    ``TRIM_EVERY_S`` during the run: for a process that ends with the run, as the CLI's (a
    later run in the same process loads the tables again).

    A run whose journal starts empty writes its output as it goes (``LiveOutput``); one that
    resumes a journal writes it from the journal at the end (``write_output``).
    ``housekeeping``: what the process that owns the run does around it (the CLI's tuning);
    a library run has none and changes nothing process-wide.
    """
    stream = quiet(stream or sys.stderr)  # a reader that goes away does not stop the run
    input_path, output = job.require_paths()
    check_output_writable(output)
    if output.is_dir():
        raise ConfigError(
            "job.output",
            f"{output} is a folder (the Ray engine's output?): choose another output, or run "
            "the job with --engine ray",
        )
    check_not_the_input(input_path, output)
    api_keys = _api_keys(job)
    if job.limits.max_cost_usd is not None:  # a model with no price: nothing could be sent
        await anyio.to_thread.run_sync(check_priced, job, _pricer(job, lean))
    # before the journal, so a missing input changes nothing
    sources = _open_sources(input_path, max(1, len(job.variants)))
    live: LiveOutput | None = None
    try:
        # Locked before anything is deleted: --restart empties the journal only once no
        # other run holds it. The lock is held until the output is written.
        jpath = journal_path(output)
        fresh = restart or not jpath.exists()
        with Journal(jpath, restart=restart) as journal:
            try:
                if journal.torn_bytes:
                    print(
                        f"batcher: the journal's last record was cut short ({journal.torn_bytes} "
                        "bytes, by a crash or a full disk); that request will be sent again",
                        file=stream,
                    )
                plan = ResumePlan(journal.entries, retry_errors=retry_errors)
                # A fresh journal: the output is written as the run goes (see live_output).
                small = _small_input(input_path)
                if not journal.entries and (not lean or small):
                    live = LiveOutput(
                        journal,
                        output,
                        functools.partial(provenance, job, input_path),
                        row_group_size=SMALL_ROW_GROUP_SIZE if small else None,
                    )
                with _base_urls(job) as base_urls:
                    stats, rejected = await _run_async(
                        job, sources, input_path, output, journal, live, plan,
                        list(zip(base_urls, api_keys, strict=True)), transport, handle_signals,
                        stream, lean, housekeeping,
                    )  # fmt: skip
                if stats.config_error is not None:
                    # The endpoint showed the job cannot work: no output (the except below
                    # removes the live one's .partial), and the journal goes if it is empty.
                    field = stats.config_error_field or _base_url_field(
                        job, stats.config_error_endpoint
                    )
                    if fresh:
                        journal.forget_if_empty()
                    raise ConfigError(field, stats.config_error)
                journal.sync()  # the journal on disk before the output derived from it
                if lean:
                    release_encodings()
                if housekeeping is not None:
                    housekeeping.before_output()
                # in a thread: a notebook's event loop keeps serving while pyarrow writes
                if live is not None and await anyio.to_thread.run_sync(live.close):
                    stats.output_ok, stats.output_error = live.ok, live.error
                else:
                    write = functools.partial(
                        write_output,
                        journal,
                        output,
                        stats,
                        provenance(job, input_path),
                        trim_every=TRIM_EVERY_ROWS if lean else 0,
                    )
                    await anyio.to_thread.run_sync(write)
            except BaseException:
                if live is not None:
                    live.abort()  # the .partial, while the lock is ours; an output is left alone
                raise
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


def _open_sources(path: Path, count: int) -> list[IO[bytes]]:
    """The input opened ``count`` times (once per variant: each reads it through).

    Standard input cannot be read twice, so with several readers it is first copied to a
    temporary file (unlinked at once: it lives as long as the open handles).
    """
    if count == 1 or str(path) != "-":
        sources: list[IO[bytes]] = []
        try:
            for _ in range(count):
                sources.append(open_input(path))
        except BaseException:
            for source in sources:
                source.close()
            raise
        return sources
    with tempfile.NamedTemporaryFile(prefix="batcher-stdin-", suffix=".jsonl") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool)
        spool.flush()
        return _open_sources(Path(spool.name), count)


async def _run_async(
    job: JobConfig,
    sources: list[IO[bytes]],
    input_path: Path,
    output: Path,
    journal: Journal,
    live: LiveOutput | None,
    plan: ResumePlan,
    targets: list[tuple[str, str | None]],
    transport: httpx.AsyncBaseTransport | None,
    handle_signals: bool,
    stream: IO[str],
    lean: bool,
    housekeeping: Housekeeping | None,
) -> tuple[RunStats, int]:
    """The run itself; ``targets`` are the endpoints' (base URL, API key), in job order.

    Results go to ``live`` (the journal and the output) when given, else to the journal.

    ``sources`` holds the input opened once per variant (once for a job without variants).
    """
    total = await anyio.to_thread.run_sync(count_lines, input_path) if job.progress else None
    if total is not None:
        total *= len(sources)
    stats = RunStats()
    fields = FieldNames()
    for message in job_field_warnings(job, fields):
        print(message, file=stream, flush=True)
    progress = Progress(stats, total=total, enabled=job.progress, stream=stream)
    variants: list[VariantConfig | None] = list(job.variants) or [None]
    # What each endpoint announced on an earlier run: it then starts without a probe.
    known = KnownLimits.default()
    remembered = [
        None if known is None or config.is_sim else known.get(base_url)
        for config, (base_url, _) in zip(job.all_endpoints, targets, strict=True)
    ]
    token_limit_known = any(a is not None and a.tpm is not None for a in remembered)
    readers = [
        Reader(
            source,
            job.request,
            encoding=job.limits.encoding,
            variant=variant,
            count_tokens=job.counts_tokens or token_limit_known,
            fields=fields,
            warn=functools.partial(_note_from_thread, progress),
        )
        for source, variant in zip(sources, variants, strict=True)
    ]
    pricer = _pricer(job, lean)
    cap = job.limits.max_cost_usd
    budget = Budget(cap, spent_before=journal.spent_before) if cap is not None else None
    try:
        rejects_path(output).unlink(missing_ok=True)  # this run's rejects only, or none
        with RejectsWriter(rejects_path(output)) as rejects:
            async with contextlib.AsyncExitStack() as clients:
                endpoints = []
                for config, (base_url, api_key), announced in zip(
                    job.all_endpoints, targets, remembered, strict=True
                ):
                    concurrency = config.concurrency or job.limits.concurrency
                    client = ChatClient(
                        base_url,
                        api_key=api_key,
                        headers=config.headers,
                        timeout_s=job.retry.timeout_s,
                        max_connections=concurrency,
                        transport=transport,
                        max_response_bytes=job.limits.max_response_bytes,
                    )
                    await clients.enter_async_context(client)
                    limits = Limits(
                        rpm=config.rpm or job.limits.rpm,
                        tpm=config.tpm or job.limits.tpm,
                        concurrency=concurrency,
                    )
                    limits.checks.warn = progress.note
                    if announced is not None:
                        limits.start_from(announced)
                    outage = Outage(patience_s=job.retry.outage_patience_s)
                    endpoints.append(
                        Endpoint(
                            name=config.name,
                            client=client,
                            limits=limits,
                            outage=outage,
                            weight=config.weight,
                            remember=None
                            if known is None or config.is_sim
                            else functools.partial(_remember, known, base_url),
                        )
                    )
                by_name = {e.name: e for e in endpoints}
                lanes = [
                    Lane(
                        batches=reader.batches(READ_BATCH, first=FIRST_READ_BATCH),
                        endpoints=[by_name[n] for n in variant.endpoints]
                        if variant is not None and variant.endpoints
                        else None,
                    )
                    for reader, variant in zip(readers, variants, strict=True)
                ]
                engine = Engine(
                    endpoints=endpoints,
                    retry=job.retry,
                    concurrency=sum(e.limits.max_concurrency for e in endpoints),
                    results=journal if live is None else live,
                    rejects=rejects,
                    stats=stats,
                    progress=progress,
                    plan=plan,
                    pricer=pricer,
                    budget=budget,
                    grace_s=job.grace_s,
                    outage_patience_s=job.retry.outage_patience_s,
                    validate=job.validate,
                    encoding=job.limits.encoding,
                    # pyarrow (~50 ms) and the provenance while the first answers are awaited
                    warm_up=None if live is None else live.prepare,
                    on_token_limit=functools.partial(_count_from_now, readers),
                )
                async with anyio.create_task_group() as background:
                    if lean:
                        background.start_soon(_trim_malloc_every, TRIM_EVERY_S)
                    if housekeeping is not None:
                        background.start_soon(housekeeping.during_run)
                    await engine.run(
                        lanes[0].batches
                        if len(lanes) == 1 and lanes[0].endpoints is None
                        else lanes,
                        handle_signals=handle_signals,
                    )
                    background.cancel_scope.cancel()
            rejected = rejects.count
    except OSError as exc:
        raise OutputError(f"cannot write rejects: {exc.strerror or exc}") from None
    finally:
        progress.close()
    stats.lines_read = readers[0].lines_read
    stats.rate_limited = sum(e.limits.rate_limited for e in endpoints)
    stats.overloaded = sum(e.limits.overloaded for e in endpoints)
    if budget is not None and budget.misconfigured and not stats.submitted:
        # stopped by the job's configuration (a model with no price) before sending anything
        reason = stats.stop_reason or "no price known for a model of the job"
        stats.config_error = reason.removeprefix("--max-cost: ")
        stats.config_error_field = "--max-cost"
    for model in pricer.unknown_models:
        print(
            f"batcher: warning: no price known for model {model!r}: its cost is left empty; "
            f'set [pricing."{model}"] input/output (USD per million tokens) in the job',
            file=stream,
        )
    for message in answer_warnings(stats, streamed=job.request.get("stream") is True):
        print(message, file=stream)
    return stats, rejected


def _base_url_field(job: JobConfig, endpoint: str | None) -> str:
    """The job field of the named endpoint's base URL, as errors name it."""
    names = [e.name for e in job.endpoints]
    if endpoint not in names:
        return "endpoint.base_url"
    return f"endpoints[{names.index(endpoint)}].base_url"


def _pricer(job: JobConfig, lean: bool) -> Pricer:
    overrides, discount = parse_pricing(job.pricing)
    return Pricer(
        overrides,
        provider_api_url=None if job.endpoint.is_sim else job.endpoint.base_url,
        batch_discount=discount,
        out_of_process=lean,
    )


def _note_from_thread(progress: Progress, message: str) -> None:
    """Show ``message`` from a reading thread: on the event loop, where the bar is drawn."""
    try:
        anyio.from_thread.run_sync(progress.note, message)
    except RuntimeError:  # not a worker thread of the run (a reader iterated directly)
        progress.note(message)


def _remember(known: KnownLimits, base_url: str, limits: Limits) -> None:
    limits.forget_unconfirmed()  # what this run's server did not announce is not kept
    known.put(base_url, limits.announced())


def _count_from_now(readers: list[Reader]) -> None:
    for reader in readers:
        reader.count_from_now()


def _small_input(path: Path) -> bool:
    """Whether a lean run writes its output as it goes: an input file of at most
    ``LIVE_OUTPUT_MAX_BYTES`` (stdin's size is unknown: no).

    Writing as the run goes keeps pyarrow (~35 MB) resident during the run, and the row
    groups' buffers freed among the requests' objects fragment the heap: 110 MB peak at
    100,000 requests and 129 MB at a million (bench/memory.py), where writing at the end
    peaks at 98 and 105 MB. Past this size the flat memory wins; the end's conversion
    (~30 µs a record) is then small next to the run it ends.
    """
    if str(path) == "-":
        return False
    try:
        return path.stat().st_size <= LIVE_OUTPUT_MAX_BYTES
    except OSError:
        return False


async def _trim_malloc_every(seconds: float) -> None:
    """Give free heap pages back to the system every ``seconds``, for as long as the run lasts.

    Each request allocates and frees a few kB; glibc's heap fragments and its resident size
    creeps up by about 30 bytes a request (10 MB over a million), free pages it keeps but
    never returns by itself. ``malloc_trim`` returns them (3-4 ms, under the heap's lock).
    Every second: with the output written as the run goes, the Arrow buffers of each row
    group are freed among the requests' objects, and trimming every 10 s let the heap grow
    by ~20 MB in between (bench/memory.py: 100,000 requests peaked at 120 MB, 110 MB with 1 s).
    """
    while True:
        await anyio.sleep(seconds)
        trim_malloc()


def write_output(
    journal: Journal,
    output: Path,
    stats: RunStats,
    metadata: dict[str, str] | None = None,
    *,
    trim_every: int = 0,
) -> None:
    """Write the output from the journal's latest records, atomically (``.partial`` + rename).

    ``trim_every`` > 0 gives free heap pages back to the system every that many rows: building
    each row group's arrays fragments glibc's heap, whose resident size otherwise grows by
    about 25 bytes a row (25 MB over a million).
    """
    from batcher.output.writers import open_writer  # pyarrow: imported once the requests are done

    ok = error = 0
    with open_writer(output, metadata=metadata) as writer:
        for result in journal.results():
            writer.write(result)
            if result.status == "ok":
                ok += 1
            else:
                error += 1
            if trim_every and (ok + error) % trim_every == 0:
                trim_malloc()
    stats.output_ok, stats.output_error = ok, error


def check_not_the_input(input_path: Path, output: Path) -> None:
    """Refuse an output (or its journal or rejects file) that is the input itself."""
    if str(input_path) == "-" or not input_path.exists():
        return
    for produced in (output, journal_path(output), rejects_path(output)):
        same = produced.samefile(input_path) if produced.exists() else False
        if same or produced.resolve() == input_path.resolve():
            raise ConfigError("job.output", f"{produced} is the input: it would be overwritten")


def check_output_writable(output: Path) -> None:
    """Fail before sending anything if the output is unusable: format, folder, free space."""
    output_format(output)
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError("job.output", f"folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".batcher-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            "job.output", f"folder {folder} is not writable: {exc.strerror}"
        ) from None
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(
            "job.output",
            f"only {free // 1024} KiB free in {folder}; free some space (batcher needs at least "
            f"{MIN_FREE_BYTES // 2**20} MiB for its journal and output)",
        )


def _api_keys(job: JobConfig) -> list[str | None]:
    """Each endpoint's API key, from its variable; checked before anything is sent."""
    keys = []
    for i, endpoint in enumerate(job.all_endpoints):
        field = f"endpoints[{i}].api_key_env" if job.endpoints else "endpoint.api_key_env"
        keys.append(_api_key(endpoint, field))
    return keys


def _api_key(endpoint: EndpointConfig, field: str) -> str | None:
    if endpoint.is_sim:
        return None
    key = os.environ.get(endpoint.api_key_env) or None
    if key is not None:
        try:
            check_api_key(key)
        except ValueError as exc:
            raise ConfigError(field, f"${endpoint.api_key_env}: {exc}") from None
    if key is None and endpoint.base_url.rstrip("/") == DEFAULT_BASE_URL:
        raise ConfigError(
            field, f"${endpoint.api_key_env} is not set (export your API key in that variable)"
        )
    return key


@contextlib.contextmanager
def _base_urls(job: JobConfig) -> Iterator[list[str]]:
    """The base URL of each endpoint; for ``sim``, a simulator running for the whole run."""
    with contextlib.ExitStack() as stack:
        urls = []
        for endpoint in job.all_endpoints:
            if endpoint.is_sim:
                from batcher.sim.config import SimConfig
                from batcher.sim.serve import running_sim

                urls.append(stack.enter_context(running_sim(SimConfig(**job.sim))).base_url)
            else:
                urls.append(endpoint.base_url)
        yield urls
