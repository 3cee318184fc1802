"""In-memory input for the Python API, and where a run without an output path writes.

``batcher.run(input=...)`` takes rows held in memory: a list of dicts, a pandas or polars
DataFrame, a pyarrow Table or a Hugging Face ``datasets.Dataset`` (each library is imported
only when such an object is passed). They are written once to the cache folder
(``disk_cache.cache_dir()/inputs``, under their content's hash) as a file a job reads:

- rows that are requests (a ``messages`` or ``prompt`` column, and no ``template_user``) become
  JSONL request lines; only the columns a request line knows are written (ids, ``messages``,
  ``prompt``, ``system``, ``metadata`` and request fields): any other column is the row's own
  data, kept for the dataset view, never sent;
- any other rows become a Parquet file read through the job's ``[template]``.

A run given no output path writes to ``cache_dir()/runs/NAME-KEY/output.parquet``, KEY hashing
what decides the answers: the job's request, variants, template, system message, endpoints'
URLs, engine and mode, and the input's content. Limits, retries, credentials and the progress
setting are left out, so re-running a cell with another concurrency or a higher cost cap
resumes the same output instead of paying again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batcher import jsonfast
from batcher.disk_cache import cache_dir, without_secrets
from batcher.errors import ConfigError, InputError
from batcher.input.field_names import EXTENSION_FIELDS, KNOWN_FIELDS

if TYPE_CHECKING:
    import pyarrow as pa

    from batcher.config import JobConfig

#: The keys of a request line that are not request fields (``input/reader.py``'s forms).
_LINE_KEYS = frozenset({"custom_id", "id", "messages", "prompt", "system", "metadata"})
#: Keys a request line may carry: anything else in a row is the row's own data.
REQUEST_KEYS = _LINE_KEYS | KNOWN_FIELDS | EXTENSION_FIELDS
#: Rows converted (and hashed, and written) at a time: bounds the Python objects alive at once.
_BATCH_ROWS = 10_000


@dataclass(frozen=True, kw_only=True)
class Materialised:
    """In-memory input written as a file: its path, its content's hash, whether its rows are
    requests (JSONL) or template rows (Parquet), and the rows as an Arrow table (the input's
    own columns, for the dataset view)."""

    path: Path
    digest: str
    requests: bool
    table: pa.Table


def is_in_memory(value: Any) -> bool:
    """Whether ``input=`` is rows in memory rather than a path (``as_table`` says what rows
    it takes)."""
    return not isinstance(value, str | os.PathLike)


def as_table(value: Any) -> pa.Table:
    """The rows of ``value`` as a pyarrow Table, without the pandas index or schema metadata:
    a list of dicts, a pandas DataFrame, a polars DataFrame or LazyFrame (collected), a
    pyarrow Table or RecordBatch, a ``datasets.Dataset`` as it reads (selections applied).
    Each library is imported only when ``value`` is one of its objects."""
    import pyarrow as pa

    kind = type(value).__module__.split(".")[0]
    table: pa.Table | None = None
    if isinstance(value, list | tuple):
        table = rows_table(value)
    elif isinstance(value, pa.Table):
        table = value
    elif isinstance(value, pa.RecordBatch):
        table = pa.Table.from_batches([value])
    elif kind == "pandas":
        import pandas as pd

        if isinstance(value, pd.DataFrame):
            table = pa.Table.from_pandas(value, preserve_index=False)
    elif kind == "polars":
        import polars as pl

        if isinstance(value, pl.LazyFrame):
            value = value.collect()
        if isinstance(value, pl.DataFrame):
            table = value.to_arrow()
    elif kind == "datasets":
        import datasets

        if isinstance(value, datasets.Dataset):
            table = value.with_format("arrow")[:]
    if table is None:
        raise TypeError(
            "input must be a path, a list of dicts, a pandas or polars DataFrame, a pyarrow "
            f"Table or a datasets.Dataset, not {type(value).__name__}"
        )
    return table.replace_schema_metadata(None)


def rows_table(rows: Sequence[Any]) -> pa.Table:
    """A list of dicts as a table: every key any row has, in the order first seen; a column
    Arrow cannot give one type (``1`` and ``"a"``) holds text (strings as they are, anything
    else as JSON)."""
    import pyarrow as pa

    names: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InputError(f"input row {i + 1}: not a dict (got {type(row).__name__})")
        for key in row:
            if not isinstance(key, str):
                raise InputError(f"input row {i + 1}: column name {key!r} is not a string")
            names.setdefault(key, None)
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array([_as_text(v) for v in values], pa.string())
    return pa.table(columns) if columns else pa.table({})


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return jsonfast.dumps_text(value)


def request_rows(columns: Sequence[str], template_user: str | None) -> bool:
    """Whether rows with these columns are requests: a ``messages`` or ``prompt`` column and
    no template (a template renders rows, whatever their columns are called)."""
    return template_user is None and ("messages" in columns or "prompt" in columns)


def materialise(
    value: Any, *, template_user: str | None, id_column: str | None, folder: Path
) -> Materialised:
    """Write in-memory rows to ``folder`` (JSONL requests or Parquet rows, see the module's
    docstring), named by their content's hash; a file already there is reused.

    ``id_column`` names request rows' id column (written as ``custom_id``); rows that are not
    requests need ``template_user``, else a ``ConfigError`` naming ``template_user``.
    """
    table = as_table(value)
    if not request_rows(table.column_names, template_user):
        if template_user is None:
            raise ConfigError(
                "template_user",
                "rows need a template (template_user='... {column} ...') unless they have a "
                f"'messages' or 'prompt' column; the columns are: {_names(table.column_names)}",
            )
        return _write_parquet(table, folder)
    if id_column is not None and id_column not in table.column_names:
        raise ConfigError("id_column", f"no column {id_column!r} in the input")
    rows: Iterator[Mapping[str, Any]]
    if isinstance(value, list | tuple):
        rows = iter(value)  # the caller's own objects: nothing lost to a round trip via Arrow
    else:
        rows = (row for batch in table.to_batches(_BATCH_ROWS) for row in batch.to_pylist())
    lines = (request_line(row, id_column) for row in rows)
    path, digest = _write_keyed(folder, ".jsonl", lines)
    return Materialised(path=path, digest=digest, requests=True, table=table)


def request_line(row: Mapping[str, Any], id_column: str | None = None) -> bytes:
    """One JSONL request line of a row: the keys a request line knows (``REQUEST_KEYS``) whose
    value is not null; nulls inside messages are dropped too (a table gives every message
    every key any message has). ``id_column``'s value becomes ``custom_id``."""
    line = {k: v for k, v in row.items() if k in REQUEST_KEYS and v is not None}
    if id_column is not None:
        value = row.get(id_column)
        line.pop("id", None)
        line["custom_id"] = value if value is None or isinstance(value, str | int) else str(value)
    messages = line.get("messages")
    if isinstance(messages, list):
        line["messages"] = [
            {k: v for k, v in m.items() if v is not None} if isinstance(m, Mapping) else m
            for m in messages
        ]
    return jsonfast.dumps(line) + b"\n"


