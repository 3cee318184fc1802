"""What a table input's columns are, known before its rows are sent: ``input_columns`` (a
CSV's header, a Parquet file's fields, the union of every JSONL row's keys), ``input_schema``
(the Arrow type of the output's ``input`` column; a glob's or a URI's first file), and
``count_rows`` (the progress total of a table).
"""

from __future__ import annotations

import csv
import stat
import zlib
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

from batcher import jsonfast
from batcher.errors import InputError
from batcher.input.reader import _BOM, _checked
from batcher.input.table_files import (
    Form,
    checked_header,
    csv_header,
    csv_reader,
    input_form,
    parquet_file,
    parquet_schema,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from batcher.config import JobConfig


def _json_keys(path: Path) -> list[str]:
    """The union of the keys of every JSONL row of ``path``, in first-seen order (lines that
    are no JSON object left out: the reader rejects them)."""
    from batcher.input.sources import open_input

    keys: dict[str, None] = {}
    with open_input(path) as stream:
        for raw in _checked(stream):
            raw = raw.removeprefix(_BOM).rstrip(b"\r\n")
            if raw.strip():
                try:
                    obj = jsonfast.loads_exact(raw)
                except (ValueError, RecursionError):
                    continue
                if isinstance(obj, dict):
                    keys.update(dict.fromkeys(obj))
    return list(keys)


#: The columns of the files read ahead, by (path, size, modification time): a run asks for
#: them several times (the check, each variant's reader, the output's type).
_COLUMNS: dict[tuple[Path, int, int], list[str]] = {}


def input_columns(path: Path) -> list[str] | None:
    """The input's columns, known before its rows are read: a CSV's header, a Parquet file's
    fields, the union of every JSONL row's keys (first-seen order); ``None`` for stdin, a
    pipe or FIFO, or a JSONL file that cannot be read to its end."""
    if str(path) == "-":
        return None
    form = input_form(path)
    if form == "parquet":
        return list(parquet_schema(path).names)
    if form != "jsonl":
        return csv_header(path, form)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return None  # a pipe or a FIFO: reading ahead would consume it
        key = (path.resolve(), info.st_size, info.st_mtime_ns)
        if key not in _COLUMNS:
            if len(_COLUMNS) >= 8:
                _COLUMNS.clear()
            _COLUMNS[key] = _json_keys(path)
    except (OSError, EOFError, zlib.error, InputError):
        return None  # missing or unreadable to its end: the reader reports it, with the line
    return list(_COLUMNS[key])


def input_schema(job: JobConfig) -> pa.Schema | None:
    """The Arrow schema of the ``input`` column (the rows' own columns); ``None`` without a
    template (request lines have no row).

    CSV and TSV carry no types: every column is ``pa.string()``. Parquet gives its own schema.
    A glob or a URI (the Ray engine's input, read on its workers) takes its first file's (in
    sorted order, as they are read): a CSV's header or a Parquet file's footer, no rows.
    JSONL rows: the union of every row's keys (``input_columns``), each ``pa.string()``
    (other values as JSON text). Standard input unread (the Ray engine's) has none (``None``).
    """
    import pyarrow as pa

    if job.template is None or job.input is None or str(job.input) == "-":
        return None  # no template, no input, or stdin
    form = input_form(job.input)
    if form == "jsonl":
        if not isinstance(job.input, Path):
            return None  # a URI's rows are not read ahead (each row holds its own keys)
        names = input_columns(job.input) or []
    else:
        first = _first_file(job.input)
        if form == "parquet":
            return parquet_schema(first) if isinstance(first, Path) else _remote_parquet(first)
        names = csv_header(first, form) if isinstance(first, Path) else _remote_header(first, form)
    return pa.schema([pa.field(name, pa.string()) for name in names])


def _first_file(location: Path | str) -> Path | str:
    """The input itself, or a glob's first match (``storage.expand`` sorts them)."""
    from batcher import storage

    if isinstance(location, Path) and (location.is_file() or not storage.has_glob(location)):
        return location  # a file whose name holds ``[`` or ``*`` is read, not matched
    return storage.expand(location)[0]


def _remote_header(uri: str, form: Form) -> list[str]:
    """A CSV or TSV object's header, read from its first bytes (a ``.gz`` decompressed)."""
    import gzip

    from batcher import storage

    with storage.open_file(uri) as raw:
        stream = gzip.GzipFile(fileobj=raw) if uri.split("?", 1)[0].endswith(".gz") else raw
        try:
            first = next(csv_reader(cast(IO[bytes], stream), form), [])
        except (csv.Error, OSError, EOFError, zlib.error) as exc:
            raise InputError(f"cannot read the header of {storage.shown(uri)}: {exc}") from None
    return checked_header(first)


def _remote_parquet(uri: str) -> pa.Schema:
    """A Parquet object's schema, from its footer (its rows are not read)."""
    from batcher import storage

    with storage.open_seekable(uri) as stream:
        schema: pa.Schema = parquet_file(stream).schema_arrow
    return schema.remove_metadata()


def count_rows(path: Path) -> int | None:
    """The rows of a table (the progress total): a Parquet file's from its metadata (no data
    read), a CSV's by reading it through; ``None`` for request lines (``count_lines``)."""
    form = input_form(path)
    if form == "parquet":
        from batcher.input.sources import open_input

        try:
            with open_input(path) as stream:
                return int(parquet_file(stream).metadata.num_rows)
        except (OSError, InputError):
            return None
    if form in ("csv", "tsv"):
        return _count_csv(path, form)
    return None


def _count_csv(path: Path, form: Form) -> int | None:
    from batcher.input.sources import open_input

    try:
        with open_input(path) as stream:
            rows = csv_reader(stream, form)
            return max(0, sum(1 for fields in rows if fields) - 1)  # the header aside
    except (OSError, csv.Error, InputError):
        return None
