"""What a job's records say, for ``batcher status``: counts, tokens, cost, recent finishes and
the last errors, read from its journal (or its output) as a stream.

The journal is read backwards, newest record first, so the first record met of each request
is its latest (a re-sent request's earlier records are passed over) and the newest errors
come first. Only a 64-bit fingerprint of each request's key is kept (``input.idset.IdSet``,
which moves to a temporary database past its first 65,536), never the records: memory stays
flat however long the journal is. A journal being written is read up to its last whole line.

A compacted journal (``output.compaction``) begins with compact records, which keep no
tokens, times or messages but point at their request's row in the output (or errors file);
a resumed run appends full records after them. The full records are read backwards as above,
then the compact ones forward, each not recorded again since counted from the row it points
at (read forward, one row group at a time). A compact record whose row cannot be read (the
output is gone) counts by what it keeps itself: its status, error code and cost
(``JournalFacts.unread``). An output without a journal (the Ray engine's, or a journal
deleted) gives its facts from its rows (``output_facts``).
"""

from __future__ import annotations

import datetime as dt
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from batcher import jsonfast
from batcher.errors import OutputError
from batcher.input.idset import IdSet
from batcher.output.compaction import PreviousOutput
from batcher.output.formats import errors_path
from batcher.output.journal import JOURNAL_SUFFIX, kept_in
from batcher.records import record_key

#: Seconds of finishes the recent rate is measured over.
RATE_WINDOW_S = 300.0
#: How many of the newest error messages are kept.
LAST_ERRORS = 5
#: Characters of an error message kept.
MESSAGE_CHARS = 200
_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class RecentError:
    """One of the newest failed requests."""

    custom_id: str
    variant: str | None
    error_code: str | None
    message: str | None
    finished_at: float | None


@dataclass(kw_only=True)
class JournalFacts:
    """The latest record of each request, summed. ``finishes``: finish times (Unix seconds)
    counted by whole second over the ``RATE_WINDOW_S`` before the newest one."""

    ok: int = 0
    error: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    priced: int = 0
    unpriced: int = 0  # ok answers without a cost
    error_codes: Counter[str] = field(default_factory=Counter)
    last_errors: list[RecentError] = field(default_factory=list)
    first_started_at: float | None = None
    last_finished_at: float | None = None
    finishes: Counter[int] = field(default_factory=Counter)
    unread: int = 0  # compact records whose output row could not be read (tokens unknown)

    @property
    def done(self) -> int:
        return self.ok + self.error

    def finished_since(self, since: float) -> int:
        """Requests whose latest record finished at or after ``since`` (whole seconds)."""
        start = int(since)
        return sum(n for second, n in self.finishes.items() if second >= start)

    def add(self, record: Mapping[str, Any]) -> None:
        """Count one request's latest record (a journal record or an output row)."""
        get = record.get
        ok = get("status") == "ok"
        if ok:
            self.ok += 1
        else:
            self.error += 1
            self.error_codes[str(get("error_code") or "unknown")] += 1
        usage = get("usage")
        tokens = usage if isinstance(usage, dict) else record  # an output row: flat
        self.prompt_tokens += _int(tokens.get("prompt_tokens"))
        self.completion_tokens += _int(tokens.get("completion_tokens"))
        self.total_tokens += _int(tokens.get("total_tokens"))
        cost = get("cost_usd")
        if type(cost) is float or type(cost) is int:
            self.cost_usd += cost
            self.priced += 1
        elif ok:
            self.unpriced += 1
        started, finished = _epoch(get("started_at")), _epoch(get("finished_at"))
        if started is not None and (
            self.first_started_at is None or started < self.first_started_at
        ):
            self.first_started_at = started
        if finished is not None:
            self._finished(finished)
        if not ok and len(self.last_errors) < LAST_ERRORS:
            self.last_errors.append(_recent_error(record, finished))

    def _finished(self, at: float) -> None:
        newest = self.last_finished_at
        if newest is None or at > newest:
            self.last_finished_at = newest = at
            if len(self.finishes) > 2 * RATE_WINDOW_S:  # seconds gone out of the window
                self._prune()
        if at >= newest - RATE_WINDOW_S:
            self.finishes[int(at)] += 1

    def _prune(self) -> None:
        if self.last_finished_at is not None:
            start = int(self.last_finished_at - RATE_WINDOW_S)
            self.finishes = Counter({s: n for s, n in self.finishes.items() if s >= start})

    def add_older(self, older: JournalFacts) -> None:
        """Add the facts of records older than these (of other requests)."""
        self.ok += older.ok
        self.error += older.error
        self.prompt_tokens += older.prompt_tokens
        self.completion_tokens += older.completion_tokens
        self.total_tokens += older.total_tokens
        self.cost_usd += older.cost_usd
        self.priced += older.priced
        self.unpriced += older.unpriced
        self.error_codes.update(older.error_codes)
        self.last_errors = [*self.last_errors, *older.last_errors][:LAST_ERRORS]
        starts = [t for t in (self.first_started_at, older.first_started_at) if t is not None]
        self.first_started_at = min(starts, default=None)
        ends = [t for t in (self.last_finished_at, older.last_finished_at) if t is not None]
        self.last_finished_at = max(ends, default=None)
        self.finishes.update(older.finishes)
        self.unread += older.unread
        self._prune()


