"""One simulated batch and where it stands at a given time.

A batch's life is a function of the clock, computed when asked, never by a background task:
``validating`` for ``validating_s``; then ``in_progress`` for ``in_progress_s``, its requests
finishing one after another at even steps; then ``finalizing`` for ``finalizing_s``; then
``completed``. A batch still in progress when its window ends is ``expired`` (what it finished
is kept; the rest is in the error file as ``batch_expired``). A cancelled one is ``cancelling``
for ``cancelling_s``, then ``cancelled`` with what it finished before the cancel.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from batcher.sim.batch_files import LineError, StoredFile

#: The statuses in which a batch still counts against the enqueued-token limit.
ACTIVE = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
#: The statuses a batch ends in.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True, slots=True)
class Durations:
    """How long each stage lasts, in seconds of the batch clock."""

    validating_s: float
    in_progress_s: float
    finalizing_s: float
    cancelling_s: float


@dataclass(kw_only=True)
class SimBatch:
    """A batch: its input file, timeline, and the planned outcome of each request (``"ok"``
    or an HTTP status such as ``"500"``), drawn when it was created."""

    id: str
    seq: int
    owner: str
    file: StoredFile
    endpoint: str
    completion_window: str
    window_s: float
    metadata: dict[str, str] | None
    created_at: float
    durations: Durations
    outcomes: list[str]
    refused: list[LineError] = field(default_factory=list)
    cancel_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    files_made: bool = False

    @property
    def errors(self) -> list[LineError]:
        """Why the batch fails validation (none: it does not)."""
        return self.refused or self.file.errors

    @property
    def validated_at(self) -> float:
        return self.created_at + (0.0 if self.refused else self.durations.validating_s)

    @property
    def processed_at(self) -> float:
        return self.validated_at + self.durations.in_progress_s

    @property
    def expires_at(self) -> float:
        return self.created_at + self.window_s

    def expires(self) -> bool:
        """Whether the window ends before every request is processed."""
        return self.processed_at > self.expires_at

    def status(self, now: float) -> str:
        """The status at ``now``."""
        if self.cancel_at is not None:
            cancelled = now >= self.cancel_at + self.durations.cancelling_s
            return "cancelled" if cancelled else "cancelling"
        if now < self.validated_at:
            return "validating"
        if self.errors:
            return "failed"
        if self.expires() and now >= self.expires_at:
            return "expired"
        if now < self.processed_at:
            return "in_progress"
        if now < self.processed_at + self.durations.finalizing_s:
            return "finalizing"
        return "completed"

    def done(self, now: float) -> int:
        """How many requests (in file order) are processed at ``now``."""
        if self.errors or now < self.validated_at:
            return 0
        cutoff = now
        if self.cancel_at is not None:
            cutoff = min(cutoff, self.cancel_at)
        if self.expires():
            cutoff = min(cutoff, self.expires_at)
        n = len(self.outcomes)
        span = self.durations.in_progress_s
        if span <= 0:
            return n if cutoff >= self.validated_at else 0
        # a tiny epsilon: request i is done at exactly validated_at + (i + 1) * span / n
        steps = math.floor((cutoff - self.validated_at) * n / span + 1e-9)
        return max(0, min(n, steps))

    def request_counts(self, now: float) -> dict[str, int]:
        """``total``/``completed``/``failed``: requests not processed by an expired or
        cancelled batch count as failed (they are in its error file)."""
        if self.errors or now < self.validated_at:
            return {"total": 0, "completed": 0, "failed": 0}
        total = len(self.outcomes)
        done = self.outcomes[: self.done(now)]
        completed = sum(1 for outcome in done if outcome == "ok")
        failed = len(done) - completed
        if self.status(now) in ("expired", "cancelled"):
            failed = total - completed
        return {"total": total, "completed": completed, "failed": failed}

    def as_dict(self, now: float) -> dict[str, Any]:
        """The ``batch`` object of the Batches API at ``now``."""
        status = self.status(now)
        stamps = self._stamps(now, status)
        errors = None
        if status == "failed":
            errors = {"object": "list", "data": [error.as_dict() for error in self.errors]}
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": errors,
            "input_file_id": self.file.id,
            "completion_window": self.completion_window,
            "status": status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            **{key: None if value is None else int(value) for key, value in stamps.items()},
            "request_counts": self.request_counts(now),
            "metadata": self.metadata,
        }

    def _stamps(self, now: float, status: str) -> dict[str, float | None]:
        def when(moment: float) -> float | None:
            return moment if now >= moment else None

        finalizing = self.processed_at
        completed = finalizing + self.durations.finalizing_s
        stamps: dict[str, float | None] = {
            "created_at": self.created_at,
            "in_progress_at": None,
            "expires_at": self.expires_at,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": self.cancel_at,
            "cancelled_at": None,
        }
        if status == "failed":
            stamps["failed_at"] = self.validated_at
            return stamps
        stop = min(x for x in (self.cancel_at, now) if x is not None)
        if stop >= self.validated_at:
            stamps["in_progress_at"] = self.validated_at
        if status == "expired":
            stamps["expired_at"] = self.expires_at
        elif status == "cancelled" and self.cancel_at is not None:
            stamps["cancelled_at"] = self.cancel_at + self.durations.cancelling_s
        elif self.cancel_at is None:
            stamps["finalizing_at"] = when(finalizing)
            stamps["completed_at"] = when(completed)
        return stamps


def over_token_limit(
    batches: Iterable[SimBatch], stored: StoredFile, now: float, limit: int
) -> list[LineError]:
    """Why a batch of ``stored`` is refused for the enqueued-token limit (OpenAI's error), or
    nothing: the limit holds the prompt tokens of the active ``batches`` of the same model."""
    enqueued = sum(
        batch.file.prompt_tokens
        for batch in batches
        if batch.file.model == stored.model and batch.status(now) in ACTIVE
    )
    if enqueued + stored.prompt_tokens <= limit:
        return []
    message = (
        f"Enqueued token limit reached for {stored.model} in organization org-sim. "
        f"Limit: {limit:,} enqueued tokens. Please try again once some in_progress batches "
        "have been completed."
    )
    return [LineError(0, "token_limit_exceeded", message)]
