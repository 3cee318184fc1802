"""Structured answers for the simulator: a JSON value made to fit a request's schema.

``instance(schema, digest)`` builds a deterministic value from the common JSON-schema keywords
(``type``, ``properties``, ``required``, ``items``, ``enum``, ``const``, ``anyOf``/``oneOf``,
``minimum``/``maximum``, ``minItems``), enough for the schemas people send with
``response_format``. ``broken(value)`` makes it not match (a required property dropped, or a
wrong type), for the simulator's ``schema_error_rate``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_WORDS = ("amber", "birch", "cedar", "delta", "ember", "flint", "grove", "heron")


#: Nesting past which a value is a plain word, whatever its schema asks (no real schema nests
#: this deep; the bound keeps an absurd one from exhausting the stack).
_MAX_NESTING = 64


def instance(schema: Any, digest: bytes, depth: int = 0, nesting: int = 0) -> Any:
    """A value valid against ``schema``, chosen by the bytes of ``digest``.

    ``depth`` picks the byte of ``digest`` a value starts from (each property and item its
    own); ``nesting`` is how deep in the value it is.
    """
    pick = digest[depth % len(digest)]
    if not isinstance(schema, Mapping) or nesting > _MAX_NESTING:
        return _WORDS[pick % len(_WORDS)]
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][pick % len(schema["enum"])]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return instance(options[0], digest, depth + 1, nesting + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        properties = schema.get("properties") or {}
        return {
            name: instance(sub, digest, depth + 1 + i, nesting + 1)
            for i, (name, sub) in enumerate(properties.items())
        }
    if kind == "array":
        count = max(int(schema.get("minItems", 0)), 1 + pick % 3)
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        items = schema.get("items")
        return [instance(items, digest, depth + 1 + i, nesting + 1) for i in range(count)]
    if kind in ("integer", "number"):
        high = schema.get("maximum")
        # 0 when the range holds it; a range with only a maximum below 0 ends at it
        low = schema.get("minimum", 0 if high is None else min(0, high))
        high = low + 100 if high is None else high
        value = low + pick % (int(high - low) + 1) if high >= low else low
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return bool(pick % 2)
    if kind == "null":
        return None
    return " ".join(_WORDS[(pick + j) % len(_WORDS)] for j in range(1 + pick % 3))


def broken(schema: Any, value: Any) -> Any:
    """``value`` made invalid against ``schema``: a required property dropped, else the wrong
    type."""
    required = schema.get("required") if isinstance(schema, Mapping) else None
    if isinstance(value, dict) and isinstance(required, list) and required:
        return {key: item for key, item in value.items() if key != required[0]}
    return [value] if not isinstance(value, list) else {"not": "a list"}
