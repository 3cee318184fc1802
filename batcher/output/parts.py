"""The Ray engine's output: a folder of Parquet part files, what resume reads from it.

Each part holds the records of one block, with ``writers.SCHEMA`` and the job's typed columns
(``rows.schema_for``), and is named ``part-<run>-<random>-<n>.parquet``: ``<run>`` is the run's
sequence number (six digits), one more than the highest in the folder when the run took the
folder's lock, and ``<n>`` the block's number in that run (in a part a worker writes to a
store, the block's first line: unique in the run without asking anyone). The part's metadata
holds the same number (``RUN_KEY``) and each record's request hash (``HASHES_KEY``: id ->
hash), so a re-run notices a line that changed since it was answered. Parts are written whole:
in a local folder through a hidden ``.partial`` file, fsynced and renamed; in object storage
(the folder is then a URI, ``s3://bucket/out.parquet``: its parts are the objects under that
prefix) as one object each: uploaded under a hidden name (``.NAME.partial``, which dataset
readers skip), then copied to its name by the store, which shows an object only whole (S3's
CopyObject), so a reader sees the whole part or none.

One run at a time per folder: a local folder's lock (``locked``). An object store has no lock,
so a run's number there is one more than the highest among the parts listed when it starts,
and one driver per output prefix is the user's to ensure. Two that overlap do not overwrite
each other's parts (the random part of the names differs) and each id's latest record
survives compaction; they may send the same requests twice and leave an id in two parts,
which the next run keeps once.

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
from typing import TYPE_CHECKING, overload

from batcher.errors import ConfigError, OutputError
from batcher.output.writers import parquet_parts
from batcher.storage import Location, check_writable_place, filesystem, shown
from batcher.storage import reason as _reason

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

    parts: list[Location]
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


def order_key(part: Location) -> tuple[int, int, str]:
    """Where a part sorts among the folder's: (run, block, name); older names are run 0."""
    name = part_name(part)
    named = _NAME.fullmatch(name)
    if named is None:
        return (0, 0, name)
    return (int(named[1]), int(named[2]), name)


def next_run(folder: Location) -> int:
    """This run's sequence number: one more than the highest of the folder's parts (taken
    under a local folder's lock, so two runs never share one; in a store, as listed)."""
    return 1 + max((order_key(p)[0] for p in list_parts(folder)), default=0)


def list_parts(folder: Location) -> list[Location]:
    """The folder's finished part files in name order: a local folder's ``*.parquet`` files,
    or the ``*.parquet`` objects right under a URI's prefix (none if there is nothing
    there yet)."""
    if isinstance(folder, Path):
        return list(parquet_parts(folder))
    names = sorted(
        n for n in _objects(folder) if n.endswith(".parquet") and not n.startswith((".", "_"))
    )
    return [_child(folder, name) for name in names]


def _hidden_partials(folder: str) -> list[str]:
    """The hidden ``.NAME.partial`` objects under a URI's prefix (uploads cut short)."""
    names = _objects(folder)
    return [_child(folder, n) for n in names if n.startswith(".") and n.endswith(".partial")]


def _objects(folder: str) -> list[str]:
    """The names of the objects right under a URI's prefix (none when there is none)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(folder, "job.output")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except Exception as exc:
        raise OutputError(f"cannot list {shown(folder)}: {_reason(exc, folder)}") from None
    return [i.base_name for i in infos if i.type == pafs.FileType.File]


def part_name(part: Location) -> str:
    """A part's file name (a URI's last path segment, without its query)."""
    if isinstance(part, Path):
        return part.name
    return part.split("?", 1)[0].rstrip("/").rpartition("/")[2]


def _child(folder: str, name: str) -> str:
    """The URI of ``name`` under the URI ``folder`` (its query, as region or endpoint, kept)."""
    base, sep, query = folder.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def new_stamp(run: int) -> str:
    """The name stem of run ``run``'s parts (the random part tells runs apart by eye only)."""
    return f"{run:06d}-{uuid.uuid4().hex[:6]}"


@overload
def part_path(folder: Path, stamp: str, n: int) -> Path: ...
@overload
def part_path(folder: str, stamp: str, n: int) -> str: ...
def part_path(folder: Location, stamp: str, n: int) -> Location:
    """Block ``n``'s part of the run named ``stamp`` (``new_stamp``)."""
    name = f"part-{stamp}-{n:05d}.parquet"
    return folder / name if isinstance(folder, Path) else _child(folder, name)


def part_metadata(
    metadata: Mapping[str, str], run: int, hashes: Mapping[str, str]
) -> dict[str, str]:
    """A part's key-value metadata: the run's (provenance), its number, its requests' hashes."""
    return {**metadata, RUN_KEY: str(run), HASHES_KEY: json.dumps(hashes, separators=(",", ":"))}


