"""Usage a server reports that cannot be true, so that it never lowers (or wrecks) the spend.

A server's ``usage`` is what an answer is billed at, and what ``--max-cost`` counts. Negative
counts would lower the spend (a server that reported -10^9 tokens took a capped run to -$120,
and the cap never bound); fractional ones or counts past any request's size are not counts.
Such usage is invalid: the answer is kept (its content may be fine) but its usage is dropped,
its cost is its reserved worst case under ``--max-cost`` (unknown otherwise), and the record
says why in ``error_message`` (``usage_invalid: ...``), its status still ``ok``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from batcher.http.answers import Attempt
from batcher.input.requests import completion_budget, prompt_bound
from batcher.records import Request

#: No answer is billed this many tokens in one field.
MAX_USAGE_TOKENS = 10**8
#: With a completion limit set, prompt plus completion may not pass this many times the
#: request's size (its completion budget plus its prompt estimate).
ABSURD_FACTOR = 10

#: The figures checked: (the table in ``usage`` that holds it, or ``None`` for ``usage``
#: itself; the field; its path in messages).
_FIELDS = (
    (None, "prompt_tokens", "usage.prompt_tokens"),
    (None, "completion_tokens", "usage.completion_tokens"),
    (None, "total_tokens", "usage.total_tokens"),
    ("prompt_tokens_details", "cached_tokens", "usage.prompt_tokens_details.cached_tokens"),
    (
        "completion_tokens_details",
        "reasoning_tokens",
        "usage.completion_tokens_details.reasoning_tokens",
    ),
)

#: The prefix of ``error_message`` on a record whose usage was invalid.
USAGE_INVALID = "usage_invalid"


def usage_problem(request: Request, usage: Any) -> str | None:
    """Why the ``usage`` object of an answer to ``request`` cannot be true, or ``None``."""
    if not isinstance(usage, dict):
        return None
    counts: dict[str, int] = {}
    for inside, name, where in _FIELDS:
        table: Any = usage if inside is None else usage.get(inside)
        value = table.get(name) if isinstance(table, dict) else None
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{where} is not a whole number: {_short(value)}"
        if value < 0:
            return f"{where} is negative: {value}"
        if value > MAX_USAGE_TOKENS:
            return f"{where} is absurd: {value:,}"
        counts[name] = value
    billed = counts.get("prompt_tokens", 0) + counts.get("completion_tokens", 0)
    body = request.body
    if billed and (body.get("max_tokens") or body.get("max_completion_tokens")):
        budget = request.completion_budget or completion_budget(body)
        if billed > ABSURD_FACTOR * budget:  # only then is the prompt's size worth working out
            limit = ABSURD_FACTOR * (budget + _prompt_size(request))
            if billed > limit:
                return (
                    f"usage is absurd: {billed:,} tokens billed for a request of at most "
                    f"{limit // ABSURD_FACTOR:,}"
                )
    return None


def checked(request: Request, attempt: Attempt) -> Attempt:
    """``attempt``, or when its usage is invalid the same without usage and saying why."""
    if attempt.usage is None or not attempt.ok or not isinstance(attempt.body, dict):
        return attempt
    problem = usage_problem(request, attempt.body.get("usage"))
    if problem is None:
        return attempt
    return dataclasses.replace(
        attempt,
        usage=None,
        error_message=f"{USAGE_INVALID}: {problem}; not counted (costed at its worst case "
        "under --max-cost)",
    )


def _prompt_size(request: Request) -> int:
    """An upper bound on the prompt (``prompt_bound``: images, tools and schema included),
    from its counted tokens, else its messages' JSON characters (more than their tokens)."""
    counted = request.prompt_tokens
    if counted is None:
        counted = len(json.dumps(request.body.get("messages"), default=str))
    return prompt_bound(request.body, counted)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
