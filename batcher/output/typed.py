"""Typed columns from JSON schemas: ``arrow_type(schema)`` is the Arrow type of the values a
schema describes, and ``fit(value, type)`` turns a JSON value into one that type accepts.

The type follows the schema where a column can hold it: an object with properties is a struct
(its properties in order), an array a list of its ``items``' type, ``string``/``integer``/
``number``/``boolean`` the matching scalar, an ``enum`` or ``const`` the type of its values.
Every Arrow value may be null, so ``null`` in a type list or an ``anyOf`` only drops out; local
``$ref`` (``#/$defs/...``, ``#/definitions/...``, any ``#/`` pointer) is followed. What cannot
be one column type (a union of types, an object without properties, a recursive ``$ref``,
``{}``) is a string column of JSON text.

``fit`` never raises: a value that does not fit its type (a string where a number was asked,
an integer past 64 bits) becomes null, a struct takes the fields it knows and drops the rest,
and a string column keeps strings as they are and holds anything else as JSON text (as the
output's other text columns do).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from batcher import jsonfast

#: The JSON text type: a string column whose values are JSON text (strings as they are).
JSON_TEXT = pa.string()
#: Nesting past which a schema is JSON text (no real schema nests this deep; the bound keeps
#: an absurd one from exhausting the stack, in the type and in the fitter that follows it).
MAX_DEPTH = 32

_SCALARS: dict[str, pa.DataType] = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_REFUSED = (pa.ArrowException, ValueError, TypeError, OverflowError)  # what Arrow raises


def arrow_type(schema: Any) -> pa.DataType:
    """The Arrow type of the values ``schema`` (a JSON schema) describes; JSON text where no
    one type holds them."""
    return _Typer(schema).type_of(schema, 0, ())


class _Typer:
    """Types one schema: ``root`` is where ``$ref`` pointers start."""

    def __init__(self, root: Any) -> None:
        self.root = root

    def type_of(self, schema: Any, depth: int, refs: tuple[str, ...]) -> pa.DataType:
        """The type of ``schema``; ``refs``: the ``$ref`` pointers being followed (a cycle is
        JSON text)."""
        if not isinstance(schema, Mapping) or depth > MAX_DEPTH:
            return JSON_TEXT  # true, false, or nonsense: nothing to type
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = _pointer(self.root, ref)
            if target is None or ref in refs:
                return JSON_TEXT
            return self.type_of(target, depth + 1, (*refs, ref))
        values = _enum_values(schema)
        if values is not None:
            return _type_of_values(values)
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list):
                kept = [o for o in options if not _is_null_schema(o)]
                return self._one_type([self.type_of(o, depth + 1, refs) for o in kept])
        all_of = schema.get("allOf")
        if isinstance(all_of, list):
            return self.type_of(all_of[0], depth + 1, refs) if len(all_of) == 1 else JSON_TEXT
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"]
            if len(kinds) != 1:
                # integer or number: a number; any other mix is JSON text
                return pa.float64() if set(kinds) == {"integer", "number"} else JSON_TEXT
            kind = kinds[0]
        if kind is None and "properties" in schema:
            kind = "object"
        if kind == "object":
            return self._struct(schema.get("properties"), depth, refs)
        if kind == "array":
            items = schema.get("items")
            if not isinstance(items, Mapping):  # no items, or a tuple (prefixItems)
                return pa.list_(JSON_TEXT)
            return pa.list_(self.type_of(items, depth + 1, refs))
        return _SCALARS.get(kind, JSON_TEXT) if isinstance(kind, str) else JSON_TEXT

    def _struct(self, properties: Any, depth: int, refs: tuple[str, ...]) -> pa.DataType:
        # Parquet has no struct without fields: an object with no known properties is text.
        if not isinstance(properties, Mapping) or not properties:
            return JSON_TEXT
        fields = [
            pa.field(str(name), self.type_of(sub, depth + 1, refs))
            for name, sub in properties.items()
        ]
        return pa.struct(fields)

    @staticmethod
    def _one_type(types: list[pa.DataType]) -> pa.DataType:
        if not types:
            return JSON_TEXT
        first = types[0]
        if all(t.equals(first) for t in types):
            return first
        if all(t.equals(pa.int64()) or t.equals(pa.float64()) for t in types):
            return pa.float64()
        return JSON_TEXT


def _pointer(root: Any, ref: str) -> Any:
    """The schema a local ``$ref`` (``#`` or ``#/a/b``) points to; ``None`` if none."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None  # a remote schema: not fetched
    node = root
    for part in ref[2:].split("/"):
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node


def _is_null_schema(schema: Any) -> bool:
    # annotations (title, description) aside: {"type": "null", "title": "None"} is null too
    return isinstance(schema, Mapping) and schema.get("type") == "null"


def _enum_values(schema: Mapping[str, Any]) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    values = schema.get("enum")
    return values if isinstance(values, list) and values else None


def _type_of_values(values: list[Any]) -> pa.DataType:
    """The one type of an enum's values (nulls aside); JSON text when they differ."""
    kinds = {_kind(v) for v in values if v is not None}
    if kinds == {"integer", "number"}:
        return pa.float64()
    if len(kinds) == 1:
        return _SCALARS.get(kinds.pop(), JSON_TEXT)
    return JSON_TEXT


_INT64 = range(-(2**63), 2**63)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        # an enum value past int64 cannot be held by the integer column: JSON text keeps it
        return "integer" if value in _INT64 else "other"
    if isinstance(value, float):
        return "number"
    return "string" if isinstance(value, str) else "other"


def fit(value: Any, type_: pa.DataType) -> Any:
    """``value`` as ``pa.array([...], type=type_)`` accepts it, or ``None`` where it does not
    fit; never raises. Types ``arrow_type`` gives are fitted all the way down; a value of
    another type (a Parquet input's timestamp, say) is left as it is."""
    try:
        return _fit(value, type_)
    except (RecursionError, ValueError, TypeError, OverflowError, AttributeError):
        return None


def _fit(value: Any, t: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(t):
        return utf8(value if isinstance(value, str) else jsonfast.dumps_text(value))
    if pa.types.is_struct(t):
        if not isinstance(value, Mapping):
            return None
        return {f.name: _fit(value.get(f.name), f.type) for f in t}
    if pa.types.is_list(t):
        if not isinstance(value, list):
            return None
        item = t.value_type
        return [_fit(v, item) for v in value]
    if pa.types.is_boolean(t):
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None  # JSON's true is no number
    if pa.types.is_int64(t):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)  # JSON Schema counts 3.0 as an integer
        ok = isinstance(value, int) and _I64_MIN <= value <= _I64_MAX
        return value if ok else None
    if pa.types.is_float64(t):
        return _float(value) if isinstance(value, int | float) else None
    # A type no schema gives (a Parquet input's own: timestamps, decimals...): as it is, for
    # Arrow to judge; the writer nulls a value it refuses.
    return value


def _float(value: float) -> float | None:
    try:
        return float(value)
    except OverflowError:  # an integer past float's range
        return None


def utf8(text: str) -> str:
    """``text`` as Arrow accepts it: a lone surrogate (from a ``"\\ud800"`` escape) becomes
    its ``\\ud800`` escape text."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def cast(value: Any, type_: pa.DataType) -> Any:
    """``value`` made to fit ``type_`` leaf by leaf, Arrow casting a leaf it refuses as it is
    (a Parquet input's timestamp journaled as text casts back); ``None`` where nothing fits.
    Slower than ``fit``: for a column Arrow refused."""
    try:
        return _cast(value, type_)
    except (RecursionError, ValueError, TypeError, OverflowError, AttributeError):
        return None


def _cast(value: Any, t: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_struct(t):
        if not isinstance(value, Mapping):
            return None
        return {f.name: _cast(value.get(f.name), f.type) for f in t}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [_cast(v, t.value_type) for v in value] if isinstance(value, list) else None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return utf8(value if isinstance(value, str) else jsonfast.dumps_text(value))
    try:
        pa.scalar(value, type=t)
        return value
    except _REFUSED:
        pass
    try:
        return pa.scalar(value).cast(t).as_py()
    except _REFUSED:
        return None


def column(values: list[Any], type_: pa.DataType) -> pa.Array:
    """``values`` as an array of ``type_``, never raising: as Arrow builds it, else a struct
    field by field, else cast from the type Arrow infers (a column of timestamps journaled as
    text casts back at once), else value by value (``cast``)."""
    try:
        return pa.array(values, type=type_)
    except _REFUSED:
        pass
    if pa.types.is_struct(type_) and type_.num_fields:
        missing = pa.array([not isinstance(v, Mapping) for v in values], type=pa.bool_())
        children = [
            column([v.get(f.name) if isinstance(v, Mapping) else None for v in values], f.type)
            for f in type_
        ]
        return pa.StructArray.from_arrays(children, fields=list(type_), mask=missing)
    try:
        return pa.array(values).cast(type_)
    except _REFUSED:
        return pa.array([cast(v, type_) for v in values], type=type_)
