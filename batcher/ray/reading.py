"""The Ray engine's input, read on a worker: the input's files listed (local paths, globs, URIs
pyarrow knows, such as ``s3://`` or ``gs://``), then streamed through the same ``Reader`` as a
local run, into request blocks for the actor pool.

One read task goes through the files in the order of their sorted names, so a line's number
runs on across files (the second file's first line follows the first file's last), a duplicate
id is rejected wherever it is (the files' readers share one ``IdSet``), and the first
occurrence wins, as in a local run: ids made from line or row numbers, and rejects' text (the
line as it stands, a row as JSON), are those of the files joined into one. The driver
only lists the files and parses none of them (with progress on, it counts a single local
file's lines for the total, as a local run does), so its memory does not grow with the input
and the first request does not wait for it to be read. One task parses about 30,000 lines a
second, more than one process sends; the blocks stream to the pool as they are made.

A block crosses Ray Data as one row holding the Arrow table in IPC bytes (``pack``/``unpack``):
Ray Data merges and slices blocks by size, which would hold the first requests back until
megabytes were read and cut blocks at arbitrary rows; one row is never merged or cut when the
dataset's target block size is one byte (``session.py``).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from batcher import jsonfast, storage
from batcher.errors import ConfigError, InputError
from batcher.input.idset import IdSet
from batcher.input.sources import open_input
from batcher.records import Reject, Request

if TYPE_CHECKING:
    import pyarrow as pa

    from batcher.config import JobConfig

#: Columns of a request block: a parsed ``Request`` (bodies as JSON text), then the row's
#: ``kind`` (``SEND``, or a marker the driver counts) and a reject's ``reason`` and ``text``.
REQUEST_COLUMNS = (
    "custom_id", "line", "body", "metadata", "prompt_tokens", "completion_budget", "body_hash",
    "input", "kind", "reason", "text",
)  # fmt: skip
_TYPES = {
    "prompt_tokens": "int64", "completion_budget": "int64", "line": "int64",
    "custom_id": "string", "body": "string", "metadata": "string", "body_hash": "string",
    "input": "string", "kind": "string", "reason": "string", "text": "string",
}  # fmt: skip
#: A request to send.
SEND = "send"
#: Markers: a line rejected (``reason``, ``text``); an id done already (skipped); an id
#: recorded before and sent again (its request is in the block too); the lines read (``line``).
REJECTED, SKIPPED, RESENT, READ = "rejected", "skipped", "resent", "read"
MARKERS = (REJECTED, SKIPPED, RESENT, READ)


@dataclass(frozen=True, kw_only=True)
class ReadPlan:
    """What the read task needs: the job, its input files, the block size, and what the
    output holds already (``known``: id -> (done for this run, request hash or ``None`` when
    the part that holds it predates hashes); a Ray object reference to that mapping, or the
    mapping itself)."""

    job: JobConfig
    files: list[str]
    block_rows: int
    known: Any = None


_COLLAPSED = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/(?!/)(.*)", re.DOTALL)


def input_spec(path: Path | str) -> str:
    """The input as the user gave it: a path, a glob, or a URI (a ``Path`` made of
    ``s3://bucket/key`` reads ``s3:/bucket/key``; the second slash is put back)."""
    text = str(path)
    collapsed = _COLLAPSED.fullmatch(text)
    if collapsed is None:
        return text
    scheme, rest = collapsed[1], collapsed[2]
    return f"file:///{rest}" if scheme == "file" else f"{scheme}://{rest}"


def is_uri(name: str) -> bool:
    """Whether ``name`` is a URI (``s3://``, ``gs://``, ``file://``...) rather than a path."""
    scheme, sep, _ = name.partition("://")
    return bool(sep) and scheme.isidentifier()


def input_files(spec: str) -> list[str]:
    """The input's files, sorted: ``spec`` itself, or the files a glob in it matches (local
    or in a store, ``storage.expand``). Fails with an ``InputError`` naming ``spec`` (a URI's
    credentials redacted) when there are none."""
    if spec == "-":
        raise ConfigError(
            "job.input", "the Ray engine reads the input on its workers: give a file, not -"
        )
    where = storage.location(spec)
    if isinstance(where, Path) and where.is_file():
        return [spec]  # a file whose name holds ``[`` or ``*`` is read, not matched
    files = storage.expand(where)
    if len(files) == 1 and not storage.has_glob(where):
        found = files[0]
        missing = (
            not found.is_file()
            if isinstance(found, Path)
            else not storage.exists(found, "job.input")
        )
        if missing:
            raise InputError(f"input file not found: {storage.shown(found)}")
    return [str(f) for f in files]


def open_file(name: str) -> IO[bytes]:
    """One input file opened for binary reading (a ``.gz`` file decompressed)."""
    if not is_uri(name):
        return open_input(Path(name))
    from batcher.input.table_files import input_form

    fs, path = storage.filesystem(name)
    try:
        if input_form(Path(path)) == "parquet":  # read by row groups: a seekable file
            return fs.open_input_file(path)  # type: ignore[no-any-return]
        stream = fs.open_input_stream(path)  # .gz: decompressed by suffix
        return cast(IO[bytes], io.BufferedReader(stream, buffer_size=1 << 20))
    except Exception as exc:
        reason = storage.reason(exc, name)
        raise InputError(f"cannot open input {storage.shown(name)}: {reason}") from None


def read_blocks(batch: pa.Table, plan: ReadPlan) -> Iterator[pa.Table]:
    """The read task (a Ray Data ``map_batches`` function over one row): every input file
    through the job's reader, as packed request blocks (``pack``)."""
    from batcher.ray.worker import ERROR_MARK

    try:
        for table in request_tables(plan):
            yield pack(table)
    except (InputError, ConfigError) as exc:  # one line for the driver to show
        raise RuntimeError(ERROR_MARK + str(exc)) from None


def request_tables(plan: ReadPlan) -> Iterator[pa.Table]:
    """The input's requests in tables of up to ``block_rows`` to send, with marker rows."""
    from batcher.input.tabular import reader_for

    known = plan.known if plan.known is not None else {}
    if not isinstance(known, Mapping):  # in the object store
        import ray

        known = ray.get(known)
    job, rows = plan.job, _Rows(plan.block_rows)
    seen = IdSet()  # the ids of every file read so far
    read = 0  # the lines (a table's rows) of the files read so far
    try:
        for name in plan.files:
            source = open_file(name)
            try:
                reader = reader_for(
                    job, source, path=Path(name), count_tokens=job.counts_tokens,
                    first_line=read + 1, seen=seen,
                )  # fmt: skip
                for item in reader:
                    rows.add(_checked(item, known))
                    if rows.full():
                        yield rows.table()
                read = reader.lines_read
            finally:
                source.close()
    finally:
        seen.close()
    rows.marker(READ, line=read)
    yield rows.table()


def _checked(
    item: Request | Reject, known: Mapping[str, tuple[bool, str | None]]
) -> Request | Reject | tuple[str, Request | str]:
    """An item as the block holds it: a request, a reject, ``(SKIPPED, id)`` for an id done
    already, ``(RESENT, request)`` for one recorded before and sent again (an error retried,
    or its line changed)."""
    if isinstance(item, Reject):
        return item
    entry = known.get(item.custom_id)
    if entry is None:
        return item
    done, recorded = entry
    if done and (recorded is None or recorded == item.body_hash):
        return (SKIPPED, item.custom_id)
    return (RESENT, item)


class _Rows:
    """Columns being filled for the next block."""

    def __init__(self, block_rows: int) -> None:
        self._limit = block_rows
        self._requests = 0
        self._columns: dict[str, list[Any]] = {name: [] for name in REQUEST_COLUMNS}

    def add(self, item: Request | Reject | tuple[str, Request | str]) -> None:
        """A request, a reject, ``(SKIPPED, id)`` or ``(RESENT, request)`` (``_checked``)."""
        if isinstance(item, tuple):
            kind, what = item
            if isinstance(what, Request):
                self.marker(kind, custom_id=what.custom_id)
                self._request(what)
            else:
                self.marker(kind, custom_id=what)
        elif isinstance(item, Request):
            self._request(item)
        elif isinstance(item, Reject):
            self.marker(
                REJECTED, custom_id=item.custom_id, line=item.line, reason=item.reason,
                text=item.text,
            )  # fmt: skip

    def _request(self, item: Request) -> None:
        c = self._columns
        meta = item.metadata
        values = {
            "custom_id": item.custom_id,
            "line": item.line,
            "body": jsonfast.dumps_text(item.body),
            "metadata": None if meta is None else jsonfast.dumps_text(meta),
            "prompt_tokens": item.prompt_tokens,
            "completion_budget": item.completion_budget,
            "body_hash": item.body_hash,
            "input": None if item.input is None else jsonfast.dumps_text(item.input),
            "kind": SEND,
        }
        for name in REQUEST_COLUMNS:
            c[name].append(values.get(name))
        self._requests += 1

    def marker(self, kind: str, **values: Any) -> None:
        """A row the driver counts (``MARKERS``)."""
        values["kind"] = kind
        for name in REQUEST_COLUMNS:
            self._columns[name].append(values.get(name))

    def full(self) -> bool:
        """Whether the block holds ``block_rows`` requests."""
        return self._requests >= self._limit

    def table(self) -> pa.Table:
        """The rows so far as a table; the columns start again empty."""
        import pyarrow as pa

        arrays = {
            name: pa.array(values, type=_TYPES[name]) for name, values in self._columns.items()
        }
        for values in self._columns.values():
            values.clear()
        self._requests = 0
        return pa.table(arrays)


def pack(table: pa.Table) -> pa.Table:
    """``table`` as one row of Arrow IPC bytes (column ``block``)."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pa.table({"block": pa.array([sink.getvalue().to_pybytes()], type=pa.binary())})


def unpack(batch: pa.Table) -> Iterator[pa.Table]:
    """The tables packed in ``batch``'s rows (``pack``)."""
    import pyarrow as pa

    for value in batch["block"].to_pylist():
        yield pa.ipc.open_stream(value).read_all()