class JournalReader:
    """Reads a journal's facts, and read again (``batcher status --watch``), only the records
    appended since: they are the latest of their requests unless one of them was recorded
    before too (a re-sent request), and then, or when the journal was replaced or emptied,
    the whole journal is read again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = IdSet()
        self._facts: JournalFacts | None = None
        self._end = 0  # where the lines read end
        self._inode = -1

    def facts(self) -> JournalFacts:
        """The journal's facts now (a compacted one's from the output's rows too). Raises
        ``OSError`` when it cannot be read."""
        with self.path.open("rb") as f:
            st = os.fstat(f.fileno())
            if self._facts is not None and (st.st_ino != self._inode or st.st_size < self._end):
                self._forget()
            self._inode = st.st_ino
            end = _whole_end(f, st.st_size)
            if self._facts is None:
                self._facts = self._read_whole(f, end)
            elif end > self._end:
                appended = IdSet()
                try:
                    newer = self._read(f, self._end, end, appended)
                except _Overlap:
                    self._forget()
                    self._facts = self._read_whole(f, end)
                else:
                    newer.add_older(self._facts)
                    self._facts = newer
                finally:
                    appended.close()
            self._end = end
            return self._facts

    def close(self) -> None:
        """Drop what is remembered (the fingerprints' temporary database, if any)."""
        self._forget()

    def _forget(self) -> None:
        self._seen.close()
        self._facts, self._end = None, 0

    def _read_whole(self, f: IO[bytes], end: int) -> JournalFacts:
        """The facts of the journal up to ``end``: its full records, then its compact ones."""
        facts = self._read(f, 0, end, self._seen)
        if _is_compact(_first_line(f)):
            facts.add_older(self._compact_facts(f, end))
        return facts

    def _read(self, f: IO[bytes], start: int, end: int, here: IdSet) -> JournalFacts:
        """The facts of the lines in ``[start, end)``, newest first; ``here``: the keys met
        in that span. Raises ``_Overlap`` when a span after the first holds a request the
        lines before it hold too."""
        facts = JournalFacts()
        later = start > 0
        seen = self._seen
        for raw in _lines_backwards(f, start, end):
            record = _parse(raw)
            if record is None:
                continue
            custom_id, variant = record.get("custom_id"), record.get("variant")
            if type(custom_id) is not str or not (variant is None or type(variant) is str):
                continue  # the header, or a line no run could read either
            if kept_in(record) is not None:
                if later:  # compacted again since the last read: read it all again
                    raise _Overlap
                continue  # counted by _compact_facts, once the later records are known
            key = record_key(custom_id, variant)
            if here.add(key):
                if later and not seen.add(key):
                    raise _Overlap
                facts.add(record)
        return facts

    def _compact_facts(self, f: IO[bytes], end: int) -> JournalFacts:
        """The facts of the compact records up to ``end`` whose request no later record
        holds (those keys are in ``_seen`` already), read forward in the output's order."""
        output = self.path.with_name(self.path.name.removesuffix(JOURNAL_SUFFIX))
        previous = PreviousOutput(output)
        facts = JournalFacts()
        newest: list[RecentError] = []
        # a file that is gone is not looked for once per record
        present = {"output": output.exists(), "errors": errors_path(output).exists()}
        try:
            f.seek(0)
            f.readline()  # the header
            while f.tell() < end:
                record = _parse(f.readline())
                if record is None or kept_in(record) is None:
                    if record is not None and "custom_id" in record:
                        break  # the full records a later run appended: read already
                    continue
                key = _key_of(record)
                if key is None or not self._seen.add(key):
                    continue  # recorded again later: that record counts
                where = kept_in(record) or "output"
                row = _row_of(previous, record) if present[where] else None
                if row is None:
                    facts.unread += 1
                    row = record  # its status, error code and cost, no tokens nor times
                facts.add(row)
                if row.get("status") != "ok":
                    error = _recent_error(row, _epoch(row.get("finished_at")))
                    newest = [*newest[-(LAST_ERRORS - 1) :], error]
        finally:
            previous.close()
        facts.last_errors = newest[::-1]
        return facts


class _Overlap(Exception):
    """An appended record of a request recorded before: the journal is read whole again."""


def journal_facts(journal: Path) -> JournalFacts:
    """The facts of the journal at ``journal`` (read once). Raises ``OSError`` when it
    cannot be read."""
    reader = JournalReader(journal)
    try:
        return reader.facts()
    finally:
        reader.close()


def appended_since_compacted(journal: Path) -> bool:
    """Whether a compacted journal's newest record is a full one: a later run recorded
    requests its output does not hold yet (it was stopped before writing it)."""
    try:
        with journal.open("rb") as f:
            if not _is_compact(f.readline()):
                return False
            end = _whole_end(f, os.fstat(f.fileno()).st_size)
            for raw in _lines_backwards(f, 0, end):
                record = _parse(raw)
                if record is not None and "custom_id" in record:
                    return kept_in(record) is None
    except OSError:
        pass
    return False


def output_facts(rows: Iterator[Mapping[str, Any]]) -> JournalFacts:
    """The facts of an output's rows (each request once), newest errors last read first."""
    facts = JournalFacts()
    newest: list[RecentError] = []
    for row in rows:
        facts.add(row)
        if row.get("status") != "ok":
            newest = [
                *newest[-(LAST_ERRORS - 1) :],
                _recent_error(row, _epoch(row.get("finished_at"))),
            ]
    facts.last_errors = newest[::-1]
    return facts


def _row_of(previous: PreviousOutput, record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The output row a compact record points at; ``None`` when it cannot be read."""
    try:
        return previous.row(record)
    except OutputError:
        return None


def _first_line(f: IO[bytes]) -> bytes:
    f.seek(0)
    return f.readline()


def _recent_error(record: Mapping[str, Any], finished: float | None) -> RecentError:
    message = record.get("error_message")
    text = str(message)[:MESSAGE_CHARS] if message is not None else None
    variant = record.get("variant")
    return RecentError(
        custom_id=str(record.get("custom_id")),
        variant=variant if isinstance(variant, str) else None,
        error_code=record.get("error_code") if isinstance(record.get("error_code"), str) else None,
        message=text,
        finished_at=finished,
    )


def _whole_end(f: IO[bytes], size: int) -> int:
    """Where the last whole line of ``f`` ends (a line being written, or torn, left out)."""
    pos = size
    while pos > 0:
        step = min(_BLOCK, pos)
        f.seek(pos - step)
        newline = f.read(step).rfind(b"\n")
        if newline >= 0:
            return pos - step + newline + 1
        pos -= step
    return 0


def _lines_backwards(f: IO[bytes], start: int, end: int) -> Iterator[bytes]:
    """The lines of ``f`` in ``[start, end)`` (both at the start of a line), last first, read
    in blocks."""
    tail = b""
    pos = end
    while pos > start:
        step = min(_BLOCK, pos - start)
        pos -= step
        f.seek(pos)
        lines = (f.read(step) + tail).split(b"\n")
        tail = lines[0]
        for line in reversed(lines[1:]):
            if line:
                yield line
    if tail:
        yield tail


def _key_of(record: Mapping[str, Any]) -> str | None:
    custom_id, variant = record.get("custom_id"), record.get("variant")
    if type(custom_id) is not str or not (variant is None or type(variant) is str):
        return None
    return record_key(custom_id, variant)


def _is_compact(first: bytes) -> bool:
    header = _parse(first)
    return header is not None and "custom_id" not in header and header.get("compact") is True


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = orjson.loads(raw)  # counts and times: no need of loads_exact's long numbers
    except orjson.JSONDecodeError:
        try:
            record = jsonfast.loads_exact(raw)  # what orjson refuses (a lone surrogate)
        except (ValueError, RecursionError):
            return None
    return record if isinstance(record, dict) else None


def _int(value: Any) -> int:
    return value if type(value) is int else 0


def _epoch(value: Any) -> float | None:
    """Unix seconds from a journal's number or an output's timestamp; ``None`` for 0 or none."""
    if type(value) is float or type(value) is int:
        return float(value) if value > 0 else None
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return None
