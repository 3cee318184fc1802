"""Runs a job on Ray Data: ``batcher run --engine ray`` and ``run_job_on_ray`` (the ``ray`` extra).

    driver: reader (parse, validate, rejects; skip ids already in the output)
        ──► blocks of requests in Ray's object store
        ──► Dataset.map_batches(BlockWorker): an actor pool, each actor batcher's own Engine
        ──► finished blocks back to the driver ──► one Parquet part file per block (atomic)

- **Input**: parsed and validated on the driver by the same ``Reader`` as the local engine, so
  rejects (line number and reason in ``OUTPUT.rejects.jsonl``) and duplicate ids are treated
  identically; the valid requests become the Dataset, ``block_rows`` to a block.
- **Workers** (``worker.py``): each actor runs one ``Engine`` for its whole life, on an
  event loop of its own, with one HTTP client and one set of limits per endpoint: retries, 429
  pauses, outages and re-asks as in a local run. Every block the actor is given feeds that
  engine; Ray runs two calls per actor at once, so the next block is queued before the last
  one's stragglers are done and no slot waits for a block boundary.
- **Limits are divided**: with K workers each gets rpm/K, tpm/K and concurrency/K, and scales
  what the server's ``x-ratelimit-*`` headers say by 1/K (``Limits(share=...)``). No limiter
  actor: it would put a Ray round trip in front of every request and one actor on the path of
  them all, while the limits that matter adapt locally anyway (429s, headers). The cost: a
  worker that has run out of blocks does not lend its share to the others.
- **Output** (``parts.py``): the ``.parquet`` output is a folder of part files, one per
  block, each with exactly ``writers.SCHEMA``, written by the driver as blocks come back
  (hidden ``.partial``, fsync, rename: a part is there whole or not at all). A folder, because
  that is what Ray, Spark, DuckDB, pandas and polars read as one dataset, and it grows without
  rewrites.
- **Resume**: the ids in the part files are done, ``ok`` or ``error``, as the local engine's
  resume treats its journal (``--retry-errors`` re-sends errors; their new records replace the
  old); a re-run sends only the others.
- **Stopping**: on a first Ctrl+C or SIGTERM (``handle_signals``, as the CLI runs) the driver
  sets a stop flag (a small actor, ``StopFlag``) that every worker polls: their engines send no
  new request and give those in flight the job's ``grace_s``, as a local run does; the driver
  keeps writing the blocks that come back (partial ones too) for up to ``grace_s`` plus
  ``STOP_MARGIN_S``, then ends, exit 3. A second interrupt stops at once. A kill -9 or a crash
  of the driver loses the blocks in flight (at most workers × 2 × ``block_rows`` requests),
  which are sent again.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from batcher import jsonfast
from batcher.config import JobConfig
from batcher.errors import ConfigError, OutputError
from batcher.http.client import is_retryable_failure
from batcher.input.reader import Reader, count_lines, open_input
from batcher.output import parts
from batcher.output.formats import RejectsWriter
from batcher.output.resume import RetryErrors
from batcher.ray.worker import CONFIG_ERROR, ERROR_MARK, STOPPED, BlockWorker, WorkerSpec
from batcher.records import Reject, Result, Usage
from batcher.runner.checks import (
    api_keys,
    base_url_field,
    check_not_the_input,
    check_output_writable,
    rejects_path,
)
from batcher.runner.progress import Progress, format_summary
from batcher.runner.quiet_stream import quiet
from batcher.runner.run import RunReport
from batcher.runner.stats import RunStats
from batcher.runner.wiring import base_urls
from batcher.sim import sim_server

if TYPE_CHECKING:
    import pyarrow as pa


#: What a user without Ray is told (``--engine ray`` fails before anything is sent).
INSTALL_HINT = "Ray is not installed: pip install 'batcher[ray]' (or pip install 'ray[data]')"
#: Blocks each actor runs at once (they share its limits and connection pool).
CALLS_PER_WORKER = 2
#: How long past ``grace_s`` an interrupted driver waits for the workers' last blocks.
STOP_MARGIN_S = 5.0
#: Columns of the request blocks: a parsed ``Request`` (bodies as JSON text).
_REQUEST_COLUMNS = (
    "custom_id", "line", "body", "metadata", "prompt_tokens", "completion_budget", "body_hash"
)  # fmt: skip
#: Column types given explicitly (the others are inferred).
_REQUEST_TYPES = {"prompt_tokens": "int64", "completion_budget": "int64", "line": "int64"}
#: The Parquet columns the driver reads back to count a block (``_result_of_row``).
_COUNTED = (
    "custom_id", "status", "model", "attempts", "endpoint", "error_code", "schema_valid",
    "cost_usd", "prompt_tokens", "completion_tokens", "total_tokens", "line",
)  # fmt: skip


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
    the run. The output must be a ``.parquet`` path: it becomes a folder of part files. A
    re-run sends only the ids not in it yet (``retry_errors`` re-sends recorded errors:
    ``"all"`` or only ``"retryable"`` ones; their new records replace the old), and
    ``restart=True`` deletes the part files first.
    Raises ``ConfigError`` before anything is sent when the job cannot run this way (no Ray, a
    JSONL output, a cost cap), as ``run_job`` does for the rest.
    """
    require_ray()
    stream = quiet(stream or sys.stderr)  # a reader that goes away does not stop the run
    input_path, output = job.require_paths()
    _check_job(job, output)
    check_output_writable(output)
    check_not_the_input(input_path, output)
    needs_key = [key is not None for key in api_keys(job)]  # the workers read the keys
    source = open_input(input_path)
    try:
        output.mkdir(exist_ok=True)
        with parts.locked(output):
            found = parts.prepare(output, restart=restart)
            skip = {cid for cid, record in found.records.items() if _done(record, retry_errors)}
            stats, engine = _run(job, source, input_path, output, found, skip, needs_key,
                                 stream, handle_signals)  # fmt: skip
            if stats.resent:  # their old records are still in the parts written before
                parts.compact(parts.scan(output))
            counts = parts.scan(output).counts()
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    if stats.config_error is not None:  # what was answered elsewhere stays in the parts
        raise ConfigError(base_url_field(job, stats.config_error_endpoint), stats.config_error)
    stats.output_ok, stats.output_error = counts["ok"], counts["error"]
    missing = stats.submitted - stats.done
    if missing and not stats.stopped_early:
        stats.stopped_early = True
        stats.stop_reason = f"{missing} requests were not answered (a worker stopped)"
    rej = rejects_path(output) if stats.rejected else None
    summary = format_summary(
        stats, name=job.name, output=str(output), rejects=str(rej) if rej else None,
        engine=engine,
    )  # fmt: skip
    print(summary, file=stream, flush=True)
    return RunReport(stats=stats, output=output, rejects=rej, summary=summary)


