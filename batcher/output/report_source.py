"""What ``batcher report`` reads: an output's rows, or, while a run holds its journal (or
before any output is written), the rows its journal holds so far; and whether a run holds it.

The journal is read without its lock (a running job holds it): a line still being written
(no newline yet) is left out, and an id journaled more than once counts by its last record,
as the output will. A compacted journal's records keep no answer: each is read back from the
output row it points at, as the output will be written (``compaction.PreviousOutput``), or,
when that file is gone, left out and counted (``JournalRows.left_out``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batcher import jsonfast
from batcher.errors import InputError, OutputError
from batcher.output.compaction import PreviousOutput
from batcher.output.formats import errors_path
from batcher.output.journal import JOURNAL_SUFFIX, decode, journal_path, kept_in, lock_holder
from batcher.output.journal_facts import appended_since_compacted
from batcher.output.reading import read_results
from batcher.output.rows import parquet_row
from batcher.records import record_key


@dataclass(frozen=True)
class Source:
    """Where a report's rows come from: ``kind`` is ``"output"`` or ``"journal"``; ``state``
    says, for a journal, whether a run holds it (``None`` for an output)."""

    path: Path
    kind: str
    state: str | None = None


def report_source(output: Path) -> Source:
    """The journal while a run holds it (the output, if any, is an earlier run's), else the
    output when it exists and holds every record (a run killed after resuming a compacted
    journal left more in the journal), else the journal (a run stopped before writing its
    output); ``InputError`` when neither exists."""
    journal = journal_path(output)
    state = journal_state(journal) if journal.is_file() else None
    if state is not None and state.startswith("running"):
        return Source(journal, "journal", state)
    if output.exists() and not (state is not None and appended_since_compacted(journal)):
        return Source(output, "output")
    if state is not None:
        return Source(journal, "journal", state)
    raise InputError(f"no such output: {output} (and no journal {journal.name} beside it)")


def source_rows(source: Source) -> Iterable[dict[str, Any]]:
    """The rows of ``source``, as ``read_results`` gives an output's."""
    if source.kind == "journal":
        return JournalRows(source.path)
    return read_results(source.path)


def journal_state(path: Path) -> str:
    """``running (pid N)`` while a run holds the journal's lock; else ``not finished``."""
    try:
        with path.open("rb") as f:
            holder = lock_holder(f.fileno())
    except OSError:
        holder = None
    if holder is not None:
        return f"running (pid {holder})"
    return "not finished (no run holds its journal: the same command resumes it)"


class JournalRows:
    """The latest record of every id in a journal, as output rows, in journal order; a
    compact record's row read back from the output (or errors file) it points at.
    ``left_out``: compact records whose file is gone, not among the rows.

    Two passes: the first finds each key's last record (its offset), the second yields those;
    only keys and offsets are held in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.left_out = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        latest: dict[str, int] = {}
        for offset, record in _records(self.path):
            key = _key(record)
            if key is not None:
                latest[key] = offset
        output = self.path.with_name(self.path.name.removesuffix(JOURNAL_SUFFIX))
        present = {"output": output.exists(), "errors": errors_path(output).exists()}
        previous = PreviousOutput(output)
        try:
            for offset, record in _records(self.path):
                key = _key(record)
                if key is None or latest.get(key) != offset:
                    continue
                where = kept_in(record)
                if where is None:
                    yield _row_of_record(record)
                    continue
                row = _kept_row(previous, record) if present[where] else None
                if row is None:
                    self.left_out += 1
                else:
                    yield row
        finally:
            previous.close()


def _row_of_record(record: dict[str, Any]) -> dict[str, Any]:
    """A full journal record as an output row."""
    result = decode(record)
    row = parquet_row(result)
    row.setdefault("messages", result.messages)
    row.setdefault("input", result.input)
    return row


def _kept_row(previous: PreviousOutput, record: dict[str, Any]) -> dict[str, Any] | None:
    """The output row a compact record points at; ``None`` when it cannot be read."""
    try:
        return previous.row(record)
    except OutputError:
        return None


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each whole record line of a journal with its offset (the header and a line still being
    written are left out; an unreadable line too)."""
    try:
        with path.open("rb") as f:
            offset = 0
            for raw in f:
                here, offset = offset, offset + len(raw)
                if here == 0 or not raw.endswith(b"\n"):
                    continue
                try:
                    record = jsonfast.loads_exact(raw)
                except (ValueError, RecursionError):
                    continue
                if isinstance(record, dict):
                    yield here, record
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def _key(record: dict[str, Any]) -> str | None:
    custom_id, variant = record.get("custom_id"), record.get("variant")
    if not isinstance(custom_id, str) or not isinstance(variant, str | None):
        return None
    return record_key(custom_id, variant)
