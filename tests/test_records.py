"""The values that flow through a run (``batcher.records``): usage read from an answer and
added up, a request's journal key and its token estimate."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.records import Request, Usage, record_key

counts = st.none() | st.integers(0, 10**9)
usages = st.builds(Usage, prompt_tokens=counts, completion_tokens=counts, total_tokens=counts,
                   cached_tokens=counts, reasoning_tokens=counts)  # fmt: skip
FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
          "reasoning_tokens")  # fmt: skip


@given(usages, usages)
def test_usage_adds_field_by_field_and_unknown_stays_unknown(a: Usage, b: Usage) -> None:
    total = a.plus(b)
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert getattr(total, name) == (None if x is None and y is None else (x or 0) + (y or 0))
    assert a.plus(None) is a
    assert total == b.plus(a)


def test_usage_from_an_answer() -> None:
    body = {"usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                      "prompt_tokens_details": {"cached_tokens": 4},
                      "completion_tokens_details": {"reasoning_tokens": 2}}}  # fmt: skip
    assert Usage.from_body(body) == Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15,
                                          cached_tokens=4, reasoning_tokens=2)  # fmt: skip


@pytest.mark.parametrize(
    ("body", "usage"),
    [
        (None, None),
        ("text", None),
        ({"choices": []}, None),
        ({"usage": "lots"}, None),
        ({"usage": {}}, Usage()),
        # what is not a whole number is not a count
        ({"usage": {"prompt_tokens": 1.5, "completion_tokens": True, "total_tokens": "3"}},
         Usage()),
        ({"usage": {"prompt_tokens_details": [4], "completion_tokens_details": None}}, Usage()),
    ],
)  # fmt: skip
def test_usage_of_odd_answers(body: Any, usage: Usage | None) -> None:
    assert Usage.from_body(body) == usage


@given(st.text(), st.none() | st.text().filter(lambda v: "\x00" not in v))
def test_a_journal_key_splits_back_at_its_last_nul(custom_id: str, variant: str | None) -> None:
    key = record_key(custom_id, variant)
    if variant is None:
        assert key == custom_id
    else:
        head, _, tail = key.rpartition("\x00")
        assert (head, tail) == (custom_id, variant)


def test_a_request_s_estimate_and_key() -> None:
    counted = Request(custom_id="a", line=1, body={}, prompt_tokens=30, completion_budget=100)
    assert counted.est_tokens == 130 and counted.key == "a"
    uncounted = Request(custom_id="a", line=1, body={}, completion_budget=100, variant="v")
    assert uncounted.est_tokens == 100 and uncounted.key == "a\x00v"
