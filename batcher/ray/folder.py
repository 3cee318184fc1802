"""The Ray engine's output folder as the driver uses it: what a re-run skips or sends again
(``Rerun``), this run's part files (``PartFiles``), and the folder compacted and counted at the
end (the part files themselves: ``batcher.output.parts``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batcher.http.answers import is_retryable_failure
from batcher.output import parts
from batcher.output.resume import RetryErrors

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True, kw_only=True)
class Rerun:
    """What a run found in its output folder: each id's latest record, and the ids it skips."""

    found: parts.Scan
    skip: set[str]

    def resent(self, block: pa.Table) -> int:
        """How many of a block's requests have a record already (sent again this run)."""
        return sum(cid in self.found.records for cid in block["custom_id"].to_pylist())


def rerun(output: Path, *, restart: bool, retry_errors: RetryErrors) -> Rerun:
    """Ready the folder (``parts.prepare``) and read what is done in it for this run."""
    found = parts.prepare(output, restart=restart)
    skip = {cid for cid, record in found.records.items() if done(record, retry_errors)}
    return Rerun(found=found, skip=skip)


def done(record: parts.Record, retry_errors: RetryErrors) -> bool:
    """Whether a recorded id is finished for this run: as the local engine's ``ResumePlan``
    (by id only: parts keep no hash of the request, so a changed line is not noticed)."""
    if record.status == "ok" or retry_errors == "none":
        return True
    if retry_errors == "all":
        return False
    return not is_retryable_failure(record.status_code, record.error_code)


@dataclass(frozen=True, kw_only=True)
class PartFiles:
    """This run's part files: one per finished block, named after the run's stamp, each with
    the run's provenance and the output's columns."""

    output: Path
    stamp: str
    metadata: dict[str, str]
    schema: pa.Schema  # the output's columns (``rows.schema_for`` the job's shape)

    def write(self, n: int, table: pa.Table) -> None:
        """Write block ``n``'s records as a part (atomically)."""
        path = parts.part_path(self.output, self.stamp, n)
        parts.write_part(path, table, self.metadata, schema=self.schema)


def settle(output: Path, *, resent: bool) -> Counter[str]:
    """The folder after a run: re-sent ids' old records dropped; its records by status."""
    if resent:  # their old records are still in the parts written before
        parts.compact(parts.scan(output))
    return parts.scan(output).counts()
