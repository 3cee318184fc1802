"""batcher.jsonfast: orjson where it gives the same answer as the standard library, else the
standard library: property tests over random JSON values and random text."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher import jsonfast

# JSON values, with big integers, awkward floats, lone surrogates and duplicate-looking keys
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def same(a: Any, b: Any) -> bool:
    """Equal, with types (1 is not 1.0, True is not 1) and -0.0 told from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.mark.slow
@settings(max_examples=300)
@given(values)
def test_dumps_reads_back_exactly(value: Any) -> None:
    assert same(json.loads(jsonfast.dumps(value)), value)
    assert same(json.loads(jsonfast.dumps_text(value)), value)


@pytest.mark.slow
@settings(max_examples=300)
@given(values)
def test_loads_exact_equals_the_standard_library_on_json(value: Any) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False, indent=1)):
        assert same(jsonfast.loads_exact(text), json.loads(text))
        assert same(jsonfast.loads_exact(text.encode("utf-8", "surrogatepass")), json.loads(text))


@settings(max_examples=300)
@given(st.text(alphabet='{}[]":,0123456789.eE-+ \\untrlfaNIy\ud800\x00') | st.text())
def test_loads_exact_fails_or_succeeds_like_the_standard_library(text: str) -> None:
    try:
        expected: Any = json.loads(text)
    except (ValueError, RecursionError) as exc:
        expected = type(exc)
    try:
        got: Any = jsonfast.loads_exact(text)
    except (ValueError, RecursionError) as exc:
        got = type(exc)
    if isinstance(expected, type):
        assert got is expected
    else:
        assert same(got, expected) or (
            isinstance(expected, float) and math.isnan(expected) and math.isnan(got)
        )


def test_duplicate_keys_and_constants() -> None:
    assert jsonfast.loads_exact('{"a": 1, "a": 2}') == {"a": 2}
    assert jsonfast.loads_exact('{"n": 12345678901234567890123}') == {"n": 12345678901234567890123}
    assert math.isinf(jsonfast.loads_exact("1e400"))
    assert jsonfast.loads_exact('"\\ud800"') == "\ud800"


@pytest.mark.parametrize("digits", [18, 19, 20, 40])
def test_long_integers_read_exactly_from_bytes_and_text(digits: int) -> None:
    # orjson reads integers beyond 64 bits as floats; these must come back exact either way.
    n = int("9" * digits)
    for data in (f'{{"n": {n}, "m": [-{n}]}}', f'{{"n": {n}, "m": [-{n}]}}'.encode()):
        got = jsonfast.loads_exact(data)
        assert got == {"n": n, "m": [-n]}
        assert type(got["n"]) is int


def test_orjson_writes_exactly_its_known_depth() -> None:
    """``too_deep`` relies on orjson refusing a value one level deeper than this."""
    value: object = 0
    for _ in range(jsonfast.ORJSON_MAX_DEPTH):
        value = [value]
    assert orjson.dumps(value)
    with pytest.raises(TypeError):
        orjson.dumps([value])
    assert jsonfast.MAX_DEPTH + 3 <= jsonfast.ORJSON_MAX_DEPTH  # room for a record's wrapping


@pytest.mark.parametrize("depth", [1, 2, 199, 200, 201, 300])
@pytest.mark.parametrize("big", [False, True])  # orjson refuses integers past 64 bits
def test_too_deep_exactly_past_the_limit(depth: int, big: bool) -> None:
    value: object = {"a": "[{" * 300}
    for i in range(depth - 1):
        value = [value] if i % 2 else {"k": value, "n": 2**70 if big else 1}
    text = json.dumps(value)
    assert jsonfast.too_deep(value, text) is (depth > jsonfast.MAX_DEPTH)
    assert jsonfast.too_deep(value, text.encode()) is (depth > jsonfast.MAX_DEPTH)
