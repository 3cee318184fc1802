"""The journal compacted once its answers are in the output, and those answers read back.

A run that recorded every request and wrote its output replaces its journal by a compact one:
a header with what every record cost (``spent_usd``: ``--max-cost`` counts it on resume), then
one record per request holding what resume decides on (id, variant, body hash, status, status
code, error code, cost, line) and where its answer is: ``row``, its row in the output (or in
``OUTPUT.errors.jsonl``, ``in_errors``). A journal that already holds compact records is
compacted again whenever an output is written from it, so its rows always point into the
output beside it. A run whose output is written as it goes (``live_output``) writes its compact
journal as it goes too, a record per row written, and puts it in place at the end.

A later run reads those answers back from the output when it writes the new one
(``PreviousOutput``): the row a record points at, checked against its id and variant; a row
that does not match (the output was replaced between the two renames by a crash) is found by
an index of the file's ids, made then. An output that is gone while its compact journal
remains cannot be written again: ``check_answers_kept`` refuses such a run before anything is
sent (put the file back, or ``--restart``).
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from batcher import jsonfast
from batcher.errors import ConfigError, OutputError
from batcher.output.formats import errors_path
from batcher.output.journal import Journal, kept_in
from batcher.records import Result, Usage, record_key

#: What a compact record keeps of a full one (besides ``row`` and ``in_errors``).
COMPACT_FIELDS = (
    "custom_id", "hash", "status", "status_code", "error_code", "cost_usd", "line",
)  # fmt: skip
#: The header's width: written first, it is written again at ``commit`` with what the run
#: spent (known only then when the journal is compacted as the run goes), in the same bytes.
_HEADER_WIDTH = 128


class CompactJournal:
    """A compact journal being written beside the full one (``JOURNAL.partial``), put in its
    place by ``commit``; records are added in the output's order with their row (``add``, or
    ``add_compact`` for one made by ``compact_record``)."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self.partial = journal.path.with_name(journal.path.name + ".partial")
        self._rows = {"output": 0, "errors": 0}
        try:
            self._f: IO[bytes] = open(self.partial, "wb")  # noqa: SIM115 - closed in commit/abort
            self._f.write(self._header())
        except OSError as exc:
            raise OutputError(f"cannot write {self.partial}: {exc.strerror or exc}") from exc

    def add(self, record: Mapping[str, Any], *, in_errors: bool) -> None:
        """Keep ``record`` (full or compact), written as the next row of the output (or of
        the errors file)."""
        # what is not known is left out (read back as None): a compact record stays short
        compact = {name: record[name] for name in (*COMPACT_FIELDS, "variant")
                   if record.get(name) is not None}  # fmt: skip
        self.add_compact(compact, in_errors=in_errors)

    def add_compact(self, compact: dict[str, Any], *, in_errors: bool) -> None:
        """Keep a record made by ``compact_record`` (given its row here), written as the next
        row of the output (or of the errors file)."""
        where = "errors" if in_errors else "output"
        compact["row"] = self._rows[where]
        self._rows[where] += 1
        if in_errors:
            compact["in_errors"] = True
        self._f.write(jsonfast.dumps(compact) + b"\n")

    def commit(self) -> None:
        """Put the compact journal in the full one's place (fsynced first)."""
        try:
            self._f.seek(0)
            self._f.write(self._header())  # what every record cost, this run's included
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._journal.replace_with(self.partial)
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot write {self.partial}: {exc.strerror or exc}") from exc

    def abort(self) -> None:
        """Drop the compact journal; the full one stays."""
        with contextlib.suppress(OSError):
            self._f.close()
        self.partial.unlink(missing_ok=True)

    def _header(self) -> bytes:
        header = {"batcher_journal": 1, "compact": True, "spent_usd": self._journal.spent}
        return jsonfast.dumps(header).ljust(_HEADER_WIDTH - 1) + b"\n"