def _check_job(job: JobConfig, output: Path) -> None:
    if output.suffix.lower() != ".parquet":
        raise ConfigError(
            "job.output",
            f"the Ray engine writes Parquet: give an output ending in .parquet (a folder of "
            f"part files), got {str(output)!r}",
        )
    if output.exists() and not output.is_dir():
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


def _done(record: parts.Record, retry_errors: RetryErrors) -> bool:
    """Whether a recorded id is finished for this run: as the local engine's ``ResumePlan``
    (by id only: parts keep no hash of the request, so a changed line is not noticed)."""
    if record.status == "ok" or retry_errors == "none":
        return True
    if retry_errors == "all":
        return False
    return not is_retryable_failure(record.status_code, record.error_code)


def _run(
    job: JobConfig,
    source: IO[bytes],
    input_path: Path,
    output: Path,
    found: parts.Scan,
    skip: set[str],
    needs_key: list[bool],
    stream: IO[str],
    handle_signals: bool,
) -> tuple[RunStats, str]:
    """Parse on the driver, run the blocks on Ray, write parts; the stats, and a line on how
    the work was spread."""
    from batcher.output.provenance import provenance

    stats = RunStats()
    total = count_lines(input_path) if job.progress else None
    progress = Progress(stats, total=total, enabled=job.progress, stream=stream)
    started = time.monotonic()
    stopper = _Stopper(progress, job.grace_s)
    session = _RaySession(on_connect=stopper.reinstall)
    submitted = 0
    engine = "ray: nothing to send"
    try:
        with base_urls(job, sim_server) as urls, stopper.handling(handle_signals):
            rejects_path(output).unlink(missing_ok=True)  # this run's rejects only, or none
            reader = Reader(
                source, job.request, encoding=job.limits.encoding, count_tokens=job.counts_tokens
            )
            with RejectsWriter(rejects_path(output)) as rejects:
                refs = []
                for block in _request_blocks(reader, skip, job.ray.block_rows):
                    if isinstance(block, Reject):
                        rejects.write(block)
                        stats.rejected += 1
                    elif isinstance(block, str):
                        stats.skipped += 1
                    else:
                        ids = block["custom_id"].to_pylist()
                        stats.resent += sum(cid in found.records for cid in ids)
                        refs.append(session.put(block))
                        submitted += block.num_rows
                        continue
                    progress.advance()
            stats.lines_read = reader.lines_read
            if refs:
                workers = job.ray.workers or session.cpus()
                workers = max(1, min(workers, len(refs)))
                spec = WorkerSpec(
                    job=job,
                    targets=[(e.name, url) for e, url in zip(job.all_endpoints, urls, strict=True)],
                    needs_key=needs_key,
                    workers=workers,
                    stop_flag=session.stop_flag() if handle_signals else None,
                )
                engine = (
                    f"ray: {workers} worker{'s' if workers > 1 else ''}, {len(refs)} "
                    f"block{'s' if len(refs) > 1 else ''} of up to {job.ray.block_rows} requests"
                )
                metadata = provenance(job, input_path)
                stamp = parts.new_stamp()
                stopper.arm(spec.stop_flag)
                for n, block in enumerate(session.run(refs, spec)):
                    table, stop = _split_stop_row(block)
                    reason = None if stop is None else stop["error_message"]
                    if stop is not None and stop["error_code"] == CONFIG_ERROR:
                        stats.config_error = stats.config_error or reason
                        stats.config_error_endpoint = stop["endpoint"]
                    if reason and not stats.stopped_early and stopper.reason is None:
                        stats.stopped_early = True
                        stats.stop_reason = reason
                        progress.note(f"batcher: {reason}: the workers stop")
                    if table.num_rows:
                        parts.write_part(parts.part_path(output, stamp, n), table, metadata)
                        for row in table.select(list(_COUNTED)).to_pylist():
                            stats.add(_result_of_row(row))
                        progress.advance(table.num_rows)
    except KeyboardInterrupt:
        stats.stopped_early = True
        stats.stop_reason = stats.stop_reason or stopper.reason or "interrupted"
        progress.note("batcher: interrupted: the blocks in flight are sent again next run")
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        stopper.disarm()
        session.close()
        progress.close()
    if stopper.reason is not None and not stats.stopped_early:  # what was answered is written
        stats.stopped_early = True
        stats.stop_reason = stopper.reason
    stats.submitted = submitted
    stats.wall_s = time.monotonic() - started
    return stats, engine


