"""Run statistics: each worker counts its own result as it journals it (synchronously, on the
event loop's thread); shown by the progress bar and the summary."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batcher.records import Result

if TYPE_CHECKING:
    from collections.abc import Sequence

    from batcher.cost.budget import Budget
    from batcher.cost.pricing import Pricer
    from batcher.engine.endpoints import Endpoint
    from batcher.input.reader import Reader


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
    unpriced: int = 0  # ok answers with no cost: a model with no known price, or no usage
    usage_missing: int = 0  # ok answers the server sent no token counts for
    few_choices: int = 0  # ok answers with fewer choices than the request's n asked for
    schema_valid: int = 0
    schema_invalid: int = 0
    reasks: int = 0  # follow-up requests sent after an invalid structured answer
    rate_limited: int = 0  # 429 answers, of which ``overloaded`` from a busy server (no limit)
    rate_limited_at: Counter[int] = field(default_factory=Counter)  # 429s by Unix second
    overloaded: int = 0
    wall_s: float = 0.0
    output_ok: int | None = None
    output_error: int | None = None
    stopped_early: bool = False
    stop_reason: str | None = None
    #: Set when the run stopped because the endpoint showed the job cannot work (its host
    #: does not resolve, every answer a 404): the reason, and the endpoint's name.
    config_error: str | None = None
    config_error_endpoint: str | None = None
    config_error_field: str | None = None  # the job field to name, when not a base URL

    @property
    def cost_usd(self) -> float | None:
        """What the priced answers cost; ``None`` when answers came and none had a cost (no
        price, or no usage): unknown, not $0. With ``unpriced`` answers it is a lower bound."""
        if self.unpriced and not self.cost_by_model:
            return None
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
        elif result.status == "ok":
            self.unpriced += 1
        if usage is not None:
            self.prompt_tokens += usage.prompt_tokens or 0
            self.completion_tokens += usage.completion_tokens or 0
            self.total_tokens += usage.total_tokens or 0
        if result.status == "ok":
            if usage is None or usage.prompt_tokens is usage.completion_tokens is None:
                self.usage_missing += 1
            if result.choices_asked and _choices(result.body) < result.choices_asked:
                self.few_choices += 1

    @property
    def tokens_known(self) -> bool:
        """False when answers came and none had usage: the token counts are unknown."""
        return not (self.ok and self.usage_missing >= self.ok)

    @property
    def exit_code(self) -> int:
        """0 all ok; 1 finished with failures or rejects; 2 stopped on a configuration error;
        3 stopped early (resumable).

        Failures count from the final output when it is known (a resumed run that skipped
        earlier errors still finished with them), else from this run.
        """
        if self.config_error is not None:
            return 2
        if self.stopped_early:
            return 2 if self.config_error else 3
        errors = self.error if self.output_error is None else self.output_error
        if errors or self.rejected:
            return 1
        return 0


def _choices(body: Any) -> int:
    """How many choices an answer has (0 for an odd body)."""
    choices = body.get("choices") if isinstance(body, dict) else None
    return len(choices) if isinstance(choices, list) else 0


def count_the_run(
    stats: RunStats, readers: Sequence[Reader], endpoints: Sequence[Endpoint], budget: Budget | None
) -> None:
    """What a local run's parts counted, into its stats; a budget stopped before anything was
    sent is the job's configuration error."""
    stats.lines_read = readers[0].lines_read
    stats.rate_limited = sum(e.limits.rate_limited for e in endpoints)
    stats.overloaded = sum(e.limits.overloaded for e in endpoints)
    for e in endpoints:
        stats.rate_limited_at.update(e.limits.rate_limited_at)
    if budget is not None and budget.misconfigured and not stats.submitted:
        # stopped by the job's configuration (a model with no price) before sending anything
        reason = stats.stop_reason or "no price known for a model of the job"
        stats.config_error = reason.removeprefix("--max-cost: ")
        stats.config_error_field = "--max-cost"


def run_ending(stats: RunStats, *, started_at: float, counts_429s: bool = True) -> dict[str, str]:
    """How a run ended, for its output's metadata (``provenance.run_record``): its state, exit
    code, start (``started_at``, Unix seconds) and end (now), and the 429s it met (unless the
    run does not count them by time: ``counts_429s=False``)."""
    from batcher.output.provenance import run_record

    state = "finished"
    if stats.stopped_early:
        state = f"stopped early: {stats.stop_reason or 'stopped'}"
    return run_record(
        state=state,
        exit_code=stats.exit_code,
        started_at=started_at,
        ended_at=time.time(),
        rate_limited_at=stats.rate_limited_at if counts_429s else None,
    )


def run_warnings(stats: RunStats, pricer: Pricer, *, streamed: bool) -> list[str]:
    """The warnings at the end of a local run: models without a price, then what the answers
    lacked (``answer_warnings``)."""
    unpriced = [
        f"batcher: warning: no price known for model {model!r}: its cost is left empty; "
        f'set [pricing."{model}"] input/output (USD per million tokens) in the job'
        for model in pricer.unknown_models
    ]
    return unpriced + answer_warnings(stats, streamed=streamed)


def answer_warnings(stats: RunStats, *, streamed: bool) -> list[str]:
    """Warnings about what the answers lacked, once each at the end of a run: usage (so
    tokens and cost are unknown for them) and choices (fewer than ``n`` asked for)."""
    found = []
    if stats.usage_missing:
        hint = (
            " (a server that ignores stream_options.include_usage does this: run without "
            "stream, or give the server a newer version)"
            if streamed
            else ""
        )
        found.append(
            f"batcher: warning: the server sent no usage for {stats.usage_missing:,} of "
            f"{stats.ok:,} answers: their tokens and cost are unknown, not 0{hint}"
        )
    if stats.few_choices:
        found.append(
            f"batcher: warning: {stats.few_choices:,} answers had fewer choices than their n "
            "asked for (the server may not support n > 1: send one request per choice instead)"
        )
    return found
