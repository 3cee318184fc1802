"""Output writers: OpenAI Batch API JSONL or Parquet, written incrementally.

Both writers stream: JSONL goes through a buffered file, Parquet keeps at most one row group of
column lists in memory. Both write ``PATH.partial`` and ``os.replace`` it onto ``PATH`` on
``close()``, so a reader never sees a half-written file. A result becomes its row (``row``: the
line's text, or the Parquet columns' values) apart from being written (``write_row``), so a
caller may hold rows, converted, and write them in another order (``live_output``). What a row
holds, and ``read_results``, which reads either format back, are in ``rows`` (re-exported here).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self

import pyarrow as pa
import pyarrow.parquet as pq

from batcher.errors import OutputError
from batcher.output.formats import SUFFIXES as SUFFIXES
from batcher.output.formats import Closing
from batcher.output.formats import RejectsWriter as RejectsWriter
from batcher.output.formats import output_format as output_format
from batcher.output.reading import parquet_parts as parquet_parts
from batcher.output.reading import read_results as read_results
from batcher.output.rows import ENCODE, NAMES, PLAIN, row_values, schema_for, typed_values
from batcher.output.rows import SCHEMA as SCHEMA
from batcher.output.rows import batch_output_line as batch_output_line
from batcher.output.rows import parquet_row as parquet_row
from batcher.output.shape import OutputShape
from batcher.output.typed import cast, column, fit
from batcher.records import Result

# About 6 MB of buffered rows. Each row group also costs the writer about 30 KB of footer
# metadata held until the file closes (pyarrow has no buffered row-group mode to avoid it):
# with 2,000-row groups a 1,000,000-row output grew the process by 20 MB over a 100,000-row one,
# with 5,000 by 8 MB, while 20,000-row groups cost more in buffered rows than they save.
DEFAULT_ROW_GROUP_SIZE = 5_000
# Rows are held as Python objects only this many at a time, then as Arrow arrays until a row
# group is full: a row group of Python rows takes about twice the memory.
_CONVERT_EVERY = 250

# Dictionary encoding only where values repeat: on unique text (ids, answers, bodies) it is
# tried on every page, then given up, which cost 10 % more CPU and 6 % more bytes.
_DICTIONARY = ["status", "model", "finish_reason", "error_code", "endpoint", "variant"]
# Min/max statistics where a reader may filter on them; not on long text (answers, bodies),
# whose values would sit in the footer, kept in memory until the file is closed.
_STATISTICS = [
    f.name for f in SCHEMA
    if f.name not in {"content", "error_message", "request_id", "metadata", "response",
                      "choices", "schema_error"}
]  # fmt: skip


class Writer(Protocol):
    """What the engine needs from an output writer."""

    @property
    def rows_written(self) -> int:
        """Results accepted by ``write`` so far."""
        ...

    def write(self, result: Result) -> None:
        """Append one result."""
        ...

    def row(self, result: Result) -> Any:
        """A result's row, converted, for ``write_row``."""
        ...

    def write_row(self, row: Any) -> None:
        """Append a row made by ``row``."""
        ...

    def close(self) -> None:
        """Finish the file and move it onto its final path; idempotent."""
        ...

    def add_metadata(self, metadata: Mapping[str, str]) -> None:
        """Add key-value metadata known only at the end (Parquet; JSONL has no place for it)."""
        ...

    def abort(self) -> None:
        """Drop the unfinished file; whatever was at the path before stays."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class _AtomicFile(Closing):
    """Shared plumbing: the ``.partial`` path and an idempotent, atomic close."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.rows_written = 0
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        except OSError as exc:
            raise OutputError(f"cannot write {self.partial}: {exc.strerror or exc}") from exc

    def _open(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush, finish the file and atomically rename it onto ``path``; idempotent."""
        if self._closed:
            return
        self._closed = True  # even if finishing fails: a second close must not write again
        try:
            self._finish()
            os.replace(self.partial, self.path)
        except OSError as exc:
            self.partial.unlink(missing_ok=True)
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def abort(self) -> None:
        """Drop the ``.partial`` file; whatever was at ``path`` before stays untouched."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):  # the file is being thrown away anyway
            self._release()
        self.partial.unlink(missing_ok=True)

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Interrupted (Ctrl+C, a disk error, a bad record): a half-written output must never
        # replace a whole one. The journal still holds everything; the next run writes it.
        if et is None:
            self.close()
        else:
            self.abort()


class JsonlWriter(_AtomicFile):
    """Writes one compact OpenAI Batch API output line per result (UTF-8)."""

    _f: IO[str]

    def __init__(self, path: Path, *, shape: OutputShape = PLAIN) -> None:
        """Start ``PATH.partial``; ``shape.parsed`` says whether lines carry ``parsed``."""
        self._parsed = shape.parsed is not None
        super().__init__(path)

    def _open(self) -> None:
        # backslashreplace: a lone surrogate (possible from a JSON "\ud800" escape in the input)
        # becomes the text \ud800, which inside a JSON string is the same escape: no crash, and
        # json.loads gives the original string back.
        self._f = open(  # noqa: SIM115 - closed in _finish
            self.partial,
            "w",
            encoding="utf-8",
            errors="backslashreplace",
            newline="\n",
            buffering=1 << 16,
        )

    def write(self, result: Result) -> None:
        """Append the result's line to the buffered file."""
        self._f.write(ENCODE(batch_output_line(result, parsed=self._parsed)) + "\n")
        self.rows_written += 1

    def row(self, result: Result) -> str:
        """The result's line, for ``write_row``."""
        return ENCODE(batch_output_line(result, parsed=self._parsed)) + "\n"

    def write_row(self, row: str) -> None:
        """Append a line made by ``row``."""
        self._f.write(row)
        self.rows_written += 1

    def add_metadata(self, metadata: Mapping[str, str]) -> None:
        """JSONL lines have no place for file-level metadata: nothing to do."""

    def flush(self) -> None:
        """Push buffered lines to the OS (the file is still ``.partial`` until ``close``)."""
        self._f.flush()

    def _finish(self) -> None:
        with self._f:
            self._f.flush()
            os.fsync(self._f.fileno())  # the rename must not land before the data

    def _release(self) -> None:
        self._f.close()


class ParquetWriter(_AtomicFile):
    """Writes results as Parquet (zstd) with SCHEMA and the shape's typed columns after it,
    one row group every ``row_group_size``."""

    def __init__(
        self,
        path: Path,
        *,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
        metadata: Mapping[str, str] | None = None,
        shape: OutputShape = PLAIN,
    ) -> None:
        """Start ``PATH.partial``; rows are buffered and written ``row_group_size`` at a time.

        ``metadata`` goes into the file's key-value metadata (provenance: job, version, input);
        ``shape`` says which typed columns follow SCHEMA's (``messages`` always).
        """
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
        self.row_group_size = row_group_size
        self._shape = shape
        schema = schema_for(shape)
        self._schema = schema.with_metadata(dict(metadata)) if metadata else schema
        self._rows: list[tuple[Any, ...]] = []  # rows not yet converted
        self._batches: list[pa.RecordBatch] = []
        self._buffered = 0  # rows in self._batches
        super().__init__(path)

    def _open(self) -> None:
        self._pq = pq.ParquetWriter(
            self.partial,
            self._schema,
            compression="zstd",
            use_dictionary=_DICTIONARY,
            write_statistics=_STATISTICS,
        )

    def write(self, result: Result) -> None:
        """Buffer the result's row; a full buffer is written out as a row group."""
        self.write_row((*row_values(result), *typed_values(result, self._shape)))

    def row(self, result: Result) -> tuple[Any, ...]:
        """The result's values in the file's column order, for ``write_row``."""
        return (*row_values(result), *typed_values(result, self._shape))

    def write_row(self, row: tuple[Any, ...]) -> None:
        """Buffer a row made by ``row``; a full buffer is written out as a row group."""
        rows = self._rows
        rows.append(row)
        self.rows_written += 1
        if len(rows) >= min(_CONVERT_EVERY, self.row_group_size - self._buffered):
            self._convert()
            if self._buffered >= self.row_group_size:
                self._write_group()

    def add_metadata(self, metadata: Mapping[str, str]) -> None:
        """Add key-value metadata to the file's footer (how its run ended), before ``close``."""
        if metadata:
            self._pq.add_key_value_metadata(dict(metadata))

    def _convert(self) -> None:
        """Turn the buffered Python rows into an Arrow batch: about half the memory."""
        fields = self._schema
        # Rows to columns in one C-level transpose: cheaper than appending each value of each
        # row to its column's list as the row comes.
        columns = zip(*self._rows, strict=True)
        arrays = [_array(list(col), field.type) for col, field in zip(columns, fields, strict=True)]
        self._rows = []
        batch = pa.RecordBatch.from_arrays(arrays, schema=self._schema)
        self._batches.append(batch)
        self._buffered += len(arrays[0])

    def _write_group(self) -> None:
        table = pa.Table.from_batches(self._batches, schema=self._schema)
        self._batches, self._buffered = [], 0
        self._write_table(table)

    def _write_table(self, table: pa.Table) -> None:
        try:
            self._pq.write_table(table, row_group_size=self.row_group_size)
        except OSError as exc:
            raise OutputError(f"cannot write {self.partial}: {exc.strerror or exc}") from exc

    def _finish(self) -> None:
        try:
            if self._rows:
                self._convert()
            if self._batches:
                self._write_group()
        finally:
            self._pq.close()  # with no rows this still writes a valid file with the schema
        fd = os.open(self.partial, os.O_RDONLY)
        try:
            os.fsync(fd)  # pyarrow owns its file handle, so sync by path before the rename
        finally:
            os.close(fd)

    def _release(self) -> None:
        self._pq.close()


def results_table(
    results: Iterable[Result],
    metadata: Mapping[str, str] | None = None,
    *,
    shape: OutputShape = PLAIN,
) -> pa.Table:
    """The results as one Arrow table with SCHEMA and ``shape``'s typed columns (the Ray
    engine's blocks)."""
    full = schema_for(shape)
    cols: list[list[Any]] = [[] for _ in full]
    for result in results:
        values = (*row_values(result), *typed_values(result, shape))
        for col, value in zip(cols, values, strict=True):
            col.append(value)
    schema = full.with_metadata(dict(metadata)) if metadata else full
    arrays = [_array(col, field.type) for col, field in zip(cols, full, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


def rows_table(rows: Iterable[Mapping[str, Any]], *, shape: OutputShape = PLAIN) -> pa.Table:
    """Rows read back by ``read_results`` as one Arrow table with SCHEMA and ``shape``'s typed
    columns (each value fitted to its column's type); values Arrow refuses (a lone surrogate
    in an answer) are coerced as when writing."""
    typed = shape.fields()
    cols: list[list[Any]] = [[] for _ in range(len(NAMES) + len(typed))]
    fixed, extra = cols[: len(NAMES)], cols[len(NAMES) :]
    for row in rows:
        for col, name in zip(fixed, NAMES, strict=True):
            col.append(row.get(name))
        for col, field in zip(extra, typed, strict=True):
            col.append(fit(row.get(field.name), field.type))
    schema = schema_for(shape)
    arrays = [_array(col, field.type) for col, field in zip(cols, schema, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


def _array(values: list[Any], type_: pa.DataType) -> pa.Array:
    """Build a column; on a value pyarrow refuses, coerce that column instead of losing rows."""
    try:
        return pa.array(values, type=type_)
    except (ValueError, TypeError, OverflowError):  # ArrowInvalid is a ValueError
        if pa.types.is_struct(type_):  # a typed column (``input``, ``parsed``)
            return column(values, type_)
        return pa.array([_coerce(v, type_) for v in values], type=type_)


def _coerce(value: Any, type_: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(type_):
        # Lone surrogates are not UTF-8: keep them as their \uXXXX escape text.
        return str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    if pa.types.is_integer(type_):
        bits = type_.bit_width - 1
        ok = isinstance(value, int) and -(1 << bits) <= value < (1 << bits)
        return value if ok else None  # e.g. a server's absurd usage count
    if pa.types.is_floating(type_):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    if pa.types.is_list(type_) and type_.equals(SCHEMA.field("choices").type):
        fields = type_.value_type  # coerce each field of each choice
        return [{f.name: _coerce(item.get(f.name), f.type) for f in fields} for item in value]
    # A typed column (fitted already): only a value of a type no schema gives (a Parquet
    # input's own, read back from the journal as text) can be refused: cast leaf by leaf.
    return cast(value, type_)


def open_writer(
    path: Path,
    *,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    metadata: Mapping[str, str] | None = None,
    shape: OutputShape = PLAIN,
) -> Writer:
    """Open the writer for ``path`` by its suffix; ``row_group_size`` and ``metadata`` apply to
    Parquet only (JSONL lines have no place for file-level metadata). ``shape``: the typed
    columns (JSONL lines carry ``messages``, ``input`` and ``parsed`` in ``batcher``)."""
    suffix = output_format(path)
    if suffix == ".parquet":
        return ParquetWriter(path, row_group_size=row_group_size, metadata=metadata, shape=shape)
    return JsonlWriter(path, shape=shape)
