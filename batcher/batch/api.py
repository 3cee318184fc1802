"""The Batch API's objects as batcher reads them: a batch, its request counts, its errors.

Plain frozen dataclasses parsed leniently from the server's JSON (a provider that leaves a field
out gets ``None`` or zero), so the rest of batch mode never touches raw dictionaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The statuses a batch ends in: nothing more will change.
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True, slots=True)
class RequestCounts:
    """How many requests a batch holds, answered, and failed (as the server counts them)."""

    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class BatchError:
    """Why a batch failed validation: a line of its input file (0 when not a line's fault)."""

    code: str
    message: str
    line: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch:
    """A batch as the server last showed it."""

    id: str
    status: str
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: float = 0.0
    ended_at: float | None = None
    request_counts: RequestCounts = RequestCounts()
    metadata: dict[str, str] | None = None
    errors: tuple[BatchError, ...] = ()

    @property
    def ended(self) -> bool:
        """Whether the batch has reached a status it never leaves."""
        return self.status in ENDED

    @classmethod
    def from_json(cls, data: Any) -> Batch:
        """Parse a ``batch`` object; raises ``ValueError`` when it has no id or status."""
        if not isinstance(data, dict):
            raise ValueError("a batch is not a JSON object")
        batch_id, status = data.get("id"), data.get("status")
        if not isinstance(batch_id, str) or not isinstance(status, str):
            raise ValueError("a batch without an id or a status")
        counts = data.get("request_counts")
        metadata = data.get("metadata")
        return cls(
            id=batch_id,
            status=status,
            input_file_id=_str(data.get("input_file_id")),
            output_file_id=_str(data.get("output_file_id")),
            error_file_id=_str(data.get("error_file_id")),
            created_at=_num(data.get("created_at")),
            ended_at=next((_num(data[k]) for k in _ENDED_AT if _num(data.get(k))), None),
            request_counts=RequestCounts(
                total=int(_num(counts.get("total"))),
                completed=int(_num(counts.get("completed"))),
                failed=int(_num(counts.get("failed"))),
            )
            if isinstance(counts, dict)
            else RequestCounts(),
            metadata={str(k): str(v) for k, v in metadata.items()}
            if isinstance(metadata, dict)
            else None,
            errors=_errors(data.get("errors")),
        )


_ENDED_AT = ("completed_at", "failed_at", "expired_at", "cancelled_at")


def _errors(value: Any) -> tuple[BatchError, ...]:
    items = value.get("data") if isinstance(value, dict) else None
    if not isinstance(items, list):
        return ()
    return tuple(
        BatchError(
            code=str(item.get("code") or "error"),
            message=str(item.get("message") or ""),
            line=item["line"] if isinstance(item.get("line"), int) else None,
        )
        for item in items
        if isinstance(item, dict)
    )


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _num(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else 0.0
