"""The notebook-friendly API: ``batcher.run`` and its async twin ``batcher.arun``.

Both take a job (a path to a job file, a ``JobConfig``, or a dict of the job file's tables)
plus overrides, run it to completion and return a ``RunResult``: the run's report and, unless
the output is large, the output as a ``pyarrow.Table``. Nothing is printed unless asked
(``progress=True``): the summary and any warnings are in ``RunResult.summary`` and
``RunResult.log``. Errors are raised (``ConfigError``, ``InputError``, ``OutputError``), never
turned into an exit.

``run`` blocks. Called where an event loop is already running (a Jupyter cell), it runs the job
on a loop of its own in a helper thread and still blocks; ``await batcher.arun(...)`` runs it on
the caller's loop instead, which stays free for other work while the requests are out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import io
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import anyio

from batcher.config import JobConfig
from batcher.errors import ConfigError
from batcher.job_file import job_from_dict, load_job, with_overrides
from batcher.runner.run import RunReport, arun_job
from batcher.sim import sim_server

if TYPE_CHECKING:
    import httpx
    import pyarrow as pa

    from batcher.output.resume import RetryErrors
    from batcher.runner.stats import RunStats

#: Outputs with more rows than this are not loaded into ``RunResult.table`` unless asked
#: (``load=True``): a row holds the whole answer, about 1-2 kB, so 100,000 rows are a few
#: hundred MB in memory. Read a large output in pieces (``pyarrow.dataset``, polars, DuckDB).
LOAD_MAX_ROWS = 100_000

JobLike = str | os.PathLike[str] | JobConfig | Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """What ``run``/``arun`` return: the run's report, its output path, and the output as a
    table (``None`` when it was not loaded: see ``LOAD_MAX_ROWS``)."""

    report: RunReport
    table: pa.Table | None
    log: str = ""  # what the run would have printed (warnings, log lines), when not shown

    @property
    def output(self) -> Path:
        """The output file (Parquet or JSONL)."""
        return self.report.output

    @property
    def stats(self) -> RunStats:
        """The run's counts: ok, error, tokens, cost, skipped, by variant..."""
        return self.report.stats

    @property
    def summary(self) -> str:
        """The one-screen summary ``batcher run`` prints."""
        return self.report.summary

    @property
    def exit_code(self) -> int:
        """What ``batcher run`` would exit with: 0 all ok, 1 some failed, 3 stopped early."""
        return self.report.exit_code


def run(
    job: JobLike,
    /,
    *,
    restart: bool = False,
    retry_errors: bool | Literal["all", "retryable"] = False,
    load: bool | None = None,
    progress: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    **overrides: Any,
) -> RunResult:
    """Run a job to completion and return its ``RunResult`` (blocking).

    ``job`` is a job file's path, a ``JobConfig``, or a dict of the job file's tables (relative
    paths in it are taken from the working directory). ``overrides`` are those of the command
    line, by their ``JobConfig`` names: ``input``, ``output``, ``model``, ``base_url``,
    ``concurrency``, ``rpm``, ``tpm``, ``max_attempts``, ``timeout_s``, ``max_cost_usd``, ...
    (``batcher.job_file.OVERRIDES``). A re-run resumes as ``batcher run`` does; ``restart``
    starts over and ``retry_errors`` (``True``/``"all"`` or ``"retryable"``) re-sends recorded
    errors. ``load``: ``True`` always loads the output into ``table``, ``False`` never, ``None``
    when it has at most ``LOAD_MAX_ROWS`` rows. ``progress`` shows the progress bar and prints
    the summary to stderr. ``transport`` replaces the HTTP transport (tests, mocks).
    """
    call = _Call(job, restart, retry_errors, load, progress, transport, overrides)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(call.arun)
    # A loop runs in this thread (a notebook): anyio.run would refuse, so the run gets a loop
    # of its own in a helper thread while this call waits, as a blocking call should. An
    # interrupt (the notebook's stop button) cancels it there: the requests in flight are
    # dropped (a re-run sends them again), everything finished is in the journal.
    with anyio.from_thread.start_blocking_portal() as portal:
        future = portal.start_task_soon(call.arun)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            with contextlib.suppress(concurrent.futures.CancelledError):
                future.result()
            raise


async def arun(
    job: JobLike,
    /,
    *,
    restart: bool = False,
    retry_errors: bool | Literal["all", "retryable"] = False,
    load: bool | None = None,
    progress: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    **overrides: Any,
) -> RunResult:
    """``run`` on the running event loop (``await batcher.arun(...)`` in a notebook)."""
    call = _Call(job, restart, retry_errors, load, progress, transport, overrides)
    return await call.arun()


@dataclass(frozen=True)
class _Call:
    job: JobLike
    restart: bool
    retry_errors: bool | Literal["all", "retryable"]
    load: bool | None
    progress: bool
    transport: httpx.AsyncBaseTransport | None
    overrides: Mapping[str, Any]

    async def arun(self) -> RunResult:
        job = with_overrides(_job_of(self.job), progress=self.progress, **self.overrides)
        detach, cancel = bool(self.overrides.get("detach")), bool(self.overrides.get("cancel"))
        stream: IO[str] = sys.stderr if self.progress else io.StringIO()
        retry_errors = _retry_errors(self.retry_errors)
        if job.engine == "ray":
            if self.transport is not None:
                raise ConfigError("job.engine", "a transport cannot be given to Ray workers")
            from batcher.ray.driver import run_job_on_ray

            on_ray = functools.partial(
                run_job_on_ray, job, restart=self.restart, retry_errors=retry_errors,
                stream=stream,
            )  # fmt: skip
            report = await anyio.to_thread.run_sync(on_ray)
        else:
            report = await arun_job(
                job,
                restart=self.restart,
                retry_errors=retry_errors,
                transport=self.transport,
                stream=stream,
                sim=sim_server,
                detach=detach,
                cancel=cancel,
            )
        table = await anyio.to_thread.run_sync(_load, report.output, self.load)
        log = stream.getvalue() if isinstance(stream, io.StringIO) else ""
        return RunResult(report=report, table=table, log=log)


def _job_of(job: JobLike) -> JobConfig:
    if isinstance(job, JobConfig):
        return job
    if isinstance(job, Mapping):
        return job_from_dict(job, base_dir=Path.cwd())
    if isinstance(job, str | os.PathLike):
        return load_job(job)
    raise TypeError(f"job must be a path, a JobConfig or a dict, not {type(job).__name__}")


def _retry_errors(value: bool | str) -> RetryErrors:
    if value is True or value == "all":
        return "all"
    if value == "retryable":
        return "retryable"
    if value is False or value == "none":
        return "none"
    raise ValueError(f"retry_errors must be True, False, 'all' or 'retryable', not {value!r}")


def _load(output: Path, load: bool | None) -> pa.Table | None:
    """The output as a table (``SCHEMA``), unless ``load`` says no, it is too large, or there
    is none (a detached or cancelled batch run writes none)."""
    if load is False or not output.exists():
        return None
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from batcher.output.writers import read_results, rows_table

    if output.suffix == ".parquet":  # a file, or the Ray engine's folder of part files
        if load is None and ds.dataset(output, format="parquet").count_rows() > LOAD_MAX_ROWS:
            return None
        return pq.read_table(output)
    rows: list[dict[str, Any]] = []
    for row in read_results(output):
        if load is None and len(rows) >= LOAD_MAX_ROWS:
            return None
        rows.append(row)
    return rows_table(rows)