def compact_record(result: Result, body_hash: str) -> dict[str, Any]:
    """What a compact journal keeps of a result (``COMPACT_FIELDS`` and its variant, what is
    not known left out), as ``CompactJournal.add`` keeps of its full record."""
    record: dict[str, Any] = {"custom_id": result.custom_id, "hash": body_hash,
                              "status": result.status}  # fmt: skip
    if result.status_code is not None:
        record["status_code"] = result.status_code
    if result.error_code is not None:
        record["error_code"] = result.error_code
    if result.cost_usd is not None:
        record["cost_usd"] = result.cost_usd
    record["line"] = result.line
    if result.variant is not None:
        record["variant"] = result.variant
    return record


def check_answers_kept(journal: Journal, output: Path) -> None:
    """Refuse a run (``ConfigError``, before anything is sent) whose journal points into an
    output, or errors file, that is gone: the answers it held cannot be written again."""
    for where in sorted(journal.kept_elsewhere()):
        path = output if where == "output" else errors_path(output)
        if not path.exists():
            raise ConfigError(
                "job.output",
                f"{path} is gone, and {journal.path.name} keeps no answers (it was compacted "
                "once they were written there): put the file back, or run with --restart to "
                "send every request again",
            )


@contextlib.contextmanager
def checked_journal(path: Path, output: Path, *, restart: bool = False) -> Iterator[Journal]:
    """The journal at ``path`` opened (and locked: ``Journal``), once ``check_answers_kept``
    passed: a run it refuses leaves the job's status file alone, opened after it."""
    with Journal(path, restart=restart) as journal:
        check_answers_kept(journal, output)
        yield journal


class PreviousOutput:
    """The output (and errors file) as the last run wrote them, read back by row."""

    def __init__(self, output: Path) -> None:
        self._paths = {"output": output, "errors": errors_path(output)}
        self._files: dict[str, _Rows] = {}

    def result(self, record: Mapping[str, Any]) -> Result:
        """The answer of a compact ``record``, from the file and row it points at."""
        return result_of_row(self.row(record))

    def row(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The output row (as ``reading.read_results`` gives it) a compact ``record`` points at.
        Raises ``OutputError`` when the file is gone, unreadable or does not hold it."""
        where = kept_in(record) or "output"
        rows = self._files.get(where)
        if rows is None:
            rows = self._files[where] = _rows_of(self._paths[where])
        key = record_key(str(record.get("custom_id")), record.get("variant"))
        row = rows.find(int(record.get("row") or 0), key)
        if row is None:
            raise OutputError(
                f"{self._paths[where]} does not hold the answer of {key!r} its journal points "
                "at: put back the file the last run wrote, or run with --restart"
            )
        return row

    def close(self) -> None:
        """Close the files read."""
        for rows in self._files.values():
            rows.close()


class _Rows:
    """A finished output file read by row number, mostly forward."""

    _index: dict[str, int] | None = None  # each key's row, made when a row did not match

    def row(self, n: int) -> dict[str, Any] | None:
        raise NotImplementedError

    def keys(self) -> Iterator[str]:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to close, unless a subclass holds a file."""

    def find(self, n: int, key: str) -> dict[str, Any] | None:
        """Row ``n`` when it is ``key``'s, else ``key``'s row wherever it is (an index of the
        file's keys, made once), else ``None``."""
        row = self.row(n)
        if row is not None and _row_key(row) == key:
            return row
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys())}
        at = self._index.get(key)
        return None if at is None else self.row(at)


def _row_key(row: Mapping[str, Any]) -> str:
    return record_key(str(row.get("custom_id")), row.get("variant"))


