"""The Ray engine's output: a folder of Parquet part files, what resume reads from it.

Each part holds the records of one block, with ``writers.SCHEMA`` and the job's typed columns
(``rows.schema_for``), and is named ``part-<run>-<random>-<n>.parquet``: ``<run>`` is the run's
sequence number (six digits), one more than the highest in the folder when the run took the
folder's lock, and ``<n>`` the block's number in that run. The part's metadata holds the same
number (``RUN_KEY``) and each record's request hash (``HASHES_KEY``: id -> hash), so a re-run
notices a line that changed since it was answered. Parts are written whole (``.partial``,
fsync, rename).

An id is in one part, but a re-sent request (an error retried, a changed line) is first
written to a new part beside its old record; ``compact`` then drops the old row, and a run
that finds an id twice (it stopped in between) keeps one the same way before doing anything
else. The winner is the record of the later run (the higher sequence number), then of the
higher block number: never a wall clock, which differs between machines and can step back.
Parts named before sequence numbers (``part-<UTC time>-...``) count as run 0, in name order.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batcher.errors import ConfigError, OutputError
from batcher.output.writers import parquet_parts

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True, slots=True)
class Record:
    """What resume needs of an id's latest record, and the part (index) it is in."""

    status: str
    status_code: int | None
    error_code: str | None
    part: int
    hash: str | None = None  # the request's hash; None in a part written without hashes


@dataclass(frozen=True, kw_only=True)
class Scan:
    """The output folder as it stands: its parts in order, each id's latest record."""

    parts: list[Path]
    records: dict[str, Record]
    duplicated: bool  # some id is in more than one part

    def counts(self) -> Counter[str]:
        """Records by status."""
        return Counter(record.status for record in self.records.values())


#: The part metadata key of the run's sequence number.
RUN_KEY = "batcher.run"
#: The part metadata key of its records' request hashes (a JSON object: id -> hash).
HASHES_KEY = "batcher.request_hashes"
_NAME = re.compile(r"part-(\d{6})-[0-9a-f]{6}-(\d+)\.parquet")


def order_key(part: Path) -> tuple[int, int, str]:
    """Where a part sorts among the folder's: (run, block, name); older names are run 0."""
    named = _NAME.fullmatch(part.name)
    if named is None:
        return (0, 0, part.name)
    return (int(named[1]), int(named[2]), part.name)


def next_run(folder: Path) -> int:
    """This run's sequence number: one more than the highest of the folder's parts (taken
    under the folder's lock, so two runs never share one)."""
    return 1 + max((order_key(p)[0] for p in parquet_parts(folder)), default=0)


def new_stamp(run: int) -> str:
    """The name stem of run ``run``'s parts (the random part tells runs apart by eye only)."""
    return f"{run:06d}-{uuid.uuid4().hex[:6]}"


def part_path(folder: Path, stamp: str, n: int) -> Path:
    """Block ``n``'s part of the run named ``stamp`` (``new_stamp``)."""
    return folder / f"part-{stamp}-{n:05d}.parquet"


def part_metadata(
    metadata: Mapping[str, str], run: int, hashes: Mapping[str, str]
) -> dict[str, str]:
    """A part's key-value metadata: the run's (provenance), its number, its requests' hashes."""
    return {**metadata, RUN_KEY: str(run), HASHES_KEY: json.dumps(hashes, separators=(",", ":"))}


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """One run at a time per output folder, as the local engine's journal lock."""
    with (folder / ".lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                "job.output", f"another batcher run is writing {folder}; wait for it to finish"
            ) from None
        yield


def prepare(folder: Path, *, restart: bool) -> Scan:
    """Make the folder ready for a run and read it: parts deleted with ``restart``, parts a
    crash cut short removed (their blocks are sent again), ids found twice kept once."""
    folder.mkdir(exist_ok=True)
    if restart:
        for part in parquet_parts(folder):
            part.unlink()
    for partial in folder.glob(".*.partial"):
        partial.unlink()
    found = scan(folder)
    if found.duplicated:
        compact(found)
        found = scan(folder)
    return found


def scan(folder: Path) -> Scan:
    """Read the ids, statuses and request hashes of every part (for an id found twice, the
    later part wins: ``order_key``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(parquet_parts(folder), key=order_key)
    records: dict[str, Record] = {}
    duplicated = False
    columns = ["custom_id", "status", "status_code", "error_code"]
    for index, part in enumerate(parts):
        try:
            read = pq.read_table(part, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"cannot read {part}: {exc}") from None
        hashes = _hashes(read.schema.metadata)
        table = read.to_pydict()
        for cid, status, code, error in zip(*(table[c] for c in columns), strict=True):
            duplicated = duplicated or cid in records
            records[cid] = Record(status, code, error, index, hashes.get(cid))
    return Scan(parts=parts, records=records, duplicated=duplicated)


def _hashes(metadata: Mapping[bytes, bytes] | None) -> dict[str, str]:
    """A part's request hashes (none in a part written without them)."""
    raw = (metadata or {}).get(HASHES_KEY.encode())
    if raw is None:
        return {}
    value = json.loads(raw)
    return value if isinstance(value, dict) else {}


def compact(found: Scan) -> None:
    """Rewrite every part that holds a record a later part replaces, without it (a part left
    with no rows is deleted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for index, part in enumerate(found.parts):
        table = pq.read_table(part)
        ids = table["custom_id"].to_pylist()
        keep = [found.records[cid].part == index for cid in ids]
        if all(keep):
            continue
        if not any(keep):
            part.unlink()
            continue
        kept = table.filter(pa.array(keep))
        write_part(part, kept, None, schema=kept.schema.remove_metadata())


def write_part(
    path: Path,
    table: pa.Table,
    metadata: Mapping[str, str] | None,
    *,
    schema: pa.Schema | None = None,
) -> None:
    """Write one part atomically: ``.partial``, fsync, rename (a reader never sees half).

    The table is cast to ``schema`` (by default the output's of a job without typed columns:
    ``SCHEMA`` and ``messages``); ``metadata`` replaces its key-value metadata (``None`` keeps
    the table's own)."""
    import pyarrow.parquet as pq

    from batcher.output.rows import PLAIN, schema_for

    own = table.schema.metadata
    table = table.replace_schema_metadata(None).cast(schema or schema_for(PLAIN))
    table = table.replace_schema_metadata(dict(metadata) if metadata is not None else own)
    # A dot first: dataset readers (pyarrow, hence pandas) skip hidden files, so one that
    # reads the folder during a run never meets a half-written part.
    partial = path.with_name("." + path.name + ".partial")
    pq.write_table(table, partial, compression="zstd")
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
