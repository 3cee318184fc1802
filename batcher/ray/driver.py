"""Runs a job on Ray Data: ``batcher run --engine ray`` and ``run_job_on_ray`` (the ``ray`` extra).

    driver: lists the input's files; reads what the output folder holds
        ──► one read task on a worker: the files through the local engine's reader, in
            blocks of requests (rejects, ids done already and duplicates marked in them)
        ──► Dataset.map_batches(BlockWorker): an actor pool, each actor batcher's own Engine
        ──► finished blocks back to the driver ──► one Parquet part file per block (atomic)
            (an output in object storage: each worker writes its blocks' parts to the store
            itself, and only the counted columns come back)

- **Input** (``reading.py``): the driver never opens the input; it lists its files (a path, a
  glob, a URI such as ``s3://bucket/prompts/*.jsonl``) and one read task on the cluster
  streams them, in name order, through the same ``Reader`` as the local engine, so rejects
  (line number and reason in ``OUTPUT.rejects.jsonl``) and duplicate ids (across files too)
  are treated identically; ``block_rows`` requests to a block, each sent on as it is made.
  The first request goes out as soon as the first block is read, whatever the input's size.
- **Workers** (``worker.py``; the pool: ``session.py``): each actor runs one ``Engine`` for its
  whole life, on an event loop of its own, with one HTTP client and one set of limits per
  endpoint: retries, 429 pauses, outages and re-asks as in a local run. Every block the actor
  is given feeds that engine; Ray runs two calls per actor at once, so the next block is queued
  before the last one's stragglers are done and no slot waits for a block boundary.
- **Limits are divided**: with K workers each gets rpm/K, tpm/K and concurrency/K, and scales
  what the server's ``x-ratelimit-*`` headers say by 1/K (``Limits(share=...)``). No limiter
  actor: it would put a Ray round trip in front of every request and one actor on the path of
  them all, while the limits that matter adapt locally anyway (429s, headers). The cost: a
  worker that has run out of blocks does not lend its share to the others.
- **Output** (``folder.py``, ``output/parts.py``): the ``.parquet`` output is a folder of part
  files, one per block, each with exactly ``writers.SCHEMA``, written by the driver as blocks
  come back (hidden ``.partial``, fsync, rename: a part is there whole or not at all), with the
  run's sequence number and each record's request hash in its metadata. A folder, because that
  is what Ray, Spark, DuckDB, pandas and polars read as one dataset, and it grows without
  rewrites. An output URI (``s3://bucket/out.parquet``) is such a folder in the store: each
  part one object under the prefix, written by the worker that ran the block, through pyarrow's
  filesystem with the credentials of that node's environment (a hidden key, then copied whole;
  named after the block's first line, which no other block of the run holds); only the
  columns the summary counts come back to the driver. The driver lists the parts for resume
  and compacts them at the end; the rejects file is written in the local work folder and
  uploaded beside the prefix. No lock in a store: one driver per output prefix
  (``output.parts``), and a run says when another wrote there meanwhile.
- **Resume** (``folder.py``): an id in the part files with the same request hash is done,
  ``ok`` or ``error``, as the local engine's resume treats its journal (``--retry-errors``
  re-sends errors; a changed line is sent again; their new records replace the old); a re-run
  sends only the others.
- **Stopping** (``stopping.py``): on a first Ctrl+C or SIGTERM (``handle_signals``, as the CLI
  runs) the driver sets a stop flag (a small actor, ``StopFlag``) that every worker polls:
  their engines send no new request and give those in flight the job's ``grace_s``, as a local
  run does; the driver keeps writing the blocks that come back (partial ones too) for up to
  ``grace_s`` plus ``STOP_MARGIN_S``, then ends, exit 3. A second interrupt stops at once. A
  kill -9 or a crash of the driver loses the blocks in flight (at most workers × 2 ×
  ``block_rows`` requests), which are sent again.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from batcher.config import JobConfig
from batcher.errors import ConfigError, OutputError
from batcher.input.sources import count_lines
from batcher.input.tabular import check_input
from batcher.output.formats import RejectsWriter, rejects_path
from batcher.output.parts import locked
from batcher.output.resume import RetryErrors
from batcher.output.shape import OutputShape, output_shape
from batcher.ray.blocks import count_rows, take_apart
from batcher.ray.folder import PartFiles, Rerun, rerun, settle, strangers
from batcher.ray.reading import ReadPlan, input_files, input_spec, is_uri, unpack
from batcher.ray.session import RaySession
from batcher.ray.stopping import Stopper
from batcher.ray.worker import CONFIG_ERROR, WorkerSpec
from batcher.runner.checks import (
    api_keys,
    base_url_field,
    check_not_the_input,
    check_output_writable,
)
from batcher.runner.progress import Progress, format_summary
from batcher.runner.quiet_stream import quiet
from batcher.runner.run import RunReport
from batcher.runner.staging import output_work_path
from batcher.runner.stats import RunStats
from batcher.runner.wiring import base_urls
from batcher.sim import sim_server
from batcher.storage import Location, location, shown, upload

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pyarrow as pa

#: What a user without Ray is told (``--engine ray`` fails before anything is sent).
INSTALL_HINT = "Ray is not installed: pip install 'batcher[ray]' (or pip install 'ray[data]')"


@dataclass(frozen=True, kw_only=True)
class RaySetting:
    """A Ray run's job and the caller's choices for it, as the steps of the run need them."""

    job: JobConfig
    input: Location  # as given: a path, a glob, a URI (or a ``Path`` made of one)
    files: list[str]  # the input's files (``reading.input_files``)
    output: Location  # a local folder, or a store's prefix (its URI's text)
    rejects: Path  # beside a local output; in the work folder for a URI (uploaded at the end)
    stream: IO[str]
    needs_key: list[bool]  # the workers read the keys; the driver says which exist
    handle_signals: bool


def require_ray() -> None:
    """Fail with a ``ConfigError`` (exit 2, nothing sent) when Ray Data cannot be imported."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError("job.engine", INSTALL_HINT) from None


