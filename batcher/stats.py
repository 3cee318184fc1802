"""Run statistics: counted by the single writer task, shown by the progress bar and summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from batcher.records import Result


@dataclass(kw_only=True)
class RunStats:
    """Counts of one run, kept on the event loop's thread (no locks needed).

    ``submitted`` counts requests sent this run, of which ``resent`` had a journal record;
    ``skipped`` were done before. ``output_ok``/``output_error`` count the final output.
    """

    lines_read: int = 0
    submitted: int = 0
    skipped: int = 0
    resent: int = 0
    ok: int = 0
    error: int = 0
    rejected: int = 0
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    error_codes: Counter[str] = field(default_factory=Counter)
    by_endpoint: Counter[str] = field(default_factory=Counter)  # answers by endpoint name
    variant_ok: Counter[str] = field(default_factory=Counter)  # ok answers by variant name
    variant_error: Counter[str] = field(default_factory=Counter)
    cost_by_model: dict[str, float] = field(default_factory=dict)
    unpriced: int = 0  # answers with usage but no known price
    schema_valid: int = 0
    schema_invalid: int = 0
    reasks: int = 0  # follow-up requests sent after an invalid structured answer
    wall_s: float = 0.0
    output_ok: int | None = None
    output_error: int | None = None
    stopped_early: bool = False
    stop_reason: str | None = None
    config_error: bool = False  # stopped by the job's configuration, before sending anything

    @property
    def cost_usd(self) -> float:
        return sum(self.cost_by_model.values())

    @property
    def done(self) -> int:
        return self.ok + self.error

    @property
    def retries(self) -> int:
        """Attempts beyond the first of each request (re-asks are not retries)."""
        return self.attempts - self.done - self.reasks

    @property
    def requests_per_s(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    def add(self, result: Result) -> None:
        """Count one finished request."""
        self.attempts += result.attempts
        if result.endpoint is not None:
            self.by_endpoint[result.endpoint] += 1
        if result.status == "ok":
            self.ok += 1
        else:
            self.error += 1
            self.error_codes[result.error_code or "unknown"] += 1
        if result.variant is not None:
            (self.variant_ok if result.status == "ok" else self.variant_error)[result.variant] += 1
        if result.schema_valid is not None:
            if result.schema_valid:
                self.schema_valid += 1
            else:
                self.schema_invalid += 1
        usage = result.usage
        if result.cost_usd is not None:
            key = result.model or "?"
            self.cost_by_model[key] = self.cost_by_model.get(key, 0.0) + result.cost_usd
        elif usage is not None:
            self.unpriced += 1
        if usage is not None:
            self.prompt_tokens += usage.prompt_tokens or 0
            self.completion_tokens += usage.completion_tokens or 0
            self.total_tokens += usage.total_tokens or 0

    @property
    def exit_code(self) -> int:
        """0 all ok; 1 finished with failures or rejects; 2 stopped by the job's configuration
        before anything was sent; 3 stopped early (resumable).

        Failures count from the final output when it is known (a resumed run that skipped
        earlier errors still finished with them), else from this run.
        """
        if self.stopped_early:
            return 2 if self.config_error else 3
        errors = self.error if self.output_error is None else self.output_error
        if errors or self.rejected:
            return 1
        return 0
