"""The crash-safe journal of finished requests (``OUTPUT.journal``): what resume reads.

One JSON line per finished request, appended with a single ``write`` to a file opened with
``O_APPEND`` before the request counts as done, so a ``kill -9`` loses at most the requests in
flight. Durability policy: every append reaches the OS at once (it survives the process dying);
``fsync`` runs at most once every ``fsync_every_s`` (1 s) and when the journal is closed, so a
power loss can lose about the last second of answers, which a resumed run sends again.

A torn last line (the process died mid-write) is detected on open and cut off. A request may be
journaled more than once (re-sent with ``--retry-errors`` or because its body changed): the
last record of an id wins. In a job with variants a record is known by its id and its variant
(``records.record_key``).

Once a run has recorded every request and written its output, the journal is compacted
(``compaction``): its records then hold what resume decides on and where in the output the
answer is (``kept_in``), and the header what every dropped record cost.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batcher import jsonfast
from batcher.errors import ConfigError, OutputError
from batcher.records import Result, Usage, record_key

#: Not ``.jsonl``: a ``*.jsonl`` glob over an output folder must not read the journal as data.
JOURNAL_SUFFIX = ".journal"
#: The name older versions gave the journal; adopted (renamed) when a journal is opened.
OLD_JOURNAL_SUFFIX = ".journal.jsonl"
_HEADER = {"batcher_journal": 1}


def journal_path(output: Path) -> Path:
    """The journal beside an output: ``OUTPUT.journal``."""
    return output.with_name(output.name + JOURNAL_SUFFIX)


def adopt_old_journal(path: Path) -> None:
    """Rename an older version's journal (``OUTPUT.journal.jsonl``) to ``path``, so a run
    begun before the rename resumes; nothing when ``path`` exists or there is none."""
    old = path.with_name(path.name.removesuffix(JOURNAL_SUFFIX) + OLD_JOURNAL_SUFFIX)
    if not path.exists() and old.exists():
        with contextlib.suppress(FileNotFoundError):  # another run adopted it first
            os.rename(old, path)


@dataclass(frozen=True, slots=True)
class Entry:
    """What resume needs to know of an id's latest record."""

    hash: str
    status: str
    status_code: int | None
    error_code: str | None
    offset: int
    #: Where the answer is when the record is compact (``"output"`` or ``"errors"``: the file
    #: the run that compacted the journal wrote it to); ``None``: in the journal.
    kept: str | None = None