def run_job_on_ray(
    job: JobConfig,
    *,
    restart: bool = False,
    retry_errors: RetryErrors = "none",
    stream: IO[str] | None = None,
    handle_signals: bool = False,
) -> RunReport:
    """Run a job on Ray Data (blocking) and return its report; prints the summary.

    Uses the Ray instance this process is connected to (``ray.init`` called before), else the
    cluster ``RAY_ADDRESS`` names (as under ``ray job submit``), else starts a local one for
    the run. The output must be a ``.parquet`` path or URI: it becomes a folder of part files
    (in a store, objects under that prefix; ``report.output`` is then the URI, credentials
    redacted, as a ``Path``: ``reading.input_spec`` gives its text back). A
    re-run sends only the ids not in it yet (``retry_errors`` re-sends recorded errors:
    ``"all"`` or only ``"retryable"`` ones; their new records replace the old), and
    ``restart=True`` deletes the part files first.
    Raises ``ConfigError`` before anything is sent when the job cannot run this way (no Ray, a
    JSONL output, a cost cap), as ``run_job`` does for the rest.
    """
    require_ray()
    given, output = _locations(job)
    _check_job(job, output)
    if isinstance(output, Path):
        check_output_writable(output)
        if isinstance(given, Path) and not is_uri(input_spec(given)):
            check_not_the_input(given, output)
    check_input(job, input_spec(given))
    setting = RaySetting(
        job=job,
        input=given,
        files=input_files(input_spec(given)),
        output=output,
        rejects=rejects_path(output if isinstance(output, Path) else output_work_path(output)),
        stream=quiet(stream or sys.stderr),  # a reader that goes away does not stop the run
        needs_key=[key is not None for key in api_keys(job)],
        handle_signals=handle_signals,
    )
    stats, engine = _run_in_folder(setting, restart, retry_errors)
    return _report(setting, stats, engine)


def _locations(job: JobConfig) -> tuple[Location, Location]:
    """The job's input as given, and its output: a local folder, or a URI's text (also from
    a ``Path`` made of one, whose ``//`` folded); either missing is refused."""
    if job.input is None:
        raise ConfigError("job.input", "no input file (set it in the job or pass --input)")
    if job.output is None:
        raise ConfigError("job.output", "no output file (set it in the job or pass --output)")
    output = input_spec(job.output)
    if output.startswith("file://"):  # a local folder: its lock, fsync and rename
        return job.input, Path(output.removeprefix("file://"))
    return job.input, output if is_uri(output) else Path(output)


def _check_job(job: JobConfig, output: Location) -> None:
    """What the Ray engine cannot run, refused before anything is sent."""
    name = output.name if isinstance(output, Path) else output.split("?", 1)[0].rstrip("/")
    if not name.lower().endswith(".parquet"):
        raise ConfigError(
            "job.output",
            f"the Ray engine writes Parquet: give an output ending in .parquet (a folder of "
            f"part files), got {shown(output)!r}",
        )
    if isinstance(output, Path) and output.exists() and not output.is_dir():
        raise ConfigError(
            "job.output",
            f"{output} is a file (the local engine's output?); the Ray engine writes a folder "
            "of part files there: choose another output or remove it",
        )
    if job.variants:
        raise ConfigError(
            "variants",
            "not supported with the Ray engine yet (its parts are keyed by custom_id alone); "
            "run the sweep with the local engine",
        )
    if job.limits.max_cost_usd is not None:
        raise ConfigError(
            "limits.max_cost_usd",
            "not supported with the Ray engine (a cap needs one ledger of reservations "
            "across workers); run it with the local engine",
        )


