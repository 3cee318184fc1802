"""The Ray engine's output: a folder of Parquet part files, what resume reads from it.

Each part holds the records of one block, with ``writers.SCHEMA`` and the job's typed columns
(``rows.schema_for``), and is named
``part-<UTC time to the microsecond>-<random>-<n>.parquet``, so name order is the order runs
wrote them in. Parts are written whole (``.partial``, fsync, rename). An id is in one part, but
a re-sent request (``--retry-errors``) is first written to a new part beside its old record;
``compact`` then drops the old row, and a run that finds an id twice (it stopped in between)
keeps the later record the same way before doing anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
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


@dataclass(frozen=True, kw_only=True)
class Scan:
    """The output folder as it stands: its parts in order, each id's latest record."""

    parts: list[Path]
    records: dict[str, Record]
    duplicated: bool  # some id is in more than one part

    def counts(self) -> Counter[str]:
        """Records by status."""
        return Counter(record.status for record in self.records.values())


def new_stamp() -> str:
    """The name stem for this run's parts: later runs sort after earlier ones."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f") + "-" + uuid.uuid4().hex[:6]


def part_path(folder: Path, stamp: str, n: int) -> Path:
    return folder / f"part-{stamp}-{n:05d}.parquet"


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
    """Read the ids and statuses of every part (the later part wins for an id found twice)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = parquet_parts(folder)
    records: dict[str, Record] = {}
    duplicated = False
    columns = ["custom_id", "status", "status_code", "error_code"]
    for index, part in enumerate(parts):
        try:
            table = pq.read_table(part, columns=columns).to_pydict()
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"cannot read {part}: {exc}") from None
        for cid, status, code, error in zip(*(table[c] for c in columns), strict=True):
            duplicated = duplicated or cid in records
            records[cid] = Record(status, code, error, index)
    return Scan(parts=parts, records=records, duplicated=duplicated)


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
