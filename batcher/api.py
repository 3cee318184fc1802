"""The notebook-friendly API: ``batcher.run`` and its async twin ``batcher.arun``.

Both take a job (a path to a job file, a ``JobConfig``, a dict of the job file's tables, or
none), an ``input`` (a path, or rows in memory: see ``batcher.api_input``), overrides and
request fields as keywords, run it to completion and return a ``RunResult``: the run's report,
unless the output is large the output as a ``pyarrow.Table``, and the dataset view of it
(``to_pandas``, ``to_polars``, ``to_dataset``: see ``batcher.api_view``). Without an output
path the output goes to the cache folder, under a key of the job and the input's content, so
running the same cell again resumes instead of paying twice. Nothing is printed unless asked
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
import dataclasses
import difflib
import functools
import hashlib
import io
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import anyio

from batcher import api_input
from batcher.api_view import dataset_view
from batcher.config import JobConfig
from batcher.errors import ConfigError
from batcher.input.field_names import EXTENSION_FIELDS, KNOWN_FIELDS
from batcher.job_file import OVERRIDES, job_from_dict, load_job, with_overrides
from batcher.runner.run import RunReport, arun_job
from batcher.sim import sim_server
from batcher.storage import shown

if TYPE_CHECKING:
    import datasets
    import httpx
    import pandas
    import polars
    import pyarrow as pa

    from batcher.output.resume import RetryErrors
    from batcher.runner.stats import RunStats

#: Outputs with more rows than this are not loaded into ``RunResult.table`` unless asked
#: (``load=True``): a row holds the whole answer, about 1-2 kB, so 100,000 rows are a few
#: hundred MB in memory. Read a large output in pieces (``pyarrow.dataset``, polars, DuckDB).
LOAD_MAX_ROWS = 100_000

JobLike = str | os.PathLike[str] | JobConfig | Mapping[str, Any]
#: ``input=``: a path, or rows in memory (a list of dicts, a pandas or polars DataFrame, a
#: pyarrow Table, a ``datasets.Dataset``).
InputLike = Any
#: Request fields accepted as keywords (request defaults, under each line's own fields);
#: ``messages`` is each line's own.
REQUEST_FIELDS = (KNOWN_FIELDS | EXTENSION_FIELDS) - {"messages"}
#: ``run``'s own keywords, besides the overrides and request fields.
_OPTIONS = frozenset({"input", "restart", "retry_errors", "load", "progress", "transport"})


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """What ``run``/``arun`` return: the run's report, its output path, and the output as a
    table (``None`` when it was not loaded: see ``LOAD_MAX_ROWS``)."""

    report: RunReport
    table: pa.Table | None
    log: str = ""  # what the run would have printed (warnings, log lines), when not shown
    #: the in-memory input's rows (``input=`` rows), for the dataset view
    source: pa.Table | None = field(default=None, repr=False)
    variants: tuple[str, ...] = ()  # the job's variant names, in declared order
    #: the job that ran (to read a JSONL output back with its typed columns)
    job: JobConfig | None = field(default=None, repr=False)

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

    def to_arrow(self) -> pa.Table:
        """The dataset view as a pyarrow Table: a row per answer in input order, the input's
        own columns first, then the output's (a clashing input column becomes ``input_NAME``;
        see ``batcher.api_view``). Loads the output when ``table`` is ``None``."""
        table = self.table if self.table is not None else _load(self.output, True, self.job)
        if table is None:
            raise FileNotFoundError(f"no output at {self.output}")
        return dataset_view(table, self.source, self.variants)

    def to_pandas(self) -> pandas.DataFrame:
        """The dataset view (``to_arrow``) as a pandas DataFrame."""
        return self.to_arrow().to_pandas()

    def to_polars(self) -> polars.DataFrame:
        """The dataset view (``to_arrow``) as a polars DataFrame."""
        import polars as pl

        frame = pl.from_arrow(self.to_arrow())
        assert isinstance(frame, pl.DataFrame)  # a Table gives a DataFrame, never a Series
        return frame

    def to_dataset(self) -> datasets.Dataset:
        """The dataset view (``to_arrow``) as a Hugging Face ``datasets.Dataset``."""
        import datasets

        return datasets.Dataset(self.to_arrow())


def run(
    job: JobLike | None = None,
    /,
    *,
    input: InputLike = None,
    restart: bool = False,
    retry_errors: bool | Literal["all", "retryable"] = False,
    load: bool | None = None,
    progress: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    **kw: Any,
) -> RunResult:
    """Run a job to completion and return its ``RunResult`` (blocking).

    ``job`` is a job file's path, a ``JobConfig``, a dict of the job file's tables (relative
    paths in it are taken from the working directory), or ``None`` (everything from keywords).
    ``input`` is a path, or rows in memory: a list of dicts, a pandas or polars DataFrame, a
    pyarrow Table or a ``datasets.Dataset``. Rows with a ``messages`` or ``prompt`` column are
    requests; other rows need ``template_user`` (``"Q: {question}"``). Without ``output`` the
    output goes to the cache folder under a key of the job and the input's content, so the
    same call again resumes (and sends nothing already answered).

    Keywords: the command line's overrides by their ``JobConfig`` names (``output``, ``model``,
    ``base_url``, ``concurrency``, ``rpm``, ``tpm``, ``max_cost_usd``, ``template_user``,
    ``template_system``, ``id_column``, ``system``, ``max_tokens``, ``temperature``, ...:
    ``batcher.job_file.OVERRIDES``), and any chat request field (``seed``, ``top_p``,
    ``response_format``, ``tools``, ``n``, ...) as a request default (each line's own field
    wins). Another keyword is a ``TypeError`` naming it. A re-run resumes as ``batcher run``
    does; ``restart`` starts over and ``retry_errors`` (``True``/``"all"`` or ``"retryable"``)
    re-sends recorded errors. ``load``: ``True`` always loads the output into ``table``,
    ``False`` never, ``None`` when it has at most ``LOAD_MAX_ROWS`` rows. ``progress`` shows
    the progress bar and prints the summary to stderr. ``transport`` replaces the HTTP
    transport (tests, mocks).
    """
    call = _Call(
        job, input, restart, retry_errors, load, progress, transport, _overrides(kw, "run")
    )
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
    job: JobLike | None = None,
    /,
    *,
    input: InputLike = None,
    restart: bool = False,
    retry_errors: bool | Literal["all", "retryable"] = False,
    load: bool | None = None,
    progress: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    **kw: Any,
) -> RunResult:
    """``run`` on the running event loop (``await batcher.arun(...)`` in a notebook)."""
    overrides = _overrides(kw, "arun")
    call = _Call(job, input, restart, retry_errors, load, progress, transport, overrides)
    return await call.arun()


def _overrides(kw: Mapping[str, Any], caller: str) -> dict[str, Any]:
    """The keywords as ``with_overrides`` takes them: request fields go into ``params``.

    An unknown keyword is a ``TypeError`` naming it, with the nearest known name if any.
    """
    overrides: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for name, value in kw.items():
        if name in OVERRIDES:
            overrides[name] = value
        elif name in REQUEST_FIELDS:
            if value is not None:
                fields[name] = value
        else:
            known = OVERRIDES | REQUEST_FIELDS | _OPTIONS
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else " (neither a job override, see batcher.job_file.OVERRIDES, nor a chat "
                "request field)"
            )
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}{hint}")
    if fields:
        overrides["params"] = {**(overrides.get("params") or {}), **fields}
    return overrides


@dataclass
class _Call:
    job: JobLike | None
    input: InputLike
    restart: bool
    retry_errors: bool | Literal["all", "retryable"]
    load: bool | None
    progress: bool
    transport: httpx.AsyncBaseTransport | None
    overrides: Mapping[str, Any]
    #: where the run's summary and warnings go: stderr when shown, else kept for the result
    stream: IO[str] = field(init=False)

    def __post_init__(self) -> None:
        self.stream = sys.stderr if self.progress else io.StringIO()

    async def arun(self) -> RunResult:
        with contextlib.ExitStack() as stack:
            job, source = await anyio.to_thread.run_sync(self._job, stack)
            report = await self._report(job)
        table = await anyio.to_thread.run_sync(_load, report.output, self.load, job)
        return RunResult(
            report=report,
            table=table,
            log=self._log,
            source=source,
            variants=tuple(v.name for v in job.variants),
            job=job,
        )

    @property
    def _log(self) -> str:
        return self.stream.getvalue() if isinstance(self.stream, io.StringIO) else ""

    def _job(self, stack: contextlib.ExitStack) -> tuple[JobConfig, pa.Table | None]:
        """The job with the input (in-memory rows written to a file) and the overrides over
        it, and an output in the cache folder when it names none; the in-memory rows."""
        job = JobConfig() if self.job is None else _job_of(self.job)
        overrides = dict(self.overrides)
        written = None
        if self.input is not None and api_input.is_in_memory(self.input):
            template = overrides.get("template_user")
            if template is None and job.template is not None:
                template = job.template.user
            folder = api_input.inputs_folder()
            if folder is None:  # no cache folder: the file lasts as long as the run
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            id_column = overrides.get("id_column")
            written = api_input.materialise(
                self.input, template_user=template, id_column=id_column, folder=folder
            )
            if written.requests:  # the id column is written as custom_id: no template needed
                overrides.pop("id_column", None)
            overrides["input"] = written.path
        elif self.input is not None:
            overrides["input"] = self.input
        job = with_overrides(job, progress=self.progress, **overrides)
        if job.output is None:
            job = dataclasses.replace(job, output=_default_output(job, written))
        return job, None if written is None else written.table

    async def _report(self, job: JobConfig) -> RunReport:
        detach, cancel = bool(self.overrides.get("detach")), bool(self.overrides.get("cancel"))
        retry_errors = _retry_errors(self.retry_errors)
        if job.engine == "ray":
            if self.transport is not None:
                raise ConfigError("job.engine", "a transport cannot be given to Ray workers")
            from batcher.ray.driver import run_job_on_ray

            on_ray = functools.partial(
                run_job_on_ray, job, restart=self.restart, retry_errors=retry_errors,
                stream=self.stream,
            )  # fmt: skip
            return await anyio.to_thread.run_sync(on_ray)
        return await arun_job(
            job,
            restart=self.restart,
            retry_errors=retry_errors,
            transport=self.transport,
            stream=self.stream,
            sim=sim_server,
            detach=detach,
            cancel=cancel,
        )


def _default_output(job: JobConfig, written: api_input.Materialised | None) -> Path:
    """The output of a job that names none: in the cache folder, keyed by the job and the
    input's content (the in-memory rows' hash, or the input file's)."""
    if written is not None:
        digest = written.digest
    elif job.input is None:
        raise ConfigError("job.input", "no input (set it in the job or pass input=)")
    elif str(job.input) == "-":
        raise ConfigError("job.output", "no output file (set it in the job or pass output=)")
    elif isinstance(job.input, str):  # a URI: its text names it (credentials aside)
        digest = hashlib.sha256(shown(job.input).encode()).hexdigest()
    else:
        digest = api_input.file_digest(job.input)
    output = api_input.default_output(job, digest)
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


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


def _load(output: Path, load: bool | None, job: JobConfig | None) -> pa.Table | None:
    """The output as a table (``SCHEMA`` and the job's typed columns), unless ``load`` says
    no, it is too large, or there is none (a detached or cancelled batch run writes none)."""
    if load is False or not output.exists():
        return None
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from batcher.output.shape import OutputShape
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
    from batcher.output.shape import output_shape

    return rows_table(rows, shape=OutputShape() if job is None else output_shape(job))
