"""From attempts to records (``batcher.engine.outcomes``): a request's ``Result``, the record of
a request asked twice, and the answers that stop a run."""

from __future__ import annotations

import time
from typing import Any

import pytest

from batcher.cost.tokens import count_message_tokens
from batcher.engine.outcomes import (
    UNREACHABLE,
    answering_model,
    choices_asked,
    combined,
    cut_off,
    not_asked_again,
    reask_request,
    result_of,
    stop_reason,
    stops_the_run,
)
from batcher.engine.validation import Verdict
from batcher.http.answers import Attempt
from batcher.records import Request, Result, Usage

MESSAGES = [{"role": "user", "content": "A city as JSON"}]


def request(**body: Any) -> Request:
    return Request(custom_id="c", line=7, body={"model": "gpt-4o", "messages": MESSAGES, **body},
                   metadata={"k": 1}, prompt_tokens=10, completion_budget=50,
                   variant="v")  # fmt: skip


def record(status: str = "ok", **fields: Any) -> Result:
    base: dict[str, Any] = dict(custom_id="c", line=7, status=status, model="m", attempts=1,
                                latency_s=0.1, started_at=100.0, finished_at=101.0)  # fmt: skip
    return Result(**(base | fields))


def test_a_result_carries_the_request_and_its_last_attempt() -> None:
    last = Attempt(ok=True, retryable=False, latency_s=0.25, status_code=200, body={"x": 1},
                   usage=Usage(total_tokens=3), request_id="req", ttft_s=0.1)  # fmt: skip
    before = time.time()
    r = result_of(request(n=3), last, 2, 99.0, "main", model="gpt-4o-2024", cost=0.5)
    assert before <= r.finished_at <= time.time()
    assert (r.custom_id, r.line, r.status, r.model, r.attempts, r.started_at) == (
        "c", 7, "ok", "gpt-4o-2024", 2, 99.0)  # fmt: skip
    assert (r.latency_s, r.status_code, r.body, r.request_id, r.ttft_s) == (
        0.25, 200, {"x": 1}, "req", 0.1)  # fmt: skip
    assert (r.usage, r.cost_usd, r.endpoint, r.variant, r.metadata, r.choices_asked) == (
        Usage(total_tokens=3), 0.5, "main", "v", {"k": 1}, 3)  # fmt: skip
    failed = result_of(request(), UNREACHABLE, 1, 99.0, None, model=None, cost=None)
    assert failed.status == "error" and failed.error_code == "connection_error"
    assert failed.choices_asked is None


@pytest.mark.parametrize(
    ("n", "asked"), [(None, None), (1, None), (2, 2), (True, None), ("3", None), (0, None)]
)
def test_choices_asked_only_for_more_than_one(n: object, asked: int | None) -> None:
    assert choices_asked({} if n is None else {"n": n}) == asked


def test_the_answering_model_is_the_answer_s_when_it_names_one() -> None:
    def attempt(ok: bool, body: object) -> Attempt:
        return Attempt(ok=ok, retryable=False, latency_s=0.1, body=body)

    asked = request()
    assert answering_model(asked, attempt(True, {"model": "gpt-4o-2024-08-06"})) == (
        "gpt-4o-2024-08-06")  # fmt: skip
    assert answering_model(asked, attempt(False, {"model": "other"})) == "gpt-4o"
    assert answering_model(asked, attempt(True, {"model": 7})) == "gpt-4o"
    assert answering_model(asked, attempt(True, "text")) == "gpt-4o"
    unnamed = Request(custom_id="c", line=1, body={"model": ["x"]})
    assert answering_model(unnamed, attempt(True, None)) is None


def test_a_request_asked_twice_is_one_record_with_both_costs() -> None:
    first = record(
        "error",
        attempts=2,
        usage=Usage(prompt_tokens=10, completion_tokens=5),
        cost_usd=0.25,
        schema_valid=False,
        started_at=100.0,
        finished_at=101.0,
    )
    second = record(
        attempts=1,
        usage=Usage(prompt_tokens=20, completion_tokens=6),
        cost_usd=0.5,
        schema_valid=True,
        started_at=102.0,
        finished_at=103.0,
    )
    both = combined(first, second)  # fmt: skip
    assert both.status == "ok" and both.schema_valid  # the later ok answer is kept
    assert (both.attempts, both.cost_usd, both.started_at, both.finished_at) == (3, 0.75, 100, 103)
    assert both.usage == Usage(prompt_tokens=30, completion_tokens=11)
    still_bad = combined(
        record(schema_valid=False, cost_usd=None),
        record("error", error_code="timeout", cost_usd=None, usage=None),
    )
    assert still_bad.status == "ok" and still_bad.schema_valid is False  # the earlier answer
    assert still_bad.cost_usd is None and still_bad.usage is None  # fmt: skip


def test_a_re_ask_grows_the_prompt_by_the_two_turns_it_adds() -> None:
    verdict = Verdict(False, "rank: 'x' is not of type 'integer'")
    answer = {"choices": [{"message": {"content": '{"rank": "x"}'}}]}
    again = reask_request(request(), answer, verdict)
    added = again.body["messages"][len(MESSAGES) :]
    assert [m["role"] for m in added] == ["assistant", "user"]
    assert added[0]["content"] == '{"rank": "x"}' and "not of type" in added[1]["content"]
    assert again.prompt_tokens == 10 + count_message_tokens(added, "o200k_base")
    assert (again.custom_id, again.variant, again.completion_budget) == ("c", "v", 50)
    uncounted = Request(custom_id="c", line=1, body={"model": "m", "messages": MESSAGES})
    assert reask_request(uncounted, answer, verdict).prompt_tokens is None
    stopped = not_asked_again(verdict)
    assert not stopped.reask and stopped.error is not None
    assert stopped.error.endswith("not asked again: the run stopped")


@pytest.mark.parametrize(
    ("fields", "cut"),
    [
        ({"status_code": 503}, True),
        ({"error_code": "connection_error"}, True),
        ({"status_code": 429}, True),
        ({"status_code": 400}, False),  # the request's own error: a re-run would repeat it
        ({"status_code": 503, "usage": Usage(prompt_tokens=1)}, False),  # something billed
        ({"status_code": 503, "cost_usd": 0.01}, False),
        ({"error_code": "insufficient_quota", "status_code": 429}, False),
    ],
)
def test_cut_off_only_what_a_retry_may_have_cleared(fields: dict[str, Any], cut: bool) -> None:
    assert cut_off(record("error", **fields)) is cut
    assert not cut_off(record("ok", **fields))


def test_a_refused_key_or_an_empty_quota_stops_the_run_and_says_what_to_do() -> None:
    refused = record("error", status_code=401, error_code="invalid_api_key", error_message="no")
    quota = record("error", status_code=429, error_code="insufficient_quota", error_message="q")
    assert stops_the_run(refused) and stops_the_run(quota)
    assert stops_the_run(record("error", status_code=403))
    assert not stops_the_run(record("error", status_code=429, error_code="rate_limit_exceeded"))
    assert stop_reason(refused).startswith("the endpoint refused the API key (401 invalid_api")
    assert stop_reason(quota).startswith("the account has no quota left (429 insufficient_q")
    assert "add credits" in stop_reason(quota)
