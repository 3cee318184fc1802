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
    """Whether an answer matched its format: ``valid`` is ``None`` when there was nothing to
    check (the model called a tool instead). ``error`` says why not, about choice ``choice``;
    ``reask`` whether asking again could help (not after a refusal, a content filter, an answer
    cut off by max_tokens, or a schema that cannot be used)."""

    valid: bool | None
    error: str | None = None
    reask: bool = True
    choice: int = 0


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
        try:
            validator = _validator(schema_text or "true")
        except Exception as exc:  # SchemaError
            message = _short(getattr(exc, "message", None) or str(exc))
            problem = f"the request's schema is not a valid JSON schema: {message}"
            return Verdict(False, problem, reask=False)
    tool_calls = 0
    for position, item in enumerate(choices):
        choice: dict[str, Any] = item if isinstance(item, dict) else {}
        verdict = _check_choice(choice, position, validator)
        if verdict is None:
            tool_calls += 1
        elif not verdict.valid:
            return verdict
    return Verdict(None if tool_calls == len(choices) else True)


def _check_choice(choice: dict[str, Any], position: int, validator: Any) -> Verdict | None:
    """The verdict on one choice; ``None`` when it called a tool instead of answering."""
    found = choice.get("message")
    message: dict[str, Any] = found if isinstance(found, dict) else {}
    where, finish = f"choice {position}", choice.get("finish_reason")
    content = message.get("content")
    if message.get("tool_calls") and not content:
        return None
    if message.get("refusal"):
        refusal = _short(str(message["refusal"]))
        return Verdict(False, f"{where} refused: {refusal}", reask=False, choice=position)
    if finish == "content_filter":
        return Verdict(False, f"{where} was filtered", reask=False, choice=position)
    if not isinstance(content, str):
        return Verdict(False, f"{where} has no text content", choice=position)
    try:
        value = json.loads(content)
    except (ValueError, RecursionError) as exc:
        if finish == "length":  # the same max_tokens would cut it again
            problem = f"{where} is cut off (finish_reason length), not JSON: {exc}"
            return Verdict(False, problem, reask=False, choice=position)
        return Verdict(False, f"{where} is not JSON: {exc}", choice=position)
    if validator is None:
        if not isinstance(value, dict):
            return Verdict(False, f"{where} is JSON but not an object", choice=position)
        return Verdict(True)
    try:
        mismatch = _schema_problem(validator, value)
    except Exception as exc:  # e.g. a $ref to a document that cannot be fetched
        problem = f"the request's schema cannot be used: {_short(str(exc))}"
        return Verdict(False, problem, reask=False, choice=position)
    if mismatch is not None:
        problem = f"{where} does not match the schema: {mismatch}"
        return Verdict(False, problem, choice=position)
    return Verdict(True)


def reask_body(body: Mapping[str, Any], answer: Any, verdict: Verdict) -> dict[str, Any]:
    """The follow-up request: the same request, the invalid reply (of the choice that failed)
    and what was wrong with it."""
    reply = _content_of(answer, verdict.choice)
    error = verdict.error or "it does not match the requested format"
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


def _content_of(answer: Any, choice: int) -> str:
    try:
        content = answer["choices"][choice]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."
