"""Tables as input: CSV, TSV, Parquet, and JSONL lines read as rows, through ``[template]``.

``reader_for`` is the one place a ``Reader`` is made: the JSONL request reader for request
lines, or a ``TableReader`` when the input is a table (by its suffix, ``.gz`` aside) or the job
has a ``[template]``. Each row is rendered through the template (a system message when
``template.system`` is set, then the user message) into a request, and keeps its own columns
in ``Request.input``. Its id is the ``id_column``'s value, else its 1-based row number.

Rows are streamed: CSV/TSV through the ``csv`` module (the header is the first row; data rows
are numbered from 1, blank rows skipped), Parquet a batch of rows at a time
(``ParquetFile.iter_batches``, never the whole file), JSONL rows a line at a time (numbered by
line, as request lines are).

The columns are known before anything is sent (``columns.input_columns``), so a template
naming a column the input does not have is a ``ConfigError`` (``check_input``), instead of a
reject on every row. A file's form and its low-level reading are in ``table_files``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from batcher import jsonfast
from batcher.errors import ConfigError, InputError
from batcher.input.columns import input_columns
from batcher.input.reader import (
    _BOM,
    LineError,
    Reader,
    _check_unicode,
    _checked,
    _json_kind,
    _loads,
    _text,
    request_of,
)
from batcher.input.table_files import (
    PARQUET_BATCH_ROWS,
    Form,
    checked_header,
    csv_reader,
    input_form,
    parquet_file,
)
from batcher.input.template import MissingColumn, parse_template, value_text
from batcher.records import Reject, Request

if TYPE_CHECKING:
    from batcher.config import JobConfig, TemplateConfig, VariantConfig
    from batcher.input.field_names import FieldNames
    from batcher.input.idset import IdSet


def check_input(job: JobConfig, path: Path | str | None = None) -> None:
    """Refuse a table (the job's input, or ``path``) with no ``[template]``: nothing could be
    sent. A bad template is refused too, naming its field: an empty ``user``, a brace out of
    place, or a column (``{name}`` or ``id_column``) that the input's columns do not hold."""
    path = job.input if path is None else path
    form = input_form(path)
    if str(path) == "-" and job.input_format not in (None, "jsonl"):  # stdin not copied
        raise ConfigError(
            "job.input_format",
            "a table on standard input needs the local engine: save it to a file",
        )
    if job.template is None:
        if form != "jsonl":
            raise ConfigError(
                "template.user",
                f"the input is a table (.{form}): give [template] user (or --template-user) "
                "to turn each row into a request, e.g. 'Answer: {question}'",
            )
        return
    if not job.template.user.strip():
        raise ConfigError(
            "template.user", "empty: give the user message, with {column} placeholders"
        )
    named = [
        (c, "template.user") for c in parse_template(job.template.user, "template.user").columns
    ]
    if job.template.system:
        system = parse_template(job.template.system, "template.system")
        named += [(c, "template.system") for c in system.columns]
    if job.template.id_column is not None:
        named.append((job.template.id_column, "template.id_column"))
    # stdin and pipes are not read ahead; a URI or a glob is checked on its local copy
    columns = input_columns(path) if isinstance(path, Path) and path.is_file() else None
    if not columns:
        return  # nothing to check against (or no rows at all)
    known = set(columns)
    for column, field in named:
        if column not in known:
            shown = ", ".join(repr(c) for c in columns[:_SHOWN_COLUMNS])
            more = (
                f" and {len(columns) - _SHOWN_COLUMNS} more"
                if len(columns) > _SHOWN_COLUMNS
                else ""
            )
            raise ConfigError(
                field, f"no column {column!r} in the input; its columns: {shown}{more}"
            )


#: The input's columns named in a message about a column it does not have.
_SHOWN_COLUMNS = 20


def reader_for(
    job: JobConfig,
    stream: IO[bytes],
    *,
    path: Path | str | None = None,
    variant: VariantConfig | None = None,
    count_tokens: bool = True,
    fields: FieldNames | None = None,
    warn: Callable[[str], object] | None = None,
    first_line: int = 1,
    seen: IdSet | None = None,
) -> Reader:
    """The reader of ``stream`` (the job's input, or ``path``) for one pass (one ``variant``);
    ``first_line`` and ``seen`` for a later file of several (``Reader``)."""
    path = job.input if path is None else path
    check_input(job, path)
    options: dict[str, Any] = {
        "encoding": job.limits.encoding,
        "variant": variant,
        "count_tokens": count_tokens,
        "fields": fields,
        "warn": warn,
        "system": job.system,
        "first_line": first_line,
        "seen": seen,
    }
    if job.template is None:
        return Reader(stream, job.request, **options)
    form = input_form(path)
    # JSONL rows: every row's ``input`` holds the union of the rows' keys, as the output's type
    columns = None
    if form == "jsonl" and isinstance(path, Path) and path.is_file():
        columns = input_columns(path)
    return TableReader(stream, form, job.template, job.request, columns=columns or None, **options)


@dataclass(frozen=True, slots=True)
class _Row:
    """One row: its number, its cells to render from, its ``input`` columns."""

    number: int
    values: Mapping[str, Any]
    cells: dict[str, Any]


class TableReader(Reader):
    """A ``Reader`` of rows: each rendered through the template into a request.

    ``columns`` (JSONL rows) are the keys every row's ``input`` holds (absent ones null);
    without them a row holds its own keys.

    A row the template cannot render (a column it names is missing), with an empty or missing
    id, or one the table cannot give (a CSV row with more fields than the header, a JSONL row
    that is no object) is a ``Reject`` with its row number and a reason naming the column.
    """

    def __init__(
        self,
        stream: IO[bytes],
        form: Form,
        template: TemplateConfig,
        defaults: Mapping[str, Any] | None = None,
        *,
        columns: list[str] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(stream, defaults, **options)
        self._form = form
        self._columns = columns
        self._user = parse_template(template.user, "template.user")
        self._system_t = (
            parse_template(template.system, "template.system") if template.system else None
        )
        self._id_column = template.id_column

    def _items(self) -> Iterator[tuple[Request | Reject, bytes | None]]:
        rows = {"csv": _csv_rows, "tsv": _csv_rows, "parquet": _parquet_rows, "jsonl": _jsonl_rows}
        for row in rows[self._form](self):
            yield (row if isinstance(row, Reject) else self._request(row)), None

    def _request(self, row: _Row) -> Request | Reject:
        custom_id: str | None = None
        try:
            custom_id = self._id_of(row)
            messages = []
            if self._system_t is not None:
                messages.append({"role": "system", "content": self._system_t.render(row.values)})
            messages.append({"role": "user", "content": self._user.render(row.values)})
            return request_of(
                {"messages": messages},
                custom_id=custom_id,
                line_no=row.number,
                defaults=self._defaults,
                encoding=self._encoding,
                variant=self._variant,
                count=self._count,
                system=self._system,
                row=row.cells,
            )
        except (LineError, MissingColumn) as exc:
            return Reject(
                line=row.number, reason=str(exc), text=_row_text(row.cells), custom_id=custom_id
            )

    def _id_of(self, row: _Row) -> str:
        column = self._id_column
        if column is None:
            return str(row.number)
        if column not in row.values:
            raise MissingColumn(column, "template.id_column")
        value = row.values[column]
        text = "" if value is None else value_text(value)
        if not text:
            raise LineError(f"empty id in column {column!r} (template.id_column)")
        _check_unicode(column, text)
        return text

    def _note_row(self, number: int) -> None:
        self.lines_read = number


def _row_text(cells: Mapping[str, Any]) -> str:
    """A rejected row as the rejects file keeps it: its columns as a JSON object."""
    return jsonfast.dumps_text(cells)


# --- CSV and TSV ---------------------------------------------------------------------------


def _csv_rows(reader: TableReader) -> Iterator[_Row | Reject]:
    rows = csv_reader(reader._stream, reader._form)
    number = reader._first - 1
    header: list[str] | None = None
    while True:
        try:
            fields = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:  # a NUL byte, say
            where = "the header" if header is None else f"row {number}"
            raise InputError(f"cannot read the input after {where}: {exc}") from None
        if header is None:
            header = checked_header(fields)
            continue
        if not fields:
            reader.blank_lines += 1
            continue
        number += 1
        reader._note_row(number)
        cells: dict[str, Any] = dict(zip(header, fields, strict=False))
        if len(fields) > len(header):
            yield Reject(
                line=number,
                reason=f"row has {len(fields)} fields, the header has {len(header)}",
                text=_row_text({**cells, "": fields[len(header) :]}),
            )
            continue
        # a short row lacks its last columns: a template naming one rejects it
        yield _Row(number, cells, {name: cells.get(name) for name in header})


# --- Parquet -------------------------------------------------------------------------------


def _parquet_rows(reader: TableReader) -> Iterator[_Row | Reject]:
    parquet = parquet_file(reader._stream)
    number = reader._first - 1
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # a corrupt page: pyarrow's own errors
            raise InputError(f"cannot read the input after row {number}: {exc}") from None
        for cells in batch.to_pylist():
            number += 1
            reader._note_row(number)
            yield _Row(number, cells, cells)


# --- JSONL rows ----------------------------------------------------------------------------


def _jsonl_rows(reader: TableReader) -> Iterator[_Row | Reject]:
    keys = reader._columns  # every row's keys, read ahead (else each row's own)
    for number, raw in enumerate(_checked(reader._stream), start=reader._first):
        reader._note_row(number)
        if number == reader._first and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        if not raw.strip():
            reader.blank_lines += 1
            continue
        raw = raw.rstrip(b"\r\n")
        try:
            obj = _json_row(raw)
        except LineError as exc:
            yield Reject(line=number, reason=str(exc), text=_text(raw))
            continue
        names = obj if keys is None else keys
        yield _Row(number, obj, {key: _json_cell(obj.get(key)) for key in names})


def _json_row(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LineError(f"invalid UTF-8 at byte {exc.start}") from None
    obj = _loads(text)
    if not isinstance(obj, dict):
        raise LineError(f"not a JSON object (got {_json_kind(obj)})")
    if jsonfast.too_deep(obj, text):
        raise LineError(jsonfast.TOO_DEEP)
    return obj


def _json_cell(value: Any) -> str | None:
    """A JSONL row's value as its ``input`` column holds it: text, other values as JSON."""
    if value is None or isinstance(value, str):
        return value
    return jsonfast.dumps_text(value)


# --- the input column's schema -------------------------------------------------------------