def _run_in_folder(
    setting: RaySetting, restart: bool, retry_errors: RetryErrors
) -> tuple[RunStats, str]:
    """The run under the output folder's lock (a local one's); the stats (the folder's final
    counts in them), and a line on how the work was spread. A URI's rejects file is uploaded
    beside it at the end."""
    output = setting.output
    if isinstance(output, Path):
        output.mkdir(exist_ok=True)
    else:
        setting.rejects.parent.mkdir(parents=True, exist_ok=True)
    with locked(output):
        found = rerun(output, restart=restart, retry_errors=retry_errors)
        stats, engine = _run(setting, found)
        counts = settle(output, resent=stats.resent > 0)
    stats.output_ok, stats.output_error = counts["ok"], counts["error"]
    if not isinstance(output, Path):
        _warn_of_strangers(setting, found)
    if not isinstance(output, Path) and setting.rejects.exists():
        upload(setting.rejects, _rejects_uri(output))
    return stats, engine


def _rejects_uri(output: str) -> str:
    """Where a URI output's rejects file is uploaded: ``OUTPUT.rejects.jsonl`` beside the
    prefix, as beside a local folder."""
    base, sep, query = output.partition("?")
    return f"{base.rstrip('/')}.rejects.jsonl{sep}{query}"


def _warn_of_strangers(setting: RaySetting, found: Rerun) -> None:
    """Say so when another driver wrote to the same output prefix during this run (a store
    has no lock to refuse it): nothing is lost, but requests may have been sent twice."""
    others = strangers(setting.output, found)
    if others:
        print(
            f"batcher: another run wrote {len(others)} part(s) to {shown(setting.output)} while "
            "this one ran (run one driver per output prefix): some requests may have been sent "
            "twice; the next run keeps each id once",
            file=setting.stream,
            flush=True,
        )


def _report(setting: RaySetting, stats: RunStats, engine: str) -> RunReport:
    """The run's report, its summary printed; a ``ConfigError`` if an endpoint showed the job
    cannot work (what was answered elsewhere stays in the parts)."""
    job, output = setting.job, setting.output
    if stats.config_error is not None:
        raise ConfigError(base_url_field(job, stats.config_error_endpoint), stats.config_error)
    missing = stats.submitted - stats.done
    if missing and not stats.stopped_early:
        stats.stopped_early = True
        stats.stop_reason = f"{missing} requests were not answered (a worker stopped)"
    rej = setting.rejects if stats.rejected else None
    # a URI's rejects are named where they were uploaded
    shown_rej = str(rej) if isinstance(output, Path) else shown(_rejects_uri(output))
    summary = format_summary(
        stats, name=job.name, output=shown(output), rejects=shown_rej if rej else None,
        engine=engine,
    )  # fmt: skip
    print(summary, file=setting.stream, flush=True)
    where = output if isinstance(output, Path) else Path(shown(output))
    return RunReport(stats=stats, output=where, rejects=rej, summary=summary)


def _run(setting: RaySetting, found: Rerun) -> tuple[RunStats, str]:
    """The read task and the actor pool on Ray, the parts written as blocks come back; the
    stats, and a line on how the work was spread."""
    job = setting.job
    stats = RunStats()
    progress = Progress(stats, total=_total(setting), enabled=job.progress, stream=setting.stream)
    started = time.monotonic()
    stopper = Stopper(progress, job.grace_s)
    session = RaySession(on_connect=stopper.reinstall)
    engine = "ray: nothing to send"
    rejects_file = setting.rejects
    rejects_file.unlink(missing_ok=True)  # this run's rejects only, or none
    try:
        with (
            base_urls(job, sim_server) as urls,
            stopper.handling(setting.handle_signals),
            RejectsWriter(rejects_file) as rejects,
        ):
            # the input as storage names it (a URI's text, not a ``Path`` that folded its ``//``)
            shape = output_shape(replace(job, input=location(input_spec(setting.input))))
            files = _part_files(setting, shape, found)
            spec = _spec(setting, urls, session, shape, files)
            known = session.put(found.known) if found.known else None
            plan = ReadPlan(
                job=job, files=setting.files, block_rows=job.ray.block_rows, known=known
            )
            stopper.arm(spec.stop_flag)
            blocks = _collect(session.run(plan, spec), files, rejects, stats, progress, stopper)
            if stats.submitted:
                engine = _engine_line(spec, blocks, job.ray.block_rows)
    except KeyboardInterrupt:
        stats.stopped_early = True
        stats.stop_reason = stats.stop_reason or stopper.reason or "interrupted"
        progress.note("batcher: interrupted: the blocks in flight are sent again next run")
    except OSError as exc:
        what = shown(setting.output)
        raise OutputError(f"cannot write {what}: {exc.strerror or shown(str(exc))}") from None
    finally:
        stopper.disarm()
        session.close()
        progress.close()
    if stopper.reason is not None and not stats.stopped_early:  # what was answered is written
        stats.stopped_early = True
        stats.stop_reason = stopper.reason
    stats.wall_s = time.monotonic() - started
    return stats, engine


