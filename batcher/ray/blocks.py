"""The blocks a Ray run is made of: the input's requests as Arrow tables sent to the actors
(``request_blocks``, ``Outbox``), and the finished blocks read back on the driver (the row
saying why a worker stopped, the columns counted into the run's stats)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batcher import jsonfast
from batcher.input.reader import Reader
from batcher.ray.worker import STOPPED
from batcher.records import Reject, Result, Usage
from batcher.runner.stats import RunStats

if TYPE_CHECKING:
    import pyarrow as pa

#: Columns of the request blocks: a parsed ``Request`` (bodies as JSON text).
REQUEST_COLUMNS = (
    "custom_id", "line", "body", "metadata", "prompt_tokens", "completion_budget", "body_hash"
)  # fmt: skip
#: Column types given explicitly (the others are inferred).
_REQUEST_TYPES = {"prompt_tokens": "int64", "completion_budget": "int64", "line": "int64"}
#: The Parquet columns the driver reads back to count a block (``result_of_row``).
COUNTED = (
    "custom_id", "status", "model", "attempts", "endpoint", "error_code", "schema_valid",
    "cost_usd", "prompt_tokens", "completion_tokens", "total_tokens", "line",
)  # fmt: skip


@dataclass
class Outbox:
    """The request blocks put in Ray's object store for the workers, and the requests in them
    (kept as they are sent: an interrupt while reading leaves the count of what was put)."""

    put: Callable[[pa.Table], Any]
    refs: list[Any] = field(default_factory=list)
    requests: int = 0

    def send(self, block: pa.Table) -> None:
        """Put one block in the object store."""
        self.refs.append(self.put(block))
        self.requests += block.num_rows


def request_blocks(
    reader: Reader, skip: set[str], block_rows: int
) -> Iterator[pa.Table | Reject | str]:
    """Tables of up to ``block_rows`` requests to send; rejects; and ids skipped (as ``str``)."""
    import pyarrow as pa

    columns: dict[str, list[Any]] = {name: [] for name in REQUEST_COLUMNS}

    def table() -> pa.Table:
        # prompt_tokens may be all None (not counted): typed, not Arrow's null type
        arrays = {
            name: pa.array(values, type=_REQUEST_TYPES.get(name))
            for name, values in columns.items()
        }
        block = pa.table(arrays)
        for values in columns.values():
            values.clear()
        return block

    for item in reader:
        if isinstance(item, Reject):
            yield item
        elif item.custom_id in skip:
            yield item.custom_id
        else:
            columns["custom_id"].append(item.custom_id)
            columns["line"].append(item.line)
            columns["body"].append(jsonfast.dumps_text(item.body))
            meta = item.metadata
            columns["metadata"].append(None if meta is None else jsonfast.dumps_text(meta))
            columns["prompt_tokens"].append(item.prompt_tokens)
            columns["completion_budget"].append(item.completion_budget)
            columns["body_hash"].append(item.body_hash)
            if len(columns["custom_id"]) >= block_rows:
                yield table()
    if columns["custom_id"]:
        yield table()


def split_stop_row(block: pa.Table) -> tuple[pa.Table, dict[str, Any] | None]:
    """The block's records, and the row saying why its worker stopped if it did
    (``worker``: its ``error_message``, ``error_code`` and ``endpoint``)."""
    import pyarrow.compute as pc

    stopped = pc.equal(block["status"], STOPPED)
    if not pc.any(stopped).as_py():
        return block, None
    rows = block.filter(stopped).select(["error_message", "error_code", "endpoint"]).to_pylist()
    return block.filter(pc.invert(stopped)), rows[0]


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
