"""The journal of chunk states (``OUTPUT.batches.jsonl``): what a rerun knows of its batches.

One JSON line per change of a chunk: its whole state after the change (uploaded file id, batch
id, status, request counts), appended and fsynced before the change is acted on, so a crash
loses nothing that happened before it. Reading keeps the latest line of each chunk. A torn
last line (the process died mid-write) is ignored when read and cut off when the journal is
opened for writing; a broken line elsewhere is an error naming it (the file was edited).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batcher.batch.api import ENDED, RequestCounts
from batcher.errors import ConfigError, OutputError

STATE_SUFFIX = ".batches.jsonl"


def state_path(output: Path) -> Path:
    """The chunk-state journal beside an output: ``OUTPUT.batches.jsonl``."""
    return output.with_name(output.name + STATE_SUFFIX)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkState:
    """What is known of a chunk. ``status`` is batcher's (``planned``, ``uploaded``,
    ``collected``) or the batch's own once it exists (``validating`` ... ``completed``).
    ``resubmit``, once collected: the requests that go into a batch of the next round, with
    the attempts each has used. ``refused``: batches of the chunk the queue refused (the
    enqueued-token limit), never adopted again. ``model``, ``round`` and ``members`` (each
    request's key and the hash of the body it was sent with) are journaled when the chunk is
    uploaded: a rerun rebuilds the chunk from them, whatever the input or the chunking
    settings say by then. A line carries ``members`` only when they change; reading keeps
    the last ones given. ``online``, once collected: the requests the batch did not run that
    go to the online engine (``unanswered = "online"``) instead of a next round."""

    chunk: str
    status: str = "planned"
    file_id: str | None = None
    batch_id: str | None = None
    request_counts: RequestCounts = dataclasses.field(default_factory=RequestCounts)
    updated_at: float = 0.0
    resubmit: dict[str, int] = dataclasses.field(default_factory=dict)
    refused: tuple[str, ...] = ()
    model: str | None = None
    round: int = 0
    members: dict[str, str] = dataclasses.field(default_factory=dict)
    online: tuple[str, ...] = ()

    @property
    def in_flight(self) -> bool:
        """Whether the chunk has a batch that may still run and has not been cancelled."""
        return self.batch_id is not None and self.status not in _SETTLED

    @property
    def live(self) -> bool:
        """Whether a rerun follows this chunk: uploaded (its batch perhaps made) and not
        collected."""
        return bool(self.members) and self.file_id is not None and self.status != "collected"

    def as_record(self, *, members: bool = True) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        if not members:
            del record["members"]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any], before: ChunkState | None = None) -> ChunkState:
        counts = record.get("request_counts")
        members = record.get("members")
        return cls(
            chunk=str(record["chunk"]),
            status=str(record.get("status") or "planned"),
            file_id=record.get("file_id"),
            batch_id=record.get("batch_id"),
            request_counts=RequestCounts(**counts) if isinstance(counts, dict) else RequestCounts(),
            updated_at=float(record.get("updated_at") or 0.0),
            resubmit=_tries(record.get("resubmit")),
            refused=tuple(str(i) for i in record.get("refused") or ()),
            model=record.get("model"),
            round=int(record.get("round") or 0),
            members=_hashes(members) if members is not None else (before.members if before else {}),
            online=tuple(str(k) for k in record.get("online") or ()),
        )


#: Chunk statuses of a batch that runs no more (or is being cancelled).
_SETTLED = ENDED | {"collected", "cancelling"}


def _tries(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, int)}


def _hashes(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def read_states(path: Path) -> dict[str, ChunkState]:
    """The latest state of each chunk in the journal at ``path`` (empty when there is none)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    states: dict[str, ChunkState] = {}
    for state in _parse(path, data)[0]:
        states[state.chunk] = state
    return states


class StateJournal:
    """The journal opened for appending; ``states`` holds the latest state of each chunk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        existed = path.exists()
        data = path.read_bytes() if existed else b""
        parsed, whole = _parse(path, data)
        self.states: dict[str, ChunkState] = {state.chunk: state for state in parsed}
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if whole < len(data):
            os.ftruncate(self._fd, whole)  # the torn tail of a write the process died in
            os.fsync(self._fd)
        if not existed:
            _fsync_dir(path.parent)

    def record(self, chunk: str, **changes: Any) -> ChunkState:
        """Append the chunk's state with ``changes`` applied (fsynced); returns it."""
        before = self.states.get(chunk) or ChunkState(chunk=chunk)
        state = dataclasses.replace(before, **changes, updated_at=time.time())
        record = state.as_record(members="members" in changes)
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        try:
            os.write(self._fd, line)
            os.fsync(self._fd)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot record a batch's state: {exc}") from None
        self.states[chunk] = state
        return state

    def close(self) -> None:
        """Close the file (every record is already on disk)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> StateJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(path: Path, data: bytes) -> tuple[list[ChunkState], int]:
    """The states in ``data`` and the length of its whole lines (a torn last one left out)."""
    states: list[ChunkState] = []
    latest: dict[str, ChunkState] = {}
    lines = data.split(b"\n")
    whole = 0
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if last and not line:
            break
        try:
            record = json.loads(line)
            state = ChunkState.from_record(record, latest.get(str(record["chunk"])))
        except (ValueError, KeyError, TypeError):
            if last or (number == len(lines) - 1 and not lines[-1]):
                break  # the last line: torn by a crash mid-write
            message = f"{path}: line {number} is not a chunk state; fix or remove it"
            raise OutputError(message) from None
        if last:
            break  # parseable but without its newline: not known to be whole
        states.append(state)
        latest[state.chunk] = state
        whole += len(line) + 1
    return states, whole


def _fsync_dir(folder: Path) -> None:
    """Make a new file's directory entry durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def forget_states(output: Path) -> None:
    """Remove the chunk-state journal beside ``output`` (a ``--restart``). Refused with a
    ``ConfigError`` while it shows batches still running: forgetting them would leave them
    paid for and never collected."""
    path = state_path(output)
    running = [s.batch_id for s in read_states(path).values() if s.in_flight]
    if running:
        raise ConfigError(
            "--restart",
            f"{len(running)} batch(es) of this output may still be running "
            f"({', '.join(str(i) for i in running[:3])}{', ...' if len(running) > 3 else ''}): "
            "cancel them first (batcher run JOB --mode batch --cancel), or run without "
            "--restart to collect them",
        )
    path.unlink(missing_ok=True)


def check_cancellable(output: Path) -> None:
    """Refuse ``--cancel`` (``ConfigError``, before anything is sent or the run's status is
    touched) when the chunk-state journal beside ``output`` shows no batch that may still
    run: there is nothing to cancel, and a finished job is left as it ended."""
    if not any(s.in_flight for s in read_states(state_path(output)).values()):
        raise ConfigError(
            "--cancel",
            f"no batch of {output.name} is running: nothing to cancel "
            "(batcher status OUTPUT shows how the job stands)",
        )


def latest_states(path: Path) -> dict[str, tuple[ChunkState, int]]:
    """The latest state of each chunk in the journal at ``path`` with its number of requests,
    read line by line with the members left out (memory grows with the chunks, not their
    requests): what ``batcher status`` shows. A line that cannot be read (torn by a crash,
    being written) is passed over; empty when there is no journal."""
    states: dict[str, tuple[ChunkState, int]] = {}
    try:
        with path.open("rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # being written, or torn
                try:
                    record = json.loads(line)
                    members = record.pop("members", None)
                    state = ChunkState.from_record(record)
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
                before = states.get(state.chunk)
                size = len(members) if isinstance(members, dict) else (before[1] if before else 0)
                states[state.chunk] = (state, size)
    except FileNotFoundError:
        return {}
    return states