class _ParquetRows(_Rows):
    """A Parquet output: one row group held at a time."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self._file = pq.ParquetFile(path)
        meta = self._file.metadata
        self._starts = [0]
        for g in range(meta.num_row_groups):
            self._starts.append(self._starts[-1] + meta.row_group(g).num_rows)
        self._group = -1
        self._rows: list[dict[str, Any]] = []

    def row(self, n: int) -> dict[str, Any] | None:
        if not 0 <= n < self._starts[-1]:
            return None
        group = bisect.bisect_right(self._starts, n) - 1
        if group != self._group:
            self._rows = self._file.read_row_group(group).to_pylist()
            self._group = group
        return self._rows[n - self._starts[group]]

    def keys(self) -> Iterator[str]:
        names = [n for n in ("custom_id", "variant") if n in self._file.schema_arrow.names]
        for batch in self._file.iter_batches(columns=names):
            for row in batch.to_pylist():
                yield _row_key(row)

    def close(self) -> None:
        self._file.close()


class _JsonlRows(_Rows):
    """A JSONL output, read forward (reopened when a row before the last is asked for)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._f: IO[bytes] | None = None
        self._next = 0  # the row the next line read is

    def row(self, n: int) -> dict[str, Any] | None:
        from batcher.output.reading import row_from_line

        if self._f is None or n < self._next:
            self.close()
            self._f, self._next = self._path.open("rb"), 0
        for raw in self._f:
            here = self._next
            self._next += 1
            if here == n:
                try:
                    return row_from_line(jsonfast.loads_exact(raw))
                except (ValueError, TypeError, AttributeError):
                    return None
        return None

    def keys(self) -> Iterator[str]:
        from batcher.output.reading import row_from_line

        with self._path.open("rb") as f:
            for raw in f:
                try:
                    yield _row_key(row_from_line(jsonfast.loads_exact(raw)))
                except (ValueError, TypeError, AttributeError):
                    yield ""

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _rows_of(path: Path) -> _Rows:
    try:
        return _ParquetRows(path) if path.suffix.lower() == ".parquet" else _JsonlRows(path)
    except Exception as exc:  # missing, or not a Parquet file
        raise OutputError(f"cannot read {path} to write the output again: {exc}") from exc


def result_of_row(row: Mapping[str, Any]) -> Result:
    """A ``Result`` from an output row (``read_results``' dicts), as it was written."""
    usage = Usage(**{name: row.get(name) for name in _USAGE_FIELDS})
    return Result(
        custom_id=row["custom_id"],
        line=row.get("line") or 0,
        status="ok" if row.get("status") == "ok" else "error",
        model=row.get("model"),
        attempts=row.get("attempts") or 0,
        latency_s=row.get("latency_s") or 0.0,
        started_at=_seconds(row.get("started_at")),
        finished_at=_seconds(row.get("finished_at")),
        status_code=row.get("status_code"),
        request_id=row.get("request_id"),
        body=_json_or_text(row.get("response")),
        usage=None if all(v is None for v in _usage_values(usage)) else usage,
        error_code=row.get("error_code"),
        error_message=row.get("error_message"),
        metadata=_json_or_text(row.get("metadata")),
        cost_usd=row.get("cost_usd"),
        ttft_s=row.get("ttft_s"),
        schema_valid=row.get("schema_valid"),
        schema_error=row.get("schema_error"),
        endpoint=row.get("endpoint"),
        variant=row.get("variant"),
        choices_asked=row.get("choices_asked"),
        batch_id=row.get("batch_id"),
        messages=_list_or_none(row.get("messages")),
        input=row.get("input") if isinstance(row.get("input"), dict) else None,
    )


_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
                 "reasoning_tokens")  # fmt: skip


def _usage_values(usage: Usage) -> list[int | None]:
    return [getattr(usage, name) for name in _USAGE_FIELDS]


def _seconds(value: Any) -> float:
    return value.timestamp() if isinstance(value, datetime) else 0.0


def _list_or_none(value: Any) -> list[Any] | None:
    return value if isinstance(value, list) else None


def _json_or_text(text: Any) -> Any:
    """A column of JSON text back to its value; text that is not JSON stays text (a raw
    answer that was not JSON)."""
    if not isinstance(text, str):
        return text
    try:
        return jsonfast.loads_exact(text)
    except (ValueError, RecursionError):
        return text
