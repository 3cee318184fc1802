"""What a simulated batch answers: each request's outcome, drawn when the batch is created, and
the lines of its output and error files once it has ended (OpenAI's ``BatchRequestOutput``)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

from batcher.cost.tokens import count_message_tokens, encoding_for_model
from batcher.sim.batch_files import BatchLine
from batcher.sim.faults import BadRequest, validate_request

#: The simulator's chat answer for a body and its prompt tokens (``Simulator._answer``).
Answer = Callable[[dict[str, Any], int], dict[str, Any]]
#: The per-request errors a batch can draw, by HTTP status: (message, type).
REQUEST_ERRORS = {
    "500": ("The server had an error while processing your request.", "server_error"),
    "503": ("The engine is currently overloaded, please try again later.", "server_error"),
    "429": ("Rate limit reached for requests.", "rate_limit_exceeded"),
    "400": ("Invalid request.", "invalid_request_error"),
}


def plan_outcomes(
    lines: Sequence[BatchLine], *, error_rate: float, error_kinds: Sequence[str], seed: str
) -> list[str]:
    """Each request's outcome: a 400 where the chat route would give one, else an error drawn
    at ``error_rate``, else ``"ok"`` (seeded: the same batch gets the same outcomes)."""
    rng = random.Random(seed)
    plan = []
    for line in lines:
        if _bad_request(line.body) is not None:
            plan.append("400")
            continue
        drawn = error_rate and rng.random() < error_rate
        plan.append(rng.choice(error_kinds) if drawn else "ok")
    return plan


def file_lines(
    lines: Sequence[BatchLine],
    outcomes: Sequence[str],
    done: int,
    reason: str,
    answer: Answer,
    *,
    shuffle_seed: str,
) -> tuple[list[bytes], list[bytes]]:
    """The output and error files' lines of a batch that processed its first ``done`` requests;
    the rest are errors with code ``reason`` (``batch_expired``, ``batch_cancelled``). Output
    lines are shuffled: readers must match them by ``custom_id``, as on OpenAI."""
    outputs: list[bytes] = []
    errors: list[bytes] = []
    for index, (line, outcome) in enumerate(zip(lines, outcomes, strict=True)):
        entry: dict[str, Any]
        if index >= done:
            message = f"This request could not be executed before the batch ended ({reason})."
            entry = {"response": None, "error": {"code": reason, "message": message}}
        elif outcome == "ok":
            entry = {"response": _response(200, answer(line.body, prompt_tokens(line.body)))}
        else:
            entry = {"response": _response(int(outcome), _request_error(outcome, line.body))}
        entry.setdefault("error", None)
        text = json.dumps({"id": new_id("batch_req_"), "custom_id": line.custom_id, **entry})
        (outputs if outcome == "ok" and index < done else errors).append(text.encode())
    random.Random(shuffle_seed).shuffle(outputs)
    return outputs, errors


def prompt_tokens(body: dict[str, Any]) -> int:
    """The prompt tokens the chat route would bill (0 for a body it would refuse)."""
    messages = body.get("messages")
    model = body.get("model")
    try:
        return count_message_tokens(messages, encoding_for_model(model))  # type: ignore[arg-type]
    except (TypeError, AttributeError, ValueError, KeyError):
        return 0


def new_id(prefix: str) -> str:
    """An object id in OpenAI's style: a prefix and random hex."""
    return prefix + os.urandom(12).hex()


def _bad_request(body: dict[str, Any]) -> str | None:
    """Why the chat route would answer 400 to ``body``, or ``None``."""
    try:
        validate_request(json.dumps(body).encode())
    except BadRequest as exc:
        return exc.message
    return None


def _request_error(outcome: str, body: dict[str, Any]) -> dict[str, Any]:
    message, kind = REQUEST_ERRORS[outcome]
    if outcome == "400":
        message = _bad_request(body) or message
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _response(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"status_code": status, "request_id": new_id("req_"), "body": body}
