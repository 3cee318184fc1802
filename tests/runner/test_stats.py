"""Run statistics (``batcher.runner.stats``): what each finished request adds, the exit code,
and the warnings about what the answers lacked."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.records import Result, Usage
from batcher.runner.stats import RunStats, answer_warnings


def result(status: str = "ok", **fields: Any) -> Result:
    base: dict[str, Any] = dict(
        custom_id="x", line=1, status=status, model="m", attempts=1, latency_s=0.1,
        started_at=0.0, finished_at=0.1,
        usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5) if status == "ok"
        else None,
    )  # fmt: skip
    return Result(**(base | fields))


def test_each_result_is_counted_by_status_endpoint_variant_and_schema() -> None:
    stats = RunStats()
    stats.add(result(endpoint="a", variant="v1", schema_valid=True, attempts=2))
    stats.add(result(endpoint="b", variant="v1", schema_valid=False))
    stats.add(result("error", endpoint="a", variant="v2", error_code="timeout", attempts=3))
    stats.add(result("error"))  # no code: counted as unknown
    assert (stats.ok, stats.error, stats.done, stats.attempts) == (2, 2, 4, 7)
    assert stats.error_codes == {"timeout": 1, "unknown": 1}
    assert stats.by_endpoint == {"a": 2, "b": 1}
    assert (stats.variant_ok, stats.variant_error) == ({"v1": 2}, {"v2": 1})
    assert (stats.schema_valid, stats.schema_invalid) == (1, 1)
    assert (stats.prompt_tokens, stats.completion_tokens, stats.total_tokens) == (6, 4, 10)


def test_retries_leave_out_the_re_asks() -> None:
    stats = RunStats()
    stats.add(result(attempts=4))  # three retries, or a re-ask among them
    stats.reasks = 1
    assert stats.retries == 2


def test_cost_is_unknown_not_zero_when_no_answer_was_priced() -> None:
    stats = RunStats()
    assert stats.cost_usd == 0.0  # nothing answered yet: nothing spent
    stats.add(result())  # ok, no cost: a model without a price
    assert stats.unpriced == 1 and stats.cost_usd is None
    stats.add(result(cost_usd=0.25, model="a"))
    stats.add(result(cost_usd=0.5, model="a"))
    stats.add(result("error", cost_usd=0.125, model=None))  # a billed failure counts too
    assert stats.cost_by_model == {"a": 0.75, "?": 0.125}
    assert stats.cost_usd == 0.875  # a lower bound: one answer had no price
    assert stats.unpriced == 1  # an error without a cost is not "unpriced"


@given(st.lists(st.one_of(st.none(), st.floats(0, 10)), max_size=20))
def test_the_spend_is_the_sum_of_the_priced_answers(costs: list[float | None]) -> None:
    stats = RunStats()
    for i, cost in enumerate(costs):
        stats.add(result(cost_usd=cost, model=f"m{i % 3}"))
    priced = [c for c in costs if c is not None]
    if priced or not costs:
        assert stats.cost_usd == pytest.approx(sum(priced))
    else:
        assert stats.cost_usd is None


def test_missing_usage_and_too_few_choices_are_noted() -> None:
    stats = RunStats()
    stats.add(result(usage=None))
    stats.add(result(usage=Usage(total_tokens=9)))  # neither prompt nor completion counts
    one_choice = {"choices": [{"message": {"content": "a"}}]}
    stats.add(result(body=one_choice, choices_asked=3))
    stats.add(result(body={"choices": [{}, {}, {}]}, choices_asked=3))
    stats.add(result("error", choices_asked=3))  # a failure is not an answer with few choices
    assert (stats.usage_missing, stats.few_choices) == (2, 1)
    assert stats.tokens_known  # two answers had counts
    warnings = answer_warnings(stats, streamed=False)
    assert len(warnings) == 2
    assert "no usage for 2 of 4 answers" in warnings[0] and "stream_options" not in warnings[0]
    assert "1 answers had fewer choices than their n" in warnings[1]
    streamed = answer_warnings(stats, streamed=True)[0]
    assert "stream_options.include_usage" in streamed


def test_tokens_are_unknown_when_no_answer_had_usage() -> None:
    stats = RunStats()
    assert stats.tokens_known  # no answers: nothing unknown
    stats.add(result(usage=None))
    assert not stats.tokens_known
    assert answer_warnings(RunStats(), streamed=True) == []


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({}, 0),
        ({"ok": 3}, 0),
        ({"ok": 3, "error": 1}, 1),
        ({"ok": 3, "rejected": 1}, 1),
        ({"ok": 3, "error": 1, "output_error": 0}, 0),  # the final output is what counts
        ({"ok": 3, "output_error": 2}, 1),  # a resume that skipped earlier failures
        ({"ok": 3, "stopped_early": True}, 3),
        ({"ok": 3, "stopped_early": True, "config_error": "host does not resolve"}, 2),
        ({"config_error": "404s only"}, 2),
    ],
)
def test_exit_code(fields: dict[str, Any], code: int) -> None:
    assert RunStats(**fields).exit_code == code


def test_requests_per_second() -> None:
    assert RunStats(ok=10).requests_per_s == 0.0  # no wall time yet
    assert RunStats(ok=6, error=4, wall_s=2.0).requests_per_s == 5.0