def _request_blocks(
    reader: Reader, skip: set[str], block_rows: int
) -> Iterator[pa.Table | Reject | str]:
    """Tables of up to ``block_rows`` requests to send; rejects; and ids skipped (as ``str``)."""
    import pyarrow as pa

    columns: dict[str, list[Any]] = {name: [] for name in _REQUEST_COLUMNS}

    def table() -> pa.Table:
        # prompt_tokens may be all None (not counted): typed, not Arrow's null type
        arrays = {
            name: pa.array(values, type=_REQUEST_TYPES.get(name))
            for name, values in columns.items()
        }
        block = pa.table(arrays)
        for values in columns.values():
            values.clear()
        return block

    for item in reader:
        if isinstance(item, Reject):
            yield item
        elif item.custom_id in skip:
            yield item.custom_id
        else:
            columns["custom_id"].append(item.custom_id)
            columns["line"].append(item.line)
            columns["body"].append(jsonfast.dumps_text(item.body))
            meta = item.metadata
            columns["metadata"].append(None if meta is None else jsonfast.dumps_text(meta))
            columns["prompt_tokens"].append(item.prompt_tokens)
            columns["completion_budget"].append(item.completion_budget)
            columns["body_hash"].append(item.body_hash)
            if len(columns["custom_id"]) >= block_rows:
                yield table()
    if columns["custom_id"]:
        yield table()


