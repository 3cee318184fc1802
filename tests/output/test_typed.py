"""JSON schema -> Arrow type, and values fitted to it (``batcher.output.typed``)."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher.output.typed import JSON_TEXT, arrow_type, column, fit
from batcher.sim.json_values import instance

S, INT, F, B = pa.string(), pa.int64(), pa.float64(), pa.bool_()


def struct(**fields: pa.DataType) -> pa.DataType:
    return pa.struct(list(fields.items()))


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "string"}, S),
        ({"type": "integer"}, INT),
        ({"type": "number"}, F),
        ({"type": "boolean"}, B),
        ({"type": ["string", "null"]}, S),
        ({"type": ["integer", "number"]}, F),
        ({"type": ["integer", "string"]}, JSON_TEXT),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, INT),
        ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, JSON_TEXT),
        # as pydantic writes Optional[int]
        ({"anyOf": [{"type": "integer"}, {"type": "null", "title": "None"}], "default": None}, INT),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, F),
        ({"enum": ["a", "b"]}, S),
        ({"enum": [1, 2, None]}, INT),
        ({"enum": [1, 2.5]}, F),
        ({"enum": [1, "a"]}, JSON_TEXT),
        ({"const": True}, B),
        ({"type": "array", "items": {"type": "integer"}}, pa.list_(INT)),
        ({"type": "array"}, pa.list_(JSON_TEXT)),
        ({"type": "object"}, JSON_TEXT),  # no properties: no struct Parquet could hold
        ({"type": "object", "additionalProperties": {"type": "integer"}}, JSON_TEXT),
        ({}, JSON_TEXT),
        (True, JSON_TEXT),
        ({"allOf": [{"type": "integer"}]}, INT),
        (
            {
                "type": "object",
                "properties": {
                    "answer": {"type": "string"},
                    "score": {"type": "number"},
                    "tags": {"type": "array", "items": {"enum": ["x", "y"]}},
                    "source": {
                        "type": ["object", "null"],
                        "properties": {"page": {"type": "integer"}},
                    },
                },
                "required": ["answer"],
            },
            struct(
                answer=S, score=F, tags=pa.list_(S), source=struct(page=INT)
            ),  # properties in order
        ),
        (
            {
                "$defs": {"step": {"type": "object", "properties": {"n": {"type": "integer"}}}},
                "type": "object",
                "properties": {"steps": {"type": "array", "items": {"$ref": "#/$defs/step"}}},
            },
            struct(steps=pa.list_(struct(n=INT))),
        ),
        (
            {
                "definitions": {"a/b": {"type": "boolean"}},
                "properties": {"flag": {"$ref": "#/definitions/a~1b"}},
            },
            struct(flag=B),
        ),
        (
            {  # a recursive $ref: typed down to the cycle, which is JSON text
                "$defs": {
                    "node": {
                        "type": "object",
                        "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}},
                    }
                },
                "$ref": "#/$defs/node",
            },
            struct(v=INT, next=JSON_TEXT),
        ),
        ({"$ref": "https://example.com/schema.json"}, JSON_TEXT),
        ({"$ref": "#/$defs/missing"}, JSON_TEXT),
    ],
)
def test_schema_types(schema: Any, expected: pa.DataType) -> None:
    assert arrow_type(schema) == expected


#: A pydantic model's schema (``Answer.model_json_schema()``), as users pass them: an enum
#: class, a Literal, nested models through $defs, Optional fields, a dict.
PYDANTIC = json.loads(
    '{"$defs": {"Color": {"enum": ["red", "blue"], "title": "Color", "type": "string"}, '
    '"Source": {"properties": {"page": {"title": "Page", "type": "integer"}, "quote": '
    '{"anyOf": [{"type": "string"}, {"type": "null"}], "default": null, "title": "Quote"}}, '
    '"required": ["page"], "title": "Source", "type": "object"}}, "properties": {"answer": '
    '{"title": "Answer", "type": "string"}, "kind": {"enum": ["fact", "opinion"], "title": '
    '"Kind", "type": "string"}, "color": {"$ref": "#/$defs/Color"}, "sources": {"items": '
    '{"$ref": "#/$defs/Source"}, "title": "Sources", "type": "array"}, "best": {"anyOf": '
    '[{"$ref": "#/$defs/Source"}, {"type": "null"}], "default": null}, "scores": '
    '{"additionalProperties": {"type": "number"}, "title": "Scores", "type": "object"}}, '
    '"required": ["answer", "kind", "color", "sources", "scores"], "title": "Answer", '
    '"type": "object"}'
)


def test_a_pydantic_schema() -> None:
    source = struct(page=INT, quote=S)
    t = arrow_type(PYDANTIC)
    assert t == struct(
        answer=S, kind=S, color=S, sources=pa.list_(source), best=source, scores=JSON_TEXT
    )
    value = {
        "answer": "yes", "kind": "fact", "color": "red", "sources": [{"page": 3}],
        "best": None, "scores": {"a": 0.5}, "unknown": 1,
    }  # fmt: skip
    expected = {
        "answer": "yes", "kind": "fact", "color": "red",
        "sources": [{"page": 3, "quote": None}], "best": None, "scores": '{"a":0.5}',
    }  # fmt: skip
    assert pa.array([fit(value, t)], type=t).to_pylist() == [expected]


def test_absurd_nesting_becomes_json_text() -> None:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(200):
        schema = {"type": "array", "items": schema}
    t = arrow_type(schema)
    depth = 0
    while pa.types.is_list(t):
        t, depth = t.value_type, depth + 1
    assert t == JSON_TEXT and depth < 40


def test_an_enum_of_integers_past_int64_is_json_text() -> None:
    """Found by the property below: such a value would be null in an int64 column."""
    t = arrow_type({"enum": [2**63]})
    assert t == JSON_TEXT
    assert fit(2**63, t) == str(2**63)


@pytest.mark.parametrize(
    ("value", "type_", "expected"),
    [
        ("12", INT, None),  # a string where a number was asked: null, not a guess
        (3.0, INT, 3),  # JSON Schema counts 3.0 as an integer
        (3.5, INT, None),
        (2**70, INT, None),  # past int64
        (True, INT, None),  # JSON's true is no number
        (2**70, F, float(2**70)),
        (10**400, F, None),  # past float
        (1, F, 1.0),
        (1, B, None),
        ("x", S, "x"),
        ({"a": [1, "b"]}, S, '{"a":[1,"b"]}'),  # a string column holds JSON text of the rest
        (5, S, "5"),
        ("\ud800x", S, "\\ud800x"),  # a lone surrogate as its escape text
        ({"a": 1, "extra": 2}, struct(a=INT, b=S), {"a": 1, "b": None}),
        ([1, 2], struct(a=INT), None),
        ({"a": 1}, pa.list_(INT), None),
        ([1, "2", 3.0], pa.list_(INT), [1, None, 3]),
        (None, struct(a=INT), None),
    ],
)
def test_fit(value: Any, type_: pa.DataType, expected: Any) -> None:
    assert fit(value, type_) == expected
    assert pa.array([fit(value, type_)], type=type_).to_pylist() == [expected]


# -- property: whatever the schema and the value, the fitted value is one Arrow accepts --------

_text = st.text(st.characters(exclude_categories=()), max_size=8)  # lone surrogates too
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=12,
)
_names = st.sampled_from(["a", "b", "answer", "", "x.y", "A"])
_scalar_schemas: st.SearchStrategy[Any] = (
    st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array"]).map(
        lambda t: {"type": t}
    )
    | st.lists(st.sampled_from(["string", "integer", "number", "null"]), max_size=3).map(
        lambda ts: {"type": ts}
    )
    | st.lists(st.none() | st.booleans() | st.integers() | st.floats() | _text, max_size=3).map(
        lambda vs: {"enum": vs}
    )
    | st.just({"$ref": "#/$defs/node"})
    | st.just({"$ref": "#"})
    | st.just({})
    | st.booleans()
)
schemas = st.recursive(
    _scalar_schemas,
    lambda inner: (
        st.dictionaries(_names, inner, max_size=4).map(
            lambda p: {"type": "object", "properties": p}
        )
        | inner.map(lambda i: {"type": "array", "items": i})
        | st.lists(inner, max_size=3).map(lambda o: {"anyOf": o})
        | st.lists(inner, min_size=1, max_size=2).map(lambda o: {"allOf": o})
    ),
    max_leaves=10,
)


def _with_defs(schema: Any, node: Any) -> Any:
    return {**schema, "$defs": {"node": node}} if isinstance(schema, dict) else schema


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schemas, schemas, json_values)
def test_any_value_fitted_to_any_schema_type_is_accepted(
    schema: Any, node: Any, value: Any
) -> None:
    t = arrow_type(_with_defs(schema, node))
    fitted = fit(value, t)
    column = pa.array([fitted, None], type=t)
    if pa.types.is_struct(t) or pa.types.is_list(t):
        # and Parquet can hold the column
        pq.write_table(pa.table({"parsed": column}), io.BytesIO())


@settings(max_examples=100, deadline=None)
@given(schemas, st.binary(min_size=8, max_size=8))
def test_a_value_that_matches_its_schema_keeps_its_typed_leaves(schema: Any, seed: bytes) -> None:
    """A value the simulator makes to fit the schema comes back as it was wherever the type
    is not JSON text (the simulator answers json_schema formats with such values)."""
    value = instance(schema, hashlib.sha256(seed).digest())
    t = arrow_type(schema)
    back = pa.array([fit(value, t)], type=t).to_pylist()[0]
    assert _same_where_typed(value, back, t)


def _same_where_typed(value: Any, back: Any, t: pa.DataType) -> bool:
    if value is None:
        return back is None
    if pa.types.is_struct(t):
        if not isinstance(value, dict):
            return back is None
        return all(_same_where_typed(value.get(f.name), back[f.name], f.type) for f in t)
    if pa.types.is_list(t):
        if not isinstance(value, list):
            return back is None
        return all(_same_where_typed(v, b, t.value_type) for v, b in zip(value, back, strict=True))
    if pa.types.is_string(t):
        return back is not None  # text, or JSON text: something is kept
    if pa.types.is_floating(t) and isinstance(value, int | float) and not isinstance(value, bool):
        return bool(back == float(value))
    return bool(back == value)


def test_a_column_arrow_refuses_is_cast_back_field_by_field() -> None:
    """A Parquet input's row read back from the journal: timestamps and decimals as text."""
    t = pa.struct([("when", pa.timestamp("us", tz="UTC")), ("price", pa.decimal128(5, 2))])
    values = [
        {"when": "2024-01-02T03:04:05+00:00", "price": "1.50"},
        None,
        {"when": None},
        {"when": "not a time", "price": "2"},  # this one leaf is null, not the column
    ]
    got = column(values, t).to_pylist()
    assert got[0] == {"when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "price": Decimal("1.50")}
    assert got[1:] == [None, {"when": None, "price": None}, {"when": None, "price": Decimal(2)}]
