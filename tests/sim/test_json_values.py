"""The simulator's structured answers (``batcher.sim.json_values``): a value made for a schema
matches it, and a broken one does not."""

from __future__ import annotations

from typing import Any

import jsonschema
from hypothesis import given
from hypothesis import strategies as st

from batcher.sim.json_values import broken, instance

scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4)


@st.composite
def bounded(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    low = draw(st.integers(-1000, 1000))
    schema: dict[str, Any] = {"type": kind}
    if draw(st.booleans()):
        schema["minimum"] = low
    if draw(st.booleans()):
        schema["maximum"] = low + draw(st.integers(0, 500))
    return schema


leaf_schemas = st.one_of(
    st.just({"type": "string"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.just({"type": ["string", "null"]}),
    bounded("integer"),
    bounded("number"),
    st.lists(scalars, min_size=1, max_size=4, unique_by=repr).map(lambda e: {"enum": e}),
    scalars.map(lambda c: {"const": c}),
)
leaf_or_choice = leaf_schemas | st.lists(leaf_schemas, min_size=1, max_size=3).map(
    lambda options: {"anyOf": options}
)


def objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        properties = draw(st.dictionaries(st.text(max_size=5), children, max_size=4))
        names = list(properties)
        required = draw(st.lists(st.sampled_from(names), unique=True)) if names else []
        return {"type": "object", "properties": properties, "required": required}

    return build()


def arrays(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "array", "items": draw(children)}
        low = draw(st.integers(0, 4))
        if draw(st.booleans()):
            schema["minItems"] = low
        if draw(st.booleans()):
            schema["maxItems"] = max(low, 1) + draw(st.integers(0, 3))
        return schema

    return build()


schemas = st.recursive(
    leaf_or_choice, lambda kids: objects(kids) | arrays(kids), max_leaves=10
)  # fmt: skip


def valid(schema: dict[str, Any], value: Any) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


@given(schemas, st.binary(min_size=1, max_size=32))
def test_a_value_made_for_a_schema_matches_it(schema: dict[str, Any], digest: bytes) -> None:
    value = instance(schema, digest)
    assert valid(schema, value), value
    assert instance(schema, digest) == value  # the same request, the same answer


@given(schemas, st.binary(min_size=1, max_size=32))
def test_a_broken_value_does_not(schema: dict[str, Any], digest: bytes) -> None:
    bad = broken(schema, instance(schema, digest))
    assert not valid(schema, bad), bad


def test_a_required_property_is_what_breaks_an_object() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"},
              "rank": {"type": "integer"}}, "required": ["rank"]}  # fmt: skip
    value = instance(schema, b"\x01\x02")
    assert set(value) == {"city", "rank"}
    assert broken(schema, value) == {"city": value["city"]}


def test_every_property_of_a_wide_object_matches() -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(12)},
              "required": [f"p{i}" for i in range(12)]}  # fmt: skip
    value = instance(schema, b"abc")
    assert all(isinstance(value[f"p{i}"], int) for i in range(12))
    assert valid(schema, value)