def _split_stop_row(block: pa.Table) -> tuple[pa.Table, dict[str, Any] | None]:
    """The block's records, and the row saying why its worker stopped if it did
    (``worker``: its ``error_message``, ``error_code`` and ``endpoint``)."""
    import pyarrow.compute as pc

    stopped = pc.equal(block["status"], STOPPED)
    if not pc.any(stopped).as_py():
        return block, None
    rows = block.filter(stopped).select(["error_message", "error_code", "endpoint"]).to_pylist()
    return block.filter(pc.invert(stopped)), rows[0]


def _result_of_row(row: dict[str, Any]) -> Result:
    """Enough of a ``Result`` for ``RunStats.add`` from the counted columns of a row."""
    return Result(
        custom_id=row["custom_id"],
        line=row["line"],
        status=row["status"],
        model=row["model"],
        attempts=row["attempts"],
        latency_s=0.0,
        started_at=0.0,
        finished_at=0.0,
        error_code=row["error_code"],
        cost_usd=row["cost_usd"],
        schema_valid=row["schema_valid"],
        endpoint=row["endpoint"],
        usage=Usage(
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
            total_tokens=row["total_tokens"],
        )
        if row["total_tokens"] is not None or row["prompt_tokens"] is not None
        else None,
    )


class StopFlag:
    """The driver's word to the workers (a Ray actor): the reason to stop, once it is set."""

    def __init__(self) -> None:
        self._reason: str | None = None

    def set(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason

    def reason(self) -> str | None:
        return self._reason


class _Stopper:
    """SIGINT and SIGTERM on the driver (with ``handling(True)``, in the main thread).

    Before the blocks run (``arm``), an interrupt raises ``KeyboardInterrupt``: nothing was
    sent. While they run, the first one sets the stop flag (from a helper thread: no Ray call
    in a signal handler) and the driver goes on writing what comes back; a second one, or
    ``grace_s`` + ``STOP_MARGIN_S`` without the run ending, raises ``KeyboardInterrupt``.
    """

    def __init__(self, progress: Progress, grace_s: float) -> None:
        self._progress = progress
        self._grace_s = grace_s
        self._flag: Any = None
        self._asked = threading.Event()  # set by the first interrupt (or by disarm)
        self._over = threading.Event()  # the run ended
        self._helper: threading.Thread | None = None
        self._enabled = False
        self.reason: str | None = None

    @contextlib.contextmanager
    def handling(self, enabled: bool) -> Iterator[None]:
        if not enabled:
            yield
            return
        previous = self._install()
        self._enabled = True
        try:
            yield
        finally:
            self._over.set()  # the helper interrupts no more
            self._enabled = False
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _install(self) -> dict[int, Any]:
        return {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }

    def reinstall(self) -> None:
        """Take the signals back: ``ray.init`` puts its own SIGTERM handler in (exit 15)."""
        if self._enabled:
            self._install()

    def arm(self, flag: Any) -> None:
        """The blocks are about to run: a first interrupt now asks ``flag`` to stop them."""
        if flag is None:
            return
        self._flag = flag
        self._helper = threading.Thread(target=self._tell, name="batcher-stop", daemon=True)
        self._helper.start()

    def disarm(self) -> None:
        self._over.set()
        self._asked.set()
        if self._helper is not None:
            self._helper.join(timeout=5)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._flag is None or self.reason is not None or self._over.is_set():
            raise KeyboardInterrupt
        self.reason = f"interrupted by {signal.Signals(signum).name}"
        self._asked.set()

    def _tell(self) -> None:
        self._asked.wait()
        if self._over.is_set() or self.reason is None:
            return
        self._flag.set.remote(self.reason)
        self._progress.note(
            f"batcher: {self.reason}: the workers send no new requests; waiting up to "
            f"{self._grace_s:g} s for those in flight (press Ctrl+C again to stop at once)"
        )
        if not self._over.wait(self._grace_s + STOP_MARGIN_S):
            self._progress.note("batcher: the workers did not finish in time")
            _thread.interrupt_main()  # the handler raises KeyboardInterrupt: it was asked once


class _RaySession:
    """Ray for one run: connected on first use, shut down after if this run started it."""

    def __init__(self, on_connect: Callable[[], None]) -> None:
        self._started = False
        self._on_connect = on_connect

    def _ray(self) -> Any:
        import ray

        if not ray.is_initialized():
            self._started = True
            _init_ray(ray)
            self._on_connect()
        return ray

    def put(self, table: pa.Table) -> Any:
        return self._ray().put(table)

    def stop_flag(self) -> Any:
        """A new ``StopFlag`` actor (no CPU: the workers may take them all)."""
        return self._ray().remote(num_cpus=0)(StopFlag).remote()

    def cpus(self) -> int:
        return max(1, int(self._ray().cluster_resources().get("CPU", 1)))

    def run(self, refs: list[Any], spec: WorkerSpec) -> Iterator[pa.Table]:
        """The finished blocks, as they come."""
        ray = self._ray()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # batcher's own progress says how far the run is
        ctx.print_on_execution_start = False
        pool = ray.data.ActorPoolStrategy(
            size=spec.workers,
            max_concurrent_calls_per_actor=CALLS_PER_WORKER,
            enable_true_multi_threading=True,
        )
        _quiet_ray_data()
        # The spec travels with the class rather than as a constructor argument: Ray keeps
        # constructor arguments in the object store and warns that a restarted actor could
        # lose them.
        worker = type("BlockWorker", (BlockWorker,), {"spec": spec})
        dataset = ray.data.from_arrow_refs(refs).map_batches(
            worker,
            batch_size=None,  # a block as the driver made it
            batch_format="pyarrow",
            compute=pool,
            num_cpus=1,
        )
        try:
            yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
        except ray.exceptions.RayError as exc:
            raise OutputError(f"the Ray job failed: {_first_line(exc)}") from None

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()


def _quiet_ray_data() -> None:
    """Ray Data's console logs (execution plans, timings) only from errors on: batcher shows
    progress and failures itself. Its log files in the Ray session folder keep everything."""
    import logging

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(logging.ERROR)


def _init_ray(ray: Any) -> None:
    """Connect to the cluster ``RAY_ADDRESS`` names (``ray job submit`` sets it), else start a
    local instance for this run; never join some other instance found on the machine by
    chance.

    Ray's own console messages from errors on only; workers' stderr (batcher's notes: an
    endpoint down, a refused key) is still forwarded.
    """
    import logging

    quiet = {"logging_level": logging.ERROR, "log_to_driver": True}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        ray.init(address="local", include_dashboard=False, **quiet)


def _first_line(exc: BaseException) -> str:
    """What went wrong in a worker, without Ray's wrapping and traceback text: the message a
    worker raised on purpose (``ERROR_MARK``), else the last line of the root cause."""
    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in seen:
        seen.append(cause)
        cause = cause.__cause__ or getattr(cause, "cause", None)
    for error in seen:
        for line in str(error).splitlines():
            if ERROR_MARK in line:
                return line[line.index(ERROR_MARK) + len(ERROR_MARK) :].strip()
    lines = [line for line in str(seen[-1]).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(seen[-1]).__name__
