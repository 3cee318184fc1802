"""Structured outputs: checking answers against the request's ``response_format``, and re-asks.

A request with ``response_format: {"type": "json_schema", "json_schema": {"schema": ...}}``
expects every choice's content to be JSON matching that schema; ``{"type": "json_object"}``
expects a JSON object. ``check_answer`` says whether an answer does (with jsonschema, the
validator class picked by the schema's ``$schema``, Draft 2020-12 by default). ``reask_body``
builds the follow-up request sent when it does not: the conversation so far, the invalid reply,
and a user turn quoting what was wrong, the way instructor re-asks.

Compiled validators are cached by the schema's canonical JSON: a batch usually shares one
schema across every line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

#: What a re-ask says after quoting the problem.
REASK_INSTRUCTION = "Reply again with only the JSON, matching the schema exactly."


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether an answer matched its format; ``error`` says why not; ``reask`` whether asking
    again could help (not after a refusal or a content filter)."""

    valid: bool
    error: str | None = None
    reask: bool = True


def expected_format(body: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """``("json_schema", schema JSON)`` or ``("json_object", None)``, or ``None`` when the
    request asks for no structured output (nothing to check)."""
    fmt = body.get("response_format")
    if not isinstance(fmt, Mapping):
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return "json_object", None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if isinstance(schema, Mapping | bool):
            return "json_schema", json.dumps(schema, sort_keys=True)
        return "json_schema", "true"  # a json_schema format with no schema: any JSON
    return None


def check_answer(body: Any, expected: tuple[str, str | None]) -> Verdict:
    """Check every choice of an answer ``body`` against the expected format."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        return Verdict(False, "the answer has no choices")
    kind, schema_text = expected
    validator = None
    if kind == "json_schema":
        from jsonschema.exceptions import SchemaError

        try:
            validator = _validator(schema_text or "true")
        except SchemaError as exc:
            problem = f"the request's schema is not a valid JSON schema: {_short(exc.message)}"
            return Verdict(False, problem, False)
    for position, item in enumerate(choices):
        choice: dict[str, Any] = item if isinstance(item, dict) else {}
        found = choice.get("message")
        message: dict[str, Any] = found if isinstance(found, dict) else {}
        where = f"choice {position}"
        if message.get("refusal"):
            return Verdict(False, f"{where} refused: {_short(str(message['refusal']))}", False)
        content = message.get("content")
        if not isinstance(content, str):
            reask = choice.get("finish_reason") != "content_filter"
            return Verdict(False, f"{where} has no text content", reask)
        try:
            value = json.loads(content)
        except (ValueError, RecursionError) as exc:
            cut = (
                " (cut off: finish_reason length)"
                if choice.get("finish_reason") == "length"
                else ""
            )
            return Verdict(False, f"{where} is not JSON{cut}: {exc}")
        if validator is None:
            if not isinstance(value, dict):
                return Verdict(False, f"{where} is JSON but not an object")
            continue
        mismatch = _schema_problem(validator, value)
        if mismatch is not None:
            return Verdict(False, f"{where} does not match the schema: {mismatch}")
    return Verdict(True)


def reask_body(body: Mapping[str, Any], answer: Any, error: str) -> dict[str, Any]:
    """The follow-up request: the same request, its invalid reply and what was wrong with it."""
    reply = _first_content(answer)
    messages = list(body.get("messages") or [])
    messages.append({"role": "assistant", "content": reply})
    complaint = f"That reply is not valid: {error}. {REASK_INSTRUCTION}"
    messages.append({"role": "user", "content": complaint})
    return {**body, "messages": messages}


def _schema_problem(validator: Any, value: Any) -> str | None:
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is None:
        return None
    path = "/".join(str(part) for part in error.absolute_path)
    return f"at /{path}: {_short(error.message)}" if path else _short(error.message)


@lru_cache(maxsize=64)
def _validator(schema_text: str) -> Any:
    """A compiled validator for a schema; raises ``SchemaError`` for an invalid schema."""
    from jsonschema.validators import Draft202012Validator, validator_for

    schema = json.loads(schema_text)
    cls = validator_for(schema, default=Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def _first_content(answer: Any) -> str:
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."
