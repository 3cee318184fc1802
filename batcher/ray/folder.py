"""The Ray engine's output folder as the driver uses it: what a re-run skips or sends again
(``Rerun``), this run's part files (``PartFiles``), and the folder compacted and counted at the
end (the part files themselves: ``batcher.output.parts``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batcher.http.answers import is_retryable_failure
from batcher.output import parts
from batcher.output.resume import RetryErrors
from batcher.storage import Location

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True, kw_only=True)
class Rerun:
    """What a run found in its output folder: each id's latest record; for the read task, each
    recorded id's (done for this run, request hash); this run's sequence number."""

    found: parts.Scan
    known: dict[str, tuple[bool, str | None]]
    run: int
    stamp: str  # the name stem of this run's parts (``parts.new_stamp``)


def rerun(output: Location, *, restart: bool, retry_errors: RetryErrors) -> Rerun:
    """Ready the folder (``parts.prepare``) and read what is done in it for this run (under
    a local folder's lock; in a store, the run's number is one more than the highest listed
    now: see ``parts``)."""
    found = parts.prepare(output, restart=restart)
    known = {cid: (done(r, retry_errors), r.hash) for cid, r in found.records.items()}
    run = parts.next_run(output)
    return Rerun(found=found, known=known, run=run, stamp=parts.new_stamp(run))


def done(record: parts.Record, retry_errors: RetryErrors) -> bool:
    """Whether a recorded id is finished for this run if its line is unchanged (the read task
    compares the hashes), as the local engine's ``ResumePlan``."""
    if record.status == "ok" or retry_errors == "none":
        return True
    if retry_errors == "all":
        return False
    return not is_retryable_failure(record.status_code, record.error_code)


@dataclass(frozen=True, kw_only=True)
class PartFiles:
    """This run's part files: one per finished block, named after the run's sequence number,
    each with the run's provenance, its number, the requests' hashes and the output's
    columns."""

    output: Location  # a local folder, or a store's prefix (``s3://bucket/out.parquet``)
    run: int
    stamp: str  # ``parts.new_stamp(run)``
    metadata: dict[str, str]
    schema: pa.Schema  # the output's columns (``rows.schema_for`` the job's shape)

    def write(self, n: int, table: pa.Table, hashes: dict[str, str]) -> None:
        """Write block ``n``'s records, their requests' ``hashes``, as a part (atomically)."""
        path = parts.part_path(self.output, self.stamp, n)
        metadata = parts.part_metadata(self.metadata, self.run, hashes)
        parts.write_part(path, table, metadata, schema=self.schema)


def settle(output: Location, *, resent: bool) -> Counter[str]:
    """The folder after a run: re-sent ids' old records dropped; its records by status."""
    if resent:  # their old records are still in the parts written before
        parts.compact(parts.scan(output))
    return parts.scan(output).counts()


def strangers(output: Location, found: Rerun) -> list[str]:
    """The names of parts another run wrote while this one ran (their run number as high as
    this one's or higher, their stamp not this run's): two drivers on one output prefix,
    which a store's lack of a lock lets happen."""
    mine = f"part-{found.stamp}-"
    names = [parts.part_name(p) for p in parts.list_parts(output)]
    return [n for n in names if parts.order_key(n)[0] >= found.run and not n.startswith(mine)]
