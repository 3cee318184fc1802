"""Requests cut into batch input files: one model per chunk, at most ``max_requests`` lines and
``max_bytes`` bytes each, in input order.

A chunk's key is a hash of the job's name, the model, the round (0 for the first submission,
then 1, 2... for requests submitted again) and its requests' keys, so planning the same
requests again gives the same chunks with the same keys: a rerun finds its chunks in the
state journal, and its batches by their metadata. Plan over the whole input, not over what is
left, or the chunks (and keys) change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batcher import jsonfast
from batcher.records import Request

#: The metadata names a batch carries to say which job and chunk it holds.
JOB_FIELD = "batcher_job"
CHUNK_FIELD = "batcher_chunk"
#: The URL of each line: batcher's batches are chat completions.
LINE_URL = "/v1/chat/completions"
#: Body fields a batch cannot honour (answers come in a file, not a stream).
_NOT_SENT = ("stream", "stream_options")
#: OpenAI's bound on a metadata value.
_MAX_VALUE = 512


@dataclass(frozen=True, slots=True)
class Chunk:
    """Requests of one model that go in one batch."""

    key: str
    model: str
    round: int
    requests: tuple[Request, ...]
    lines: tuple[bytes, ...]

    @property
    def size(self) -> int:
        """The input file's size in bytes."""
        return sum(len(line) for line in self.lines)

    def metadata(self, job: str) -> dict[str, str]:
        """What the batch carries to be found again: the job's name and the chunk's key."""
        return {JOB_FIELD: job[:_MAX_VALUE], CHUNK_FIELD: self.key}

    def by_custom_id(self) -> dict[str, Request]:
        """The chunk's requests by the ``custom_id`` their lines carry."""
        return {line_id(request): request for request in self.requests}

    def write(self, path: Path) -> Path:
        """Write the input file (JSONL) to ``path``."""
        with path.open("wb") as f:
            f.writelines(self.lines)
        return path


@dataclass(frozen=True, slots=True)
class Plan:
    """The chunks, and the requests that fit no chunk, with why."""

    chunks: tuple[Chunk, ...]
    refused: tuple[tuple[Request, str], ...]


def line_id(request: Request) -> str:
    """The ``custom_id`` of a request's line: its journal key (its id, with the variant's name
    after a NUL in a job with variants), unique within the job."""
    return request.key


def batch_line(request: Request) -> bytes:
    """A request as a Batch API input line (with its newline)."""
    body: dict[str, Any] = request.body
    if any(name in body for name in _NOT_SENT):
        body = {k: v for k, v in body.items() if k not in _NOT_SENT}
    line = {"custom_id": line_id(request), "method": "POST", "url": LINE_URL, "body": body}
    return jsonfast.dumps(line) + b"\n"


def plan_chunks(
    requests: Iterable[Request],
    *,
    job: str,
    max_requests: int,
    max_bytes: int,
    round: int = 0,
) -> Plan:
    """Group ``requests`` by model (models in order of first appearance) and cut each group
    into chunks within the limits. A request without a model, or whose line alone is over
    ``max_bytes``, is refused."""
    if max_requests < 1 or max_bytes < 1:
        raise ValueError("max_requests and max_bytes must be at least 1")
    by_model: dict[str, list[tuple[Request, bytes]]] = {}
    refused: list[tuple[Request, str]] = []
    for request in requests:
        model = request.body.get("model")
        if not isinstance(model, str) or not model:
            refused.append((request, "no model: a batch input file names one model"))
            continue
        line = batch_line(request)
        if len(line) > max_bytes:
            reason = f"its batch line is {len(line):,} bytes, over max_bytes ({max_bytes:,})"
            refused.append((request, reason))
            continue
        by_model.setdefault(model, []).append((request, line))
    chunks = [
        _chunk(job, model, round, group)
        for model, items in by_model.items()
        for group in _cut(items, max_requests, max_bytes)
    ]
    return Plan(tuple(chunks), tuple(refused))


def _cut(
    items: list[tuple[Request, bytes]], max_requests: int, max_bytes: int
) -> Iterator[list[tuple[Request, bytes]]]:
    group: list[tuple[Request, bytes]] = []
    size = 0
    for item in items:
        if group and (len(group) >= max_requests or size + len(item[1]) > max_bytes):
            yield group
            group, size = [], 0
        group.append(item)
        size += len(item[1])
    if group:
        yield group


def _chunk(job: str, model: str, round: int, group: list[tuple[Request, bytes]]) -> Chunk:
    requests = tuple(request for request, _ in group)
    return Chunk(
        key=chunk_key(job, model, round, [line_id(request) for request in requests]),
        model=model,
        round=round,
        requests=requests,
        lines=tuple(line for _, line in group),
    )


def chunk_key(job: str, model: str, round: int, ids: Iterable[str]) -> str:
    """A chunk's key: 24 hex digits of a hash of what identifies it. Every part is written
    with its length first, so no two different chunks spell the same text."""
    digest = hashlib.blake2b(digest_size=12)
    for part in (job, model, str(round), *ids):
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()
