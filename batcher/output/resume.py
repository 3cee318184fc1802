"""What a re-run does with each request, given the journal of earlier runs.

A request is known by its id, and in a job with variants by its id and variant; its body hash
is taken after the variant's overrides, so changing one variant re-sends that variant only.

- not in the journal: **new**, sent;
- in the journal with the same body hash and status ``ok``: **skipped** (never paid twice);
- in the journal as an ``error``: skipped, unless ``--retry-errors`` asks to re-send all errors
  (``all``) or only those that may clear by themselves (``retryable``: 408, 409, 429, 5xx,
  timeouts, connection errors, malformed answers);
- in the journal with a different body hash (the line changed): **re-sent**, and its new record
  replaces the old one in the output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from batcher.http.answers import is_retryable_failure
from batcher.output.journal import Entry

RetryErrors = Literal["none", "all", "retryable"]
Decision = Literal["new", "skip", "resend"]


@dataclass(kw_only=True)
class ResumeCounts:
    """How the lines of a re-run were treated."""

    new: int = 0
    skipped: int = 0
    resent: int = 0


class ResumePlan:
    """Decides, per request id and body hash, whether to send it again."""

    def __init__(self, entries: Mapping[str, Entry], *, retry_errors: RetryErrors = "none") -> None:
        self._entries = entries
        self._retry_errors = retry_errors
        self.counts = ResumeCounts()

    def known(self, key: str) -> bool:
        """Whether an earlier run recorded this request (``Request.key``: id and variant)."""
        return key in self._entries

    def decide(self, key: str, body_hash: str) -> Decision:
        """What to do with the request known by ``key`` (``Request.key``) and ``body_hash``."""
        entry = self._entries.get(key)
        decision: Decision
        if entry is None:
            decision = "new"
        elif entry.hash != body_hash:
            decision = "resend"
        elif entry.status == "ok" or self._retry_errors == "none":
            decision = "skip"
        elif self._retry_errors == "all" or is_retryable_failure(
            entry.status_code, entry.error_code
        ):
            decision = "resend"
        else:
            decision = "skip"
        if decision == "new":
            self.counts.new += 1
        elif decision == "skip":
            self.counts.skipped += 1
        else:
            self.counts.resent += 1
        return decision
