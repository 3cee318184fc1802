"""Request bodies (``batcher.input.requests``): type checks of the known fields, defaults and
variants merged in, the completion budget and the prompt's upper bound."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.errors import ConfigError
from batcher.input.requests import (
    DEFAULT_COMPLETION_TOKENS,
    IMAGE_TOKENS_BOUND,
    apply_variant,
    check_request_fields,
    completion_budget,
    field_problem,
    image_tokens_bound,
    merge_defaults,
    messages_problem,
    prompt_bound,
    with_stream_usage,
)

USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"model": ""}, "model", "must be a non-empty string, got ''"),
        ({"temperature": "hot"}, "temperature", "must be a number, got 'hot'"),
        ({"temperature": math.nan}, "temperature", "must be a number, got nan"),
        ({"top_p": True}, "top_p", "must be a number, got True"),
        ({"n": 0}, "n", "must be an integer >= 1, got 0"),
        ({"max_tokens": 1.0}, "max_tokens", "must be an integer >= 1, got 1.0"),
        ({"stop": ["a", 1]}, "stop", "must be a string or a list of strings, got ['a', 1]"),
        ({"stream": "yes"}, "stream", "must be true or false, got 'yes'"),
        ({"tools": {}}, "tools", "must be a list, got {}"),
        ({"seed": 1.5}, "seed", "must be an integer, got 1.5"),
        ({"messages": []}, "messages", "must not be empty"),
        ({"stream_options": {"include_usage": True}}, "stream_options",
         "is only allowed with stream: true (the API refuses it)"),
        ({"stream": True, "stream_options": 1}, "stream_options", "must be an object, got 1"),
    ],
)  # fmt: skip
def test_a_badly_typed_field_is_named_with_what_it_must_be(
    body: dict[str, Any], field: str, reason: str
) -> None:
    assert field_problem(body) == (field, reason)
    with pytest.raises(ConfigError, match=r"must|only allowed") as info:
        check_request_fields(body, where="request")
    assert info.value.field == f"request.{field}"


def test_good_fields_none_and_unknown_ones_pass() -> None:
    body = {"model": "m", "messages": [USER], "temperature": 0, "n": 2, "stop": None,
            "max_completion_tokens": 5, "logit_bias": {"1": 2}, "tool_choice": "auto",
            "stream": True, "stream_options": {"include_usage": False},
            "a_new_api_field": object()}  # fmt: skip
    assert field_problem(body) is None
    assert field_problem({"temperature": None, "seed": None}) is None
    check_request_fields({}, where="request")


def test_a_long_value_is_shortened_in_the_reason() -> None:
    problem = field_problem({"model": ["x" * 200]})
    assert problem is not None and len(problem[1]) < 100 and problem[1].endswith("...")


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hi", "must be a list of message objects, got 'hi'"),
        ([USER, "x"], "item 1 must be an object, got 'x'"),
        ([{"content": "no role"}], "item 0 has no string 'role'"),
        ([USER], None),
    ],
)
def test_messages_problem(messages: Any, problem: str | None) -> None:
    assert messages_problem(messages) == problem


def test_a_stream_asks_for_its_usage_unless_told_not_to() -> None:
    plain = {"model": "m"}
    assert with_stream_usage(plain) is plain
    asked = with_stream_usage({"stream": True, "stream_options": {"x": 1}})
    assert asked["stream_options"] == {"x": 1, "include_usage": True}
    refused = {"stream": True, "stream_options": {"include_usage": False}}
    assert with_stream_usage(refused) is refused


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
bodies = st.dictionaries(st.text(max_size=5), json_scalars, max_size=5)


@given(bodies, bodies)
def test_a_line_s_fields_win_over_the_defaults(
    defaults: dict[str, Any], body: dict[str, Any]
) -> None:
    merged = merge_defaults(defaults, body)
    assert merged == {**defaults, **body}
    assert merged is not body  # a copy: the line is not changed


def test_a_variant_overrides_fields_and_replaces_the_system_prompt() -> None:
    system = {"role": "developer", "content": "old"}
    body: dict[str, Any] = {"model": "a", "temperature": 0, "messages": [system, USER]}
    swept = apply_variant(body, {"model": "b"}, "Be brief.")
    assert swept["model"] == "b" and swept["temperature"] == 0
    assert swept["messages"] == [{"role": "system", "content": "Be brief."}, USER]
    assert apply_variant(body, {}, "")["messages"] == [USER]  # "" removes it
    assert apply_variant({"messages": [USER]}, {}, "S")["messages"][0]["content"] == "S"
    assert apply_variant(body, {}, None)["messages"] == body["messages"]  # None keeps it
    assert body["messages"][0]["content"] == "old"  # the line's body is not changed


@pytest.mark.parametrize(
    ("body", "budget"),
    [
        ({}, DEFAULT_COMPLETION_TOKENS),
        ({"max_tokens": 100}, 100),
        ({"max_tokens": 100, "n": 3}, 300),
        ({"max_completion_tokens": 40, "max_tokens": 100}, 40),
        ({"n": 2}, 2 * DEFAULT_COMPLETION_TOKENS),
    ],
)
def test_completion_budget(body: dict[str, Any], budget: int) -> None:
    assert completion_budget(body) == budget


def test_image_bounds_by_model() -> None:
    assert image_tokens_bound("gpt-4o") == IMAGE_TOKENS_BOUND
    assert image_tokens_bound("openai/GPT-4o-mini-2024") == 48_200  # provider prefix, any case
    assert image_tokens_bound(None) == IMAGE_TOKENS_BOUND


def test_the_prompt_bound_covers_what_tiktoken_leaves_out() -> None:
    text_only = {"model": "gpt-4o", "messages": [USER]}
    assert prompt_bound(text_only, 10) == 10 + 2  # the role and a separator
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with_image = {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is it"}, image]}]}  # fmt: skip
    assert prompt_bound(with_image, 5) == 5 + 2 + 48_200
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with_tools = {**text_only, "tools": tools}
    assert prompt_bound(with_tools, 10) == 12 + len(json.dumps(tools))


message_values = st.recursive(
    json_scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.text(max_size=4), kids, max_size=3), max_leaves=6)  # fmt: skip


@given(st.lists(message_values, max_size=4), st.integers(0, 10_000))
def test_the_prompt_bound_is_never_below_the_count(messages: list[Any], counted: int) -> None:
    assert prompt_bound({"model": "m", "messages": messages}, counted) >= counted
