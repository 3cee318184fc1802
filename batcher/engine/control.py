"""What every part of the engine shares about a run: its statistics, its progress display,
and whether it is stopping (and why).

The first stop's reason is the run's; later stops only cancel what they must. Dispatch stops
at once; requests in flight may finish unless the stop is ``at_once`` or its grace runs out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import anyio

from batcher.config import RetryConfig, ValidateConfig
from batcher.records import Reject, Result
from batcher.runner.progress import Progress
from batcher.runner.stats import RunStats


class ResultSink(Protocol):
    """Where finished requests go (the journal, or the journal and a live output)."""

    def append(self, result: Result, body_hash: str, *, provisional: bool = False) -> None: ...


class RejectSink(Protocol):
    """Where input lines that are not requests go."""

    def write(self, reject: Reject) -> None: ...


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """How the engine sends: retries, workers, the grace of a stop, the answer check.

    ``concurrency``: workers for a run of one lane (``None``: as many as the endpoints allow in
    flight together). ``validate``: the ``response_format`` check (``None``: no check).
    ``encoding``: the job's token encoding, for prompts counted by the engine.
    """

    retry: RetryConfig
    concurrency: int | None = None
    grace_s: float = 10.0
    validate: ValidateConfig | None = None
    encoding: str | None = None


@dataclass(frozen=True, kw_only=True)
class Sinks:
    """Where a run's outcomes go: records, rejected lines, counts, and what the user sees."""

    results: ResultSink
    rejects: RejectSink
    stats: RunStats
    progress: Progress


class RunControl:
    """Whether the run is stopping, and the scopes a stop cancels."""

    def __init__(self, stats: RunStats, progress: Progress) -> None:
        self.stats = stats
        self.progress = progress
        #: Set by the first stop: the parts check it (``is_set()``) before each new step.
        self.stopping = anyio.Event()
        #: Around the workers: cancelled by a stop ``at_once``, given a deadline by ``stop_within``.
        self.work_scope = anyio.CancelScope()
        self._read_scopes: list[anyio.CancelScope] = []

    def stop(self, reason: str, *, at_once: bool = False, quiet: bool = False) -> None:
        """Stop dispatching; requests in flight may finish (cancelled now if ``at_once``).

        Only the first reason counts; a second stop never cuts off answers in flight (only a
        second Ctrl+C does). ``quiet``: no note (the caller tells).
        """
        if at_once:
            self.work_scope.cancel()
        for scope in self._read_scopes:  # a reader may wait on a slow pipe: nothing more to read
            scope.cancel()
        if self.stopping.is_set():
            return
        self.stats.stopped_early = True
        self.stats.stop_reason = reason
        self.stopping.set()
        if quiet:
            return
        if at_once:
            self.progress.note(f"batcher: {reason}: stopping")
            return
        self.progress.note(f"batcher: {reason}: no new requests; letting those in flight finish")

    def stop_within(self, reason: str, grace_s: float) -> None:
        """Stop as ``stop`` does, and cut off the requests still in flight after ``grace_s``."""
        self.stop(reason)
        self.work_scope.deadline = min(self.work_scope.deadline, anyio.current_time() + grace_s)

    def read_scope(self) -> anyio.CancelScope:
        """A scope for a reader to run in: a stop cancels it (it may wait on a slow pipe)."""
        scope = anyio.CancelScope()
        self._read_scopes.append(scope)
        if self.stopping.is_set():
            scope.cancel()
        return scope

    def give_up_on(self, names: str, patience_s: float, error: str | None) -> None:
        """Some endpoints (one variant's) are past their patience while others work: the run
        finishes the rest and ends as stopped early, so a re-run sends what they could not."""
        if self.stats.stop_reason is None:
            self.progress.note(
                f"batcher: endpoint {names} unreachable for {patience_s:g} s ({error}); "
                "its requests are left for a re-run"
            )
        self.stats.stopped_early = True
        self.stats.stop_reason = self.stats.stop_reason or (
            f"endpoint {names} was unreachable for {patience_s:g} s; run the same command again"
        )
