"""What a job's records say, for ``batcher status``: counts, tokens, cost, recent finishes and
the last errors, read from its journal (or its output) as a stream.

The journal is read backwards, newest record first, so the first record met of each request
is its latest (a re-sent request's earlier records are passed over) and the newest errors
come first. Only a 64-bit fingerprint of each request's key is kept (``input.idset.IdSet``,
which moves to a temporary database past its first 65,536), never the records: memory stays
flat however long the journal is. A journal being written is read up to its last whole line.

A journal compacted after its run (its header says ``compact``) keeps no tokens, times or
messages: those facts come from the output then, and so do they for an output without a
journal (the Ray engine's, or a journal deleted).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from batcher import jsonfast
from batcher.input.idset import IdSet
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

    @property
    def done(self) -> int:
        return self.ok + self.error

    def finished_since(self, since: float) -> int:
        """Requests whose latest record finished at or after ``since`` (whole seconds)."""
        start = int(since)
        return sum(n for second, n in self.finishes.items() if second >= start)

    def add(self, record: Mapping[str, Any]) -> None:
        """Count one request's latest record (a journal record or an output row)."""
        ok = record.get("status") == "ok"
        if ok:
            self.ok += 1
        else:
            self.error += 1
            self.error_codes[str(record.get("error_code") or "unknown")] += 1
        usage = record.get("usage")
        tokens = usage if isinstance(usage, Mapping) else record  # an output row: flat
        self.prompt_tokens += _int(tokens.get("prompt_tokens"))
        self.completion_tokens += _int(tokens.get("completion_tokens"))
        self.total_tokens += _int(tokens.get("total_tokens"))
        cost = record.get("cost_usd")
        if isinstance(cost, int | float) and not isinstance(cost, bool):
            self.cost_usd += cost
            self.priced += 1
        elif ok:
            self.unpriced += 1
        started, finished = _epoch(record.get("started_at")), _epoch(record.get("finished_at"))
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
                start = int(newest - RATE_WINDOW_S)
                self.finishes = Counter({s: n for s, n in self.finishes.items() if s >= start})
        if at >= newest - RATE_WINDOW_S:
            self.finishes[int(at)] += 1


def journal_facts(journal: Path) -> JournalFacts | None:
    """The facts of the journal at ``journal``; ``None`` when it is compact (its facts are in
    the output). Raises ``OSError`` when it cannot be read."""
    facts = JournalFacts()
    seen = IdSet()
    try:
        with journal.open("rb") as f:
            if _is_compact(f.readline()):
                return None
            for raw in _lines_backwards(f):
                record = _parse(raw)
                if record is None or "custom_id" not in record:
                    continue  # the header, or a line no run could read either
                custom_id, variant = record.get("custom_id"), record.get("variant")
                if not isinstance(custom_id, str) or not isinstance(variant, str | None):
                    continue
                if seen.add(record_key(custom_id, variant)):
                    facts.add(record)
    finally:
        seen.close()
    return facts


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


def _lines_backwards(f: IO[bytes]) -> Iterator[bytes]:
    """The whole lines of ``f`` (as its size is now), last first, read in blocks."""
    f.seek(0, 2)
    end = f.tell()
    tail = b""
    pos = end
    whole = False  # whether the last line read so far is known to end with its newline
    while pos > 0:
        step = min(_BLOCK, pos)
        pos -= step
        f.seek(pos)
        lines = (f.read(step) + tail).split(b"\n")
        tail = lines[0]
        for line in reversed(lines[1:]):
            if whole and line:
                yield line
            whole = True  # every line before the last piece met ends with a newline
    if tail and whole:
        yield tail


def _is_compact(first: bytes) -> bool:
    header = _parse(first)
    return header is not None and "custom_id" not in header and header.get("compact") is True


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = jsonfast.loads_exact(raw)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _epoch(value: Any) -> float | None:
    """Unix seconds from a journal's number or an output's timestamp; ``None`` for 0 or none."""
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None
