"""Usage that cannot be true (``batcher.engine.usage_check``): named, and dropped from the
attempt so it never lowers or wrecks the spend."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.engine.usage_check import (
    MAX_USAGE_TOKENS,
    USAGE_INVALID,
    checked,
    usage_problem,
)
from batcher.http.answers import Attempt
from batcher.records import Request, Usage


def request(**body: Any) -> Request:
    full = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return Request(custom_id="a", line=1, body=full, prompt_tokens=5, completion_budget=100)


@pytest.mark.parametrize(
    ("usage", "problem"),
    [
        ({"prompt_tokens": -10**9}, "usage.prompt_tokens is negative: -1000000000"),
        ({"completion_tokens": 1.5}, "usage.completion_tokens is not a whole number: 1.5"),
        ({"total_tokens": True}, "usage.total_tokens is not a whole number: True"),
        ({"prompt_tokens": "12"}, "usage.prompt_tokens is not a whole number: '12'"),
        ({"prompt_tokens_details": {"cached_tokens": -1}},
         "usage.prompt_tokens_details.cached_tokens is negative: -1"),
        ({"completion_tokens_details": {"reasoning_tokens": MAX_USAGE_TOKENS + 1}},
         "usage.completion_tokens_details.reasoning_tokens is absurd: 100,000,001"),
    ],
)  # fmt: skip
def test_counts_that_are_not_counts_are_named(usage: dict[str, Any], problem: str) -> None:
    assert usage_problem(request(), usage) == problem


def test_plausible_usage_passes() -> None:
    assert usage_problem(request(), None) is None
    assert usage_problem(request(), "not an object") is None
    assert usage_problem(request(), {}) is None
    fine = {
        "prompt_tokens": 5,
        "completion_tokens": 100,
        "total_tokens": 105,
        "prompt_tokens_details": None,
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert usage_problem(request(max_tokens=100), fine) is None  # fmt: skip


def test_more_than_ten_times_the_request_is_absurd_only_with_a_completion_limit() -> None:
    huge = {"prompt_tokens": 5, "completion_tokens": 50_000}
    problem = usage_problem(request(max_tokens=100), huge)
    assert problem is not None and problem.startswith("usage is absurd: 50,005 tokens billed")
    assert usage_problem(request(max_completion_tokens=100), huge) is not None
    assert usage_problem(request(), huge) is None  # no limit set: any length may be true
    # a prompt with images or tools may be billed far more than its text: within the bound
    big = request(max_tokens=100, tools=[{"type": "function", "function": {"x": "y" * 6000}}])
    assert usage_problem(big, {"prompt_tokens": 5_000, "completion_tokens": 100}) is None


@given(st.integers(0, MAX_USAGE_TOKENS), st.integers(0, MAX_USAGE_TOKENS))
def test_any_whole_counts_within_range_pass_without_a_limit(prompt: int, completion: int) -> None:
    assert (
        usage_problem(request(), {"prompt_tokens": prompt, "completion_tokens": completion}) is None
    )


def attempt(usage: dict[str, Any], *, ok: bool = True) -> Attempt:
    body = {"choices": [], "usage": usage}
    return Attempt(ok=ok, retryable=False, latency_s=0.1, status_code=200 if ok else 500,
                   body=body, usage=Usage.from_body(body))  # fmt: skip


def test_an_invalid_usage_is_dropped_and_said() -> None:
    bad = attempt({"prompt_tokens": -5, "completion_tokens": 3})
    kept = checked(request(), bad)
    assert kept.usage is None and kept.ok and kept.body == bad.body  # the answer stays
    assert kept.error_message is not None
    assert kept.error_message.startswith(f"{USAGE_INVALID}: usage.prompt_tokens is negative")


def test_a_good_usage_or_a_failed_attempt_is_left_alone() -> None:
    good = attempt({"prompt_tokens": 5, "completion_tokens": 3})
    assert checked(request(), good) is good
    failed = attempt({"prompt_tokens": -5}, ok=False)
    assert checked(request(), failed) is failed
