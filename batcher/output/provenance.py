"""How an output was made: the job (without secrets), batcher's version and the input's hash,
stored in the Parquet file's key-value metadata and shown by ``batcher report``; and how its
run ended (``run_record``: state, exit code, start and end in UTC, the 429s met), added to
the same metadata when the output is finished."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batcher.config import JobConfig
from batcher.errors import BatcherError
from batcher.http.redact import redact_url, scheme_only
from batcher.storage import origin_of

PREFIX = "batcher."
REDACTED = "<redacted>"


def job_record(job: JobConfig) -> dict[str, Any]:
    """The job as JSON-ready data, with every endpoint header value redacted.

    The API key is never part of a job (only the name of its variable is); header values are
    dropped because gateways take keys in headers too (``api-key``, ``x-api-key``); notify
    URLs keep only their scheme (a webhook's path is its token).
    """
    record = dataclasses.asdict(job)
    # [[endpoints]] too: each has its own headers and URL (endpoint is the first of them).
    for item, endpoint in [
        (record["endpoint"], job.endpoint),
        *zip(record["endpoints"], job.endpoints, strict=True),
    ]:
        item["headers"] = {name: REDACTED for name in endpoint.headers}
        item["base_url"] = redact_url(endpoint.base_url)
    for key, given in (("input", job.input), ("output", job.output)):
        # a staged file as the URI it stands for; a URI's credentials redacted
        record[key] = None if given is None else origin_of(given)
    record["notify"]["urls"] = [scheme_only(url) for url in job.notify.urls]
    return record


def file_sha256(path: Path) -> str | None:
    """The SHA-256 of a file's bytes; ``None`` for stdin or a file that cannot be read again."""
    if str(path) == "-" or not path.is_file():
        return None
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def provenance(job: JobConfig, input_path: Path) -> dict[str, str]:
    """The key-value metadata for an output of ``job``."""
    from batcher import __version__

    return {
        PREFIX + "version": __version__,
        PREFIX + "job": json.dumps(job_record(job), sort_keys=True, default=str),
        PREFIX + "input": origin_of(input_path),
        PREFIX + "input_sha256": file_sha256(input_path) or "",
        PREFIX + "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


#: The most bins ``rate_limited_bins`` keeps: seconds are merged into wider bins past it, so a
#: long run's record of 429s stays a few kilobytes in the file's footer.
MAX_429_BINS = 1440


def run_record(
    *,
    state: str,
    exit_code: int,
    started_at: float,
    ended_at: float,
    rate_limited_at: Mapping[int, int] | None,
) -> dict[str, str]:
    """The key-value metadata of how a run ended: ``state`` (``finished``, or ``stopped
    early: REASON``), its exit code, its start and end (ISO-8601 UTC) and the 429 answers it met
    by the Unix second they came (``rate_limited_bins``; left out when ``None``: not counted)."""
    record = {
        PREFIX + "state": state,
        PREFIX + "exit_code": str(exit_code),
        PREFIX + "started_at": _iso(started_at),
        PREFIX + "ended_at": _iso(ended_at),
    }
    if rate_limited_at is not None:
        record[PREFIX + "rate_limited"] = json.dumps(rate_limited_bins(rate_limited_at))
    return record


def rate_limited_bins(at: Mapping[int, int], *, width: int = 1) -> dict[str, Any]:
    """The 429s counted by Unix second as ``{"bin_s": W, "counts": [[START, N], ...]}``:
    W is ``width`` (1, or the width of bins merged in), doubled until at most
    ``MAX_429_BINS`` bins hold them."""
    bins = _binned(at, width)
    while len(bins) > MAX_429_BINS:
        width *= 2
        bins = _binned(at, width)
    return {"bin_s": width, "counts": [[start, bins[start]] for start in sorted(bins)]}


def _binned(at: Mapping[int, int], width: int) -> dict[int, int]:
    bins: dict[int, int] = {}
    for second, n in at.items():
        start = second - second % width
        bins[start] = bins.get(start, 0) + n
    return bins


def with_earlier_429s(record: Mapping[str, str], output: Path) -> dict[str, str]:
    """``record`` (how a run ended: ``run_record``) with the 429s that the earlier runs of
    ``output`` met added, as that output's metadata holds them: the output written again
    holds every run's answers, so its 429s cover every run too. Unchanged when this run did
    not count its 429s or the earlier output holds none."""
    merged = dict(record)
    key = PREFIX + "rate_limited"
    if key not in merged:
        return merged
    try:
        earlier = json.loads(read_provenance(output).get("rate_limited") or "null")
        now = json.loads(merged[key])
        counts: dict[int, int] = {}
        for start, n in [*earlier["counts"], *now["counts"]]:
            counts[int(start)] = counts.get(int(start), 0) + int(n)
        width = max(int(earlier["bin_s"]), int(now["bin_s"]), 1)
    except (ValueError, TypeError, KeyError, LookupError):
        return merged  # no earlier record (a JSONL output, none yet, another version's)
    except BatcherError:
        return merged  # an earlier output that cannot be read: its answers say so later
    merged[key] = json.dumps(rate_limited_bins(counts, width=width))
    return merged


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def read_provenance(path: Path) -> dict[str, str]:
    """The provenance stored in a Parquet output (empty for JSONL or files without it)."""
    if path.suffix.lower() != ".parquet":
        return {}
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_dir():  # the Ray engine's folder of part files: the latest run's part says
        from batcher.output.writers import parquet_parts

        parts = parquet_parts(path)
        if not parts:
            return {}
        path = parts[-1]
    try:
        # the file's own key-value metadata: the schema's, and what was added at its end
        metadata = pq.read_metadata(path).metadata or {}
    except (OSError, pa.ArrowException) as exc:
        from batcher.errors import InputError

        raise InputError(f"cannot read {path}: {exc}") from None
    return {
        key.decode()[len(PREFIX) :]: value.decode("utf-8", "replace")
        for key, value in metadata.items()
        if key.startswith(PREFIX.encode())
    }