def _write_parquet(table: pa.Table, folder: Path) -> Materialised:
    """Template rows as a Parquet file named by their hash (the rows' values and types, not
    their chunking nor the library they came from)."""
    import pyarrow.parquet as pq

    # the types as well as the values (a date and its text are one JSON value); string and
    # large_string alike (pandas gives one, polars the other, for the same rows)
    types = [(f.name, str(f.type).replace("large_", "")) for f in table.schema]
    digest = hashlib.sha256(json.dumps(types).encode("utf-8"))
    for batch in table.to_batches(_BATCH_ROWS):
        for row in batch.to_pylist():
            digest.update(jsonfast.dumps(row) + b"\n")
    name = digest.hexdigest()
    path = folder / f"{name[:32]}.parquet"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = _partial(folder, ".parquet")
        try:
            pq.write_table(table, partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return Materialised(path=path, digest=name, requests=False, table=table)


def _write_keyed(folder: Path, suffix: str, lines: Iterator[bytes]) -> tuple[Path, str]:
    """Write ``lines`` to ``folder``, named by their sha256 (a file already there is kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = _partial(folder, suffix)
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as f:
            for line in lines:
                digest.update(line)
                f.write(line)
        name = digest.hexdigest()
        path = folder / f"{name[:32]}{suffix}"
        if not path.exists():
            os.replace(partial, path)  # atomic: two runs at once each see a whole file
    finally:
        partial.unlink(missing_ok=True)
    return path, name


def _partial(folder: Path, suffix: str) -> Path:
    handle, name = tempfile.mkstemp(dir=folder, prefix=".partial-", suffix=suffix)
    os.close(handle)
    return Path(name)


def _names(columns: Sequence[str]) -> str:
    shown = ", ".join(repr(c) for c in columns[:8])
    return shown + (", ..." if len(columns) > 8 else "") if columns else "(none)"


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while piece := f.read(1 << 20):
                digest.update(piece)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


#: The job's parts that change how fast or how a run goes, who is told of it (``notify``) or
#: how its output is split (``split_errors``: the journal holds every answer, and each run
#: writes the output from it, split or not), not what it asks: left out of the key, so
#: changing them resumes the same output.
_NOT_IN_KEY = (
    "input", "output", "progress", "grace_s", "limits", "retry", "ray", "batch", "notify",
    "split_errors",
)  # fmt: skip


def run_key(job: JobConfig, input_digest: str) -> str:
    """The hash naming a run's default output: the job without ``_NOT_IN_KEY``, each endpoint
    reduced to its name and URL (no credentials, headers or limits), and the input's hash."""
    what = {
        f.name: getattr(job, f.name)
        for f in dataclasses.fields(job)
        if f.name not in _NOT_IN_KEY and f.name not in ("endpoint", "endpoints")
    }
    what["endpoints"] = [(e.name, without_secrets(e.base_url)) for e in job.all_endpoints]
    what["input"] = input_digest
    text = json.dumps(_plain(what), sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _plain(value: Any) -> Any:
    """Dataclasses and mappings as dicts, tuples as lists: JSON-ready."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def runs_folder() -> Path:
    """Where runs without an output path write: ``cache_dir()/runs``; a ``ConfigError`` naming
    ``output`` when the cache is off (``BATCHER_CACHE_DIR=""``)."""
    folder = cache_dir()
    if folder is None:
        raise ConfigError(
            "output", "no output path, and the cache folder is off (BATCHER_CACHE_DIR is empty)"
        )
    return folder / "runs"


def inputs_folder() -> Path | None:
    """Where in-memory input is written: ``cache_dir()/inputs``, ``None`` when the cache is off
    (the caller then uses a temporary folder for the run's duration)."""
    folder = cache_dir()
    return None if folder is None else folder / "inputs"


def default_output(job: JobConfig, input_digest: str) -> Path:
    """The output of a run given none: ``runs_folder()/NAME-KEY/output.parquet``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", job.name)[:40] or "batch"
    return runs_folder() / f"{name}-{run_key(job, input_digest)[:20]}" / "output.parquet"
