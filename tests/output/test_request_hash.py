"""request_hash: orjson where it writes the standard library's canonical JSON, else the
standard library, so every body keeps the hash earlier versions journaled (a resumed run
re-sends nothing that did not change)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from batcher.output import body_hash
from batcher.output.body_hash import request_hash


def reference_hash(body: Mapping[str, Any]) -> str:
    """The hash as every earlier version made it: the standard library alone."""
    if any(key in body for key in ("stream", "stream_options")):
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(
        canonical.encode("utf-8", "backslashreplace"), digest_size=16
    ).hexdigest()


# Any character, lone surrogates and control characters included (a "\ud800" escape in an
# input line becomes one).
texts = st.text(alphabet=st.characters(exclude_categories=()), max_size=12)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [1e16, 1e-7, 1e-5, 2.5e-5, 1e-4, 9.99e-5, 1e15, 1.5e16, 1e22, 5e-324, -0.0, 0.1 + 0.2]
)
integers = st.integers() | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1])
scalars = st.none() | st.booleans() | integers | floats | texts
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=25,
)
bodies = st.dictionaries(texts | st.sampled_from(["model", "messages", "stream"]), values)


@pytest.mark.slow
@settings(max_examples=1_000)
@given(bodies)
@example({"temperature": 1e16, "top_p": 1e-7, "seed": 2**64, "x": 10**30})
@example({"a": {"z": 1, "b": {"y": [1e-5, "é", "\x00\x1f\x7f\u2028"]}, "\U0001f600": 2}})
@example({"content": "\ud800 lone", "n": float("nan"), "m": float("inf"), "k": -math.inf})
@example({"text": "re-use 1e-7 and null as words, 0.00001 too"})
@example({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0.7})
def test_request_hash_is_the_standard_librarys(body: dict[str, Any]) -> None:
    try:
        expected = reference_hash(body)
    except (TypeError, ValueError, RecursionError) as exc:  # refused: refused alike
        with pytest.raises(type(exc)):
            request_hash(body)
        return
    assert request_hash(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "user", "content": "hello"}], "temperature": 0.7},
        {"model": "m", "max_tokens": 64, "seed": 2**63, "stop": ["\n", "é"], "top_p": 1e16},
    ],
)
def test_ordinary_bodies_take_the_fast_form(body: dict[str, Any]) -> None:
    fast = body_hash._fast_canonical(body)
    assert fast is not None
    assert (
        fast == json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )


@pytest.mark.parametrize(
    "body",
    [
        {"temperature": 1e-5},  # orjson: 0.00001, repr: 1e-05
        {"temperature": 1e-7},  # orjson: 1e-7, repr: 1e-07
        {"x": float("nan")},  # orjson: null, the standard library: NaN
        {"x": float("-inf")},
        {"x": 2**64},  # beyond 64 bits: orjson refuses
        {"x": "\udc00"},  # a lone surrogate: orjson refuses
        {"x": OrderedDict(b=1, a=2)},  # a subclass: left to the standard library
        {"x": [[[]]] * 2, "deep": json.loads("[" * 300 + "]" * 300)},
    ],
)
def test_what_orjson_could_write_otherwise_goes_to_the_standard_library(
    body: dict[str, Any],
) -> None:
    assert body_hash._fast_canonical(body) is None
    assert request_hash(body) == reference_hash(body)


def test_values_json_has_no_form_for_are_refused_as_before() -> None:
    body = {"model": "m", "when": dt.datetime(2026, 1, 2, tzinfo=dt.UTC)}
    with pytest.raises(TypeError):
        reference_hash(body)
    with pytest.raises(TypeError):
        request_hash(body)
