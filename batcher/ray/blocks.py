"""The finished blocks a Ray run gets back on the driver: the records to write, their request
hashes, the marker rows the read task and the workers add (rejects, ids skipped or sent again,
lines read, requests taken, why a worker stopped), and the columns counted into the run's
stats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batcher.ray.reading import MARKERS, READ, REJECTED, RESENT, SKIPPED
from batcher.ray.worker import SENT, STOPPED
from batcher.records import Reject, Result, Usage
from batcher.runner.stats import RunStats

if TYPE_CHECKING:
    import pyarrow as pa

    from batcher.ray.folder import PartFiles

#: The Parquet columns the driver reads back to count a block (``result_of_row``).
COUNTED = (
    "custom_id", "status", "model", "attempts", "endpoint", "error_code", "schema_valid",
    "cost_usd", "prompt_tokens", "completion_tokens", "total_tokens", "line",
)  # fmt: skip
#: Statuses that are markers, not records.
_NOT_RECORDS = (*MARKERS, SENT, STOPPED)


@dataclass(frozen=True, kw_only=True)
class Finished:
    """One finished block taken apart: its records, their request hashes, its rejects, and
    the row saying why its worker stopped (``error_message``, ``error_code``, ``endpoint``)."""

    records: pa.Table
    hashes: dict[str, str]
    rejects: list[Reject]
    stop: dict[str, Any] | None


def take_apart(block: pa.Table, stats: RunStats) -> Finished:
    """A finished block as ``Finished``; its markers counted into ``stats`` (skipped,
    re-sent, rejected, lines read, requests submitted)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    marked = pc.is_in(block["status"], value_set=pa.array(_NOT_RECORDS))
    records = block.filter(pc.invert(marked))
    hashes = dict(zip(*(records[c].to_pylist() for c in ("custom_id", "body_hash")), strict=True))
    records = records.drop_columns(["body_hash"])
    columns = ["custom_id", "status", "line", "error_message", "content", "error_code", "endpoint"]
    rejects, stop = [], None
    for row in block.filter(marked).select(columns).to_pylist():
        status = row["status"]
        if status == REJECTED:
            rejects.append(_reject(row))
        elif status == SKIPPED:
            stats.skipped += 1
        elif status == RESENT:
            stats.resent += 1
        elif status == READ:
            stats.lines_read = row["line"]
        elif status == SENT:
            stats.submitted += row["line"]
        elif stop is None:
            stop = row
    stats.rejected += len(rejects)
    return Finished(records=records, hashes=hashes, rejects=rejects, stop=stop)


def write_on_worker(block: pa.Table, files: PartFiles) -> pa.Table:
    """On a worker, for an output in object storage: write a finished block's records as a
    part straight to the store (numbered after its first line, which no other block of the
    run holds), and return the block as the driver needs it to count: the records' counted
    columns only (their answers stay in the part), the marker rows whole."""
    import pyarrow as pa
    import pyarrow.compute as pc

    done = take_apart(block, RunStats())
    if done.records.num_rows:
        first = pc.min(done.records["line"]).as_py()
        files.write(first or 0, done.records, done.hashes)
    marked = pc.is_in(block["status"], value_set=pa.array(_NOT_RECORDS))
    slim = block.select(list(dict.fromkeys([*COUNTED, "error_message", "content", "body_hash"])))
    for name in ("error_message", "content"):  # a record's, in its part; a marker's, kept
        column = slim[name]
        kept = pc.if_else(marked, column, pa.nulls(len(slim), column.type))
        slim = slim.set_column(slim.schema.get_field_index(name), name, kept)
    return slim


def _reject(row: dict[str, Any]) -> Reject:
    """A reject marker row as the ``Reject`` it was."""
    return Reject(
        line=row["line"],
        reason=row["error_message"],
        text=row["content"] or "",
        custom_id=row["custom_id"] or None,
    )


def count_rows(table: pa.Table, stats: RunStats) -> None:
    """Count a finished block's records into the run's stats."""
    for row in table.select(list(COUNTED)).to_pylist():
        stats.add(result_of_row(row))


def result_of_row(row: dict[str, Any]) -> Result:
    """Enough of a ``Result`` for ``RunStats.add`` from the counted columns of a row."""
    return Result(
        custom_id=row["custom_id"],
        line=row["line"],
        status=row["status"],
        model=row["model"],
        attempts=row["attempts"],
        latency_s=0.0,
        started_at=0.0,
        finished_at=0.0,
        error_code=row["error_code"],
        cost_usd=row["cost_usd"],
        schema_valid=row["schema_valid"],
        endpoint=row["endpoint"],
        usage=Usage(
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
            total_tokens=row["total_tokens"],
        )
        if row["total_tokens"] is not None or row["prompt_tokens"] is not None
        else None,
    )