@contextlib.contextmanager
def locked(folder: Location) -> Iterator[None]:
    """One run at a time per local output folder, as the local engine's journal lock. A
    store's prefix has no lock: nothing is held (see the module's note)."""
    if not isinstance(folder, Path):
        yield
        return
    with (folder / ".lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                "job.output", f"another batcher run is writing {folder}; wait for it to finish"
            ) from None
        yield


def prepare(folder: Location, *, restart: bool) -> Scan:
    """Make the folder ready for a run and read it: parts deleted with ``restart``, parts a
    crash cut short removed (their blocks are sent again; in a store, an upload cut short
    never became an object), ids found twice kept once."""
    if isinstance(folder, Path):
        folder.mkdir(exist_ok=True)
        for leftover in folder.glob(".*.partial"):
            leftover.unlink()
    else:
        check_writable_place(folder)  # its bucket exists and can be reached
        for hidden in _hidden_partials(folder):
            _delete(hidden)
    if restart:
        for part in list_parts(folder):
            _delete(part)
    found = scan(folder)
    if found.duplicated:
        compact(found)
        found = scan(folder)
    return found


def scan(folder: Location) -> Scan:
    """Read the ids, statuses and request hashes of every part (for an id found twice, the
    later part wins: ``order_key``)."""
    parts = sorted(list_parts(folder), key=order_key)
    records: dict[str, Record] = {}
    duplicated = False
    columns = ["custom_id", "status", "status_code", "error_code"]
    for index, part in enumerate(parts):
        read = read_part(part, columns)
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

    for index, part in enumerate(found.parts):
        table = read_part(part)
        ids = table["custom_id"].to_pylist()
        keep = [found.records[cid].part == index for cid in ids]
        if all(keep):
            continue
        if not any(keep):
            _delete(part)
            continue
        kept = table.filter(pa.array(keep))
        write_part(part, kept, None, schema=kept.schema.remove_metadata())


def read_part(part: Location, columns: list[str] | None = None) -> pa.Table:
    """One part's table (``columns`` of it); an unreadable part is an ``OutputError``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if isinstance(part, Path):
            return pq.read_table(part, columns=columns)
        fs, path = filesystem(part, "job.output")
        return pq.read_table(path, columns=columns, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        reason = str(exc) if isinstance(part, Path) else _reason(exc, part)
        raise OutputError(f"cannot read {shown(part)}: {reason}") from None


def _delete(part: Location) -> None:
    """Remove a part (a file, or an object)."""
    if isinstance(part, Path):
        part.unlink()
        return
    fs, path = filesystem(part, "job.output")
    try:
        fs.delete_file(path)
    except Exception as exc:
        raise OutputError(f"cannot delete {shown(part)}: {_reason(exc, part)}") from None


def write_part(
    path: Location,
    table: pa.Table,
    metadata: Mapping[str, str] | None,
    *,
    schema: pa.Schema | None = None,
) -> None:
    """Write one part atomically (a reader never sees half): a file through ``.partial``,
    fsync, rename; an object serialised in memory, then sent in one upload (``_put``).

    The table is cast to ``schema`` (by default the output's of a job without typed columns:
    ``SCHEMA`` and ``messages``); ``metadata`` replaces its key-value metadata (``None`` keeps
    the table's own)."""
    import pyarrow.parquet as pq

    from batcher.output.rows import PLAIN, schema_for

    own = table.schema.metadata
    table = table.replace_schema_metadata(None).cast(schema or schema_for(PLAIN))
    table = table.replace_schema_metadata(dict(metadata) if metadata is not None else own)
    if not isinstance(path, Path):
        _put(path, table)
        return
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


def _put(uri: str, table: pa.Table) -> None:
    """Write ``table`` as the object ``uri``: serialised in memory (a part is one block),
    uploaded under a hidden name beside it (``.NAME.partial``, as a local part), then copied
    to its name by the store (S3's CopyObject: the object appears whole) and the hidden one
    deleted. An upload cut short can only leave the hidden object, whatever the client does
    with a failed stream; ``prepare`` removes those."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    fs, path = filesystem(uri, "job.output")
    folder, _, name = path.rpartition("/")
    hidden = f"{folder}/.{name}.partial"
    try:
        with fs.open_output_stream(hidden, compression=None) as out:
            out.write(sink.getvalue())
        fs.copy_file(hidden, path)
        fs.delete_file(hidden)
    except Exception as exc:
        raise OutputError(f"cannot write {shown(uri)}: {_reason(exc, uri)}") from None