def _total(setting: RaySetting) -> int | None:
    """The progress total: the lines of a single local file (counted, not parsed), else none
    (the driver does not read a store's objects)."""
    files = setting.files
    if not setting.job.progress or len(files) != 1 or is_uri(files[0]):
        return None
    return count_lines(Path(files[0]))


def _spec(
    setting: RaySetting,
    urls: list[str],
    session: RaySession,
    shape: OutputShape,
    files: PartFiles,
) -> WorkerSpec:
    """What every worker is given: the job, the endpoints' URLs, the pool's size (the job's
    ``ray.workers`` or the cluster's CPUs), the stop flag, the output's typed columns, and
    this run's part files when they go to object storage (the workers write them)."""
    job = setting.job
    return WorkerSpec(
        job=job,
        urls=urls,
        needs_key=setting.needs_key,
        workers=max(1, job.ray.workers or session.cpus()),
        stop_flag=session.stop_flag() if setting.handle_signals else None,
        shape=shape,
        parts=None if isinstance(setting.output, Path) else files,
    )


def _engine_line(spec: WorkerSpec, blocks: int, block_rows: int) -> str:
    """The summary's line on how the work was spread."""
    workers = spec.workers
    return (
        f"ray: {workers} worker{'s' if workers > 1 else ''}, {blocks} "
        f"block{'s' if blocks > 1 else ''} of up to {block_rows} requests"
    )


def _part_files(setting: RaySetting, shape: OutputShape, found: Rerun) -> PartFiles:
    """This run's part files, with the output's provenance and columns."""
    from batcher.output.provenance import PREFIX, provenance
    from batcher.output.rows import schema_for

    # The input's hash is left out (empty): the driver does not read the input, which may be
    # gigabytes in a store; a local run's output has it.
    metadata = provenance(setting.job, Path(os.devnull))
    metadata[PREFIX + "input"] = shown(input_spec(setting.input))
    schema = schema_for(shape)
    return PartFiles(
        output=setting.output,
        run=found.run,
        stamp=found.stamp,
        metadata=metadata,
        schema=schema,
    )


def _collect(
    finished: Iterator[pa.Table],
    files: PartFiles,
    rejects: RejectsWriter,
    stats: RunStats,
    progress: Progress,
    stopper: Stopper,
) -> int:
    """The finished blocks as they come back: markers counted, rejects written, a worker's
    reason to stop noted, the records written as part files and counted; how many blocks
    had records."""
    n = sent = 0
    for batch in finished:
        for block in unpack(batch):
            before = stats.skipped
            done = take_apart(block, stats)
            for reject in done.rejects:
                rejects.write(reject)
            _note_stop(done.stop, stats, progress, stopper)
            if done.records.num_rows:
                if isinstance(files.output, Path):  # a store's parts are the workers' to write
                    files.write(n, done.records, done.hashes)
                count_rows(done.records, stats)
                sent += 1
            progress.advance(done.records.num_rows + len(done.rejects) + stats.skipped - before)
            n += 1
    return sent


def _note_stop(
    stop: dict[str, Any] | None, stats: RunStats, progress: Progress, stopper: Stopper
) -> None:
    """A worker's reason to stop, into the stats (once)."""
    if stop is None:
        return
    reason = stop["error_message"]
    if stop["error_code"] == CONFIG_ERROR:
        stats.config_error = stats.config_error or reason
        stats.config_error_endpoint = stop["endpoint"]
    if reason and not stats.stopped_early and stopper.reason is None:
        stats.stopped_early = True
        stats.stop_reason = reason
        progress.note(f"batcher: {reason}: the workers stop")