class Journal:
    """An append-only journal.

    ``entries`` maps each id recorded by *earlier* runs to its latest record (what resume
    decides on), kept up to date when such an id is recorded again. Ids recorded for the first
    time by this run are not kept in memory: the reader already saw to it that each comes once,
    so memory does not grow with the length of a fresh run.
    """

    def __init__(
        self,
        path: Path,
        *,
        restart: bool = False,
        fsync_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open (or create) and lock the journal; ``restart`` empties it once it is locked.

        Raises ``ConfigError`` when another process holds it: two runs of one output would
        both send everything and write the same output file."""
        self.path = path
        self.entries: dict[str, Entry] = {}
        self.torn_bytes = 0
        self.spent_before = 0.0  # dollars recorded by earlier runs (every record was paid)
        self.spent = 0.0  # dollars recorded by earlier runs and this one
        # cost of a key's provisional record, taken back by the record that follows
        self._provisional: dict[str, float] = {}
        self._replaced = False
        self._fsync_every_s = fsync_every_s
        self._clock = clock
        self._last_sync = clock()
        self._dirty = False
        try:
            adopt_old_journal(path)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                # One run per output: two at once would both send everything. Held until the
                # output is written (the runner closes the journal last), so no two processes
                # ever write the same OUTPUT.partial.
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(self._fd)
                os.close(self._fd)
                who = "another batcher run" + (f" (pid {holder})" if holder else "")
                output = path.name.removesuffix(JOURNAL_SUFFIX)
                raise ConfigError(
                    "job.output", f"{who} holds {path.with_name(output)}; wait for it to end"
                ) from None
            if restart:
                self._forget_batches()
                # Emptied, never unlinked: a new file would carry a lock of its own, and a
                # run still writing the old one would go on unseen.
                os.ftruncate(self._fd, 0)
            self._load()
            self.spent_before = self.spent
            self._size = os.fstat(self._fd).st_size
            if self._size == 0:
                self._write(jsonfast.dumps(_HEADER) + b"\n")
        except OSError as exc:
            raise OutputError(f"cannot write journal {path}: {exc.strerror or exc}") from None

    def _forget_batches(self) -> None:
        """Remove the output's batch state with its journal: refused (the journal closed)
        while it shows batches still running."""
        from batcher.batch.state import forget_states

        try:
            forget_states(self.path.with_name(self.path.name.removesuffix(JOURNAL_SUFFIX)))
        except BaseException:  # refused, or a broken state file: the lock goes too
            os.close(self._fd)
            raise

    def append(self, result: Result, body_hash: str, *, provisional: bool = False) -> None:
        """Record a finished request durably enough to survive the process dying.

        A ``provisional`` record (an answer about to be re-asked) is kept in ``entries``, so
        the record that follows replaces it in ``results``; on resume its cost is not counted
        twice (the final record's cost includes it).
        """
        if self._replaced:
            raise OutputError(f"journal {self.path} was compacted: nothing more can be recorded")
        line = encode(result, body_hash, provisional=provisional)
        offset = self._size
        self._write(line)
        key = record_key(result.custom_id, result.variant)
        self._count_cost(key, result.cost_usd, provisional=provisional)
        if provisional or key in self.entries:  # a later record replaces this one
            self.entries[key] = Entry(
                body_hash, result.status, result.status_code, result.error_code, offset
            )
        self._dirty = True
        if self._clock() - self._last_sync >= self._fsync_every_s:
            self.sync()

    @property
    def size(self) -> int:
        """The journal's length in bytes: where the next record goes."""
        return self._size

    def sync(self) -> None:
        """fsync the journal (called at most every ``fsync_every_s``, and on close)."""
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = self._clock()

    def forget_if_empty(self) -> None:
        """Remove the journal file if it holds no record, only its header: a run that stopped
        before recording anything (a configuration error) leaves nothing behind. Called by the
        lock's holder, before ``close``."""
        if self._fd >= 0 and self._size <= len(jsonfast.dumps(_HEADER)) + 1:
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1

    def results(self) -> Iterator[Result]:
        """The latest record of every id, in the order they were journaled; a compact record
        (its answer in the output: ``kept_in``) is left out, having no answer to give."""
        for _, record in self.latest():
            if kept_in(record) is None:
                yield decode(record)

    def latest(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """The offset and record of every id's latest record, in the order journaled."""
        with self.path.open("rb") as f:
            offset = 0
            for raw in f:
                here, offset = offset, offset + len(raw)
                if not raw.endswith(b"\n") or here == 0:
                    continue
                record = _parse(raw)
                if record is None:
                    continue
                key = _key_of(record)
                if key is None:
                    continue  # unreadable: counted as not done when the journal was loaded
                entry = self.entries.get(key)
                if entry is None or entry.offset == here:
                    yield here, record

    def read_at(self, offsets: Iterable[int]) -> Iterator[dict[str, Any]]:
        """The records at ``offsets`` (from ``latest``), read back one by one."""
        with self.path.open("rb") as f:
            for offset in offsets:
                f.seek(offset)
                record = _parse(f.readline())
                if record is None:  # read as a record by ``latest``: changed under us
                    raise OutputError(f"journal {self.path} changed while it was read")
                yield record

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)

    def _load(self) -> None:
        """Read the existing journal, if any; cut off a torn last line."""
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return
        with f:
            offset = 0
            for raw in f:
                here, offset = offset, offset + len(raw)
                if not raw.endswith(b"\n"):
                    self._truncate(here)  # the process died mid-write: the record never happened
                    return
                record = _parse(raw)
                if here == 0:
                    self._read_header(record)
                    continue
                key = None if record is None else _key_of(record)
                if record is None or key is None:
                    continue  # unreadable: that request counts as not done
                kept = kept_in(record)
                if kept is None:  # a compact record's cost is in the header's total
                    provisional = record.get("provisional") is True
                    self._count_cost(key, record.get("cost_usd"), provisional=provisional)
                self.entries[key] = Entry(
                    str(record.get("hash", "")),
                    str(record.get("status", "")),
                    record.get("status_code"),
                    record.get("error_code"),
                    here,
                    kept,
                )

    def _read_header(self, header: dict[str, Any] | None) -> None:
        """A compact journal's header holds what every record it replaced cost."""
        spent = None if header is None else header.get("spent_usd")
        if isinstance(spent, int | float) and not isinstance(spent, bool):
            self.spent += max(0.0, spent)

    def _count_cost(self, key: str, cost: Any, *, provisional: bool) -> None:
        """Add a record's cost to ``spent``: never a credit (a negative cost, recorded by an
        older version, would raise the cap of every later run); a record after a provisional
        one includes the provisional one's cost."""
        cost = max(0.0, cost) if isinstance(cost, int | float) else 0.0
        self.spent += cost - self._provisional.pop(key, 0.0)
        if provisional:
            self._provisional[key] = cost

    def kept_elsewhere(self) -> set[str]:
        """The files (``"output"``, ``"errors"``) holding answers the journal no longer does."""
        return {entry.kept for entry in self.entries.values() if entry.kept is not None}

    def replace_with(self, compact: Path) -> None:
        """Put the compact journal ``compact`` in this one's place (still locked by this
        process until ``close``); nothing more can be appended."""
        self.sync()
        os.replace(compact, self.path)
        self._replaced = True

    @property
    def torn_note(self) -> str:
        """What to tell the user when the last record was cut short on opening ("": none)."""
        if not self.torn_bytes:
            return ""
        return (
            f"batcher: the journal's last record was cut short ({self.torn_bytes} bytes, by a "
            "crash or a full disk); that request will be sent again"
        )

    def _truncate(self, size: int) -> None:
        self.torn_bytes = self.path.stat().st_size - size
        with self.path.open("r+b") as f:
            f.truncate(size)


def lock_holder(fd: int) -> int | None:
    """The pid holding a ``flock`` on the file open as ``fd``, when the system says
    (Linux's ``/proc/locks``); ``None`` otherwise."""
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 21416 fe:00:2146321 0 EOF"
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
                    pid = int(fields[4])
                    return pid if pid > 0 else None
    except (OSError, ValueError):
        pass
    return None


def encode(result: Result, body_hash: str, *, provisional: bool = False) -> bytes:
    """One journal line for a result."""
    usage = result.usage
    record = {
        "custom_id": result.custom_id,
        "hash": body_hash,
        "status": result.status,
        "line": result.line,
        "model": result.model,
        "attempts": result.attempts,
        "latency_s": result.latency_s,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "status_code": result.status_code,
        "request_id": result.request_id,
        "error_code": result.error_code,
        "error_message": result.error_message,
        "metadata": result.metadata,
        "cost_usd": result.cost_usd,
        "ttft_s": result.ttft_s,
        "schema_valid": result.schema_valid,
        "schema_error": result.schema_error,
        "endpoint": result.endpoint,
        "usage": None if usage is None else _usage_dict(usage),
        "body": result.body,
    }
    if result.variant is not None:  # absent otherwise: journals of plain jobs stay as they were
        record["variant"] = result.variant
    if result.choices_asked is not None:
        record["choices_asked"] = result.choices_asked
    if result.batch_id is not None:  # answered by a Batch API batch
        record["batch_id"] = result.batch_id
    if result.messages is not None:
        record["messages"] = result.messages
    if result.input is not None:
        record["input"] = result.input
    if provisional:
        record["provisional"] = True
    try:  # ``jsonfast.dumps``, with the newline added by orjson rather than by a copy
        return orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # a lone surrogate becomes its \uXXXX escape, which reads back as is
        return jsonfast.dumps(record) + b"\n"


def decode(record: Mapping[str, Any]) -> Result:
    """The ``Result`` a journal record holds."""
    usage = record.get("usage")
    return Result(
        custom_id=record["custom_id"],
        line=record.get("line") or 0,
        status="ok" if record.get("status") == "ok" else "error",
        model=record.get("model"),
        attempts=record.get("attempts") or 0,
        latency_s=record.get("latency_s") or 0.0,
        started_at=record.get("started_at") or 0.0,
        finished_at=record.get("finished_at") or 0.0,
        status_code=record.get("status_code"),
        request_id=record.get("request_id"),
        body=record.get("body"),
        usage=_usage_of(usage) if isinstance(usage, dict) else None,
        error_code=record.get("error_code"),
        error_message=record.get("error_message"),
        metadata=record.get("metadata"),
        cost_usd=record.get("cost_usd"),
        ttft_s=record.get("ttft_s"),
        schema_valid=record.get("schema_valid"),
        schema_error=record.get("schema_error"),
        endpoint=record.get("endpoint"),
        variant=record.get("variant"),
        choices_asked=record.get("choices_asked"),
        batch_id=record.get("batch_id"),
        messages=_list_or_none(record.get("messages")),
        input=_dict_or_none(record.get("input")),
    )


def kept_in(record: Mapping[str, Any]) -> str | None:
    """Where a compact record's answer is (``"output"`` or ``"errors"``); ``None`` for a
    record that holds its answer."""
    if not isinstance(record.get("row"), int):
        return None
    return "errors" if record.get("in_errors") is True else "output"


def _key_of(record: Mapping[str, Any]) -> str | None:
    """A record's key (id and variant), or ``None`` when it has no usable id."""
    custom_id, variant = record.get("custom_id"), record.get("variant")
    if not isinstance(custom_id, str) or not isinstance(variant, str | None):
        return None
    return record_key(custom_id, variant)


#: The usage fields this version journals; a journal written by another version may hold
#: more (``audio_tokens``, say), which are ignored rather than refused.
_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
                 "reasoning_tokens")  # fmt: skip


def _usage_of(record: Mapping[str, Any]) -> Usage:
    """A journal record's usage: the known fields that hold integers, nothing else."""
    return Usage(**{name: _int_or_none(record.get(name)) for name in _USAGE_FIELDS})


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _list_or_none(value: Any) -> list[Any] | None:
    return value if isinstance(value, list) else None


def _dict_or_none(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _usage_dict(usage: Usage) -> dict[str, int | None]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
    }


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = jsonfast.loads_exact(raw)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None
