"""A table file's form and its low-level reading: the form by suffix (``input_form``), CSV/TSV
lines through the ``csv`` module, a CSV header, a Parquet file opened for streaming and its
schema. What the rows become is ``tabular``'s; what the columns are, ``columns``'.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from batcher.errors import ConfigError, InputError
from batcher.input.reader import _BOM, _checked

if TYPE_CHECKING:
    import pyarrow as pa

Form = Literal["jsonl", "csv", "tsv", "parquet"]

#: The table forms, by suffix (after a ``.gz``, if any).
TABLE_SUFFIXES: dict[str, Form] = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}

#: Rows decoded at a time from a Parquet file: a few hundred KB of Python objects at most.
PARQUET_BATCH_ROWS = 1024

#: Bytes read at a time from a Parquet column chunk, so a large row group (pyarrow writes up
#: to a million rows in one) is not read into memory whole.
PARQUET_BUFFER_BYTES = 1 << 20


def input_form(path: Path | str | None) -> Form:
    """The input's form by its suffix: ``csv``, ``tsv``, ``parquet``, else ``jsonl`` (stdin too).
    ``path`` may be an object-storage URI (text): its query aside."""
    if path is None or str(path) == "-":
        return "jsonl"
    if isinstance(path, str):
        path = Path(path.split("?", 1)[0])
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        if len(suffixes) > 1 and suffixes[-2] == ".parquet":
            raise ConfigError("job.input", "a Parquet file is compressed inside: do not gzip it")
        suffixes.pop()
    return TABLE_SUFFIXES.get(suffixes[-1], "jsonl") if suffixes else "jsonl"


#: The longest CSV field read (the csv module's default, 128 KiB, is shorter than a document).
CSV_FIELD_LIMIT = 2**31 - 1


def text_lines(stream: IO[bytes]) -> Iterator[str]:
    """``stream``'s lines as text, line endings kept for the csv module (a leading BOM
    dropped); invalid UTF-8 or an unreadable stream is an ``InputError`` naming the line."""
    for number, raw in enumerate(_checked(stream), start=1):
        line = raw.removeprefix(_BOM) if number == 1 else raw
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"invalid UTF-8 on line {number} of the input, at byte {exc.start + 1}"
            ) from None


def csv_reader(stream: IO[bytes], form: Form) -> Iterator[list[str]]:
    """The csv module's reader of ``stream``: commas, or tabs for TSV."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    return csv.reader(text_lines(stream), delimiter="\t" if form == "tsv" else ",")


def checked_header(fields: list[str]) -> list[str]:
    seen: set[str] = set()
    for name in fields:
        if name in seen:
            raise InputError(f"the input's header names column {name!r} twice")
        seen.add(name)
    return fields


def csv_header(path: Path, form: Form) -> list[str]:
    from batcher.input.sources import open_input

    with open_input(path) as stream:
        try:
            first = next(csv_reader(stream, form), [])
        except csv.Error as exc:
            raise InputError(f"cannot read the input's header: {exc}") from None
    return checked_header(first)


def parquet_file(stream: IO[bytes]) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(stream, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...
        raise InputError(f"cannot read the input as Parquet: {exc}") from None


def parquet_schema(path: Path) -> pa.Schema:
    from batcher.input.sources import open_input

    with open_input(path) as stream:
        schema: pa.Schema = parquet_file(stream).schema_arrow
    return schema.remove_metadata()
