"""What the simulator answers: content that is a deterministic function of the request.

``"sim-<12 hex> word word …"``, the hex from a sha256 of the request (``expected_content``), so
a test can check that every answer went back to the request that asked for it; JSON made to fit
a ``response_format`` schema (``batcher.sim.json_values``); prompt tokens counted as OpenAI
counts them (``count_prompt_tokens``). Nothing here does I/O or keeps state.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from batcher.cost.tokens import count_message_tokens, encoding_for_model
from batcher.sim import json_values as sim_json
from batcher.sim.faults import is_int

_FINGERPRINT = "fp_sim0001"
_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "one", "two", "three", "four", "five", "six",
)  # fmt: skip


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]], model: str | None = None) -> int:
    """The prompt tokens the simulator bills for ``messages``: tiktoken, as OpenAI counts them.

    The encoding follows the model (``o200k_base`` for the gpt-4o family, else ``cl100k_base``;
    see ``batcher.cost.tokens``); each message costs 3 tokens of framing and the reply 3 more.
    """
    return count_message_tokens(messages, encoding_for_model(model))


def expected_content(
    body: Mapping[str, Any], index: int = 0, *, max_completion_tokens: int = 64
) -> str:
    """The content the simulator answers to request ``body`` for choice ``index``.

    ``"sim-<12 hex> word word …"``: the hex is from a sha256 of the canonical JSON of the
    request's ``model``, ``messages``, ``seed`` and ``temperature`` and the choice index; the
    number of words is the completion tokens. Pass the ``max_completion_tokens`` of the
    ``SimConfig`` in use when it is not the default.
    """
    return _choice(body, index, max_completion_tokens, request_cap(body))[0]


def completion(
    body: Mapping[str, Any],
    prompt_tokens: int,
    *,
    natural_max: int,
    broken: Callable[[], bool],
) -> dict[str, Any]:
    """The whole chat completion answering ``body``: ``n`` choices, ``usage``, a reproducible id.

    ``natural_max`` is the longest answer written on its own (``SimConfig.max_completion_tokens``);
    ``broken`` is asked once per choice of a JSON answer whether to break it on purpose.
    """
    cap = request_cap(body)
    n = body.get("n") or 1
    schema = _wanted_json(body)
    if schema is None:
        results = [_choice(body, i, natural_max, cap) for i in range(n)]
    else:
        results = [_json_choice(body, i, schema, cap, broken()) for i in range(n)]
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "finish_reason": finish,
            "logprobs": None,
        }
        for index, (content, _, finish) in enumerate(results)
    ]
    completion_tokens = sum(tokens for _, tokens, _ in results)
    return {
        # The request's hash, as in choice 0's "sim-<hex>" tag: ids are reproducible too.
        "id": "chatcmpl-" + results[0][0][4:16],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": _FINGERPRINT,
    }


def request_cap(body: Mapping[str, Any]) -> int | None:
    """The smallest of the request's ``max_tokens`` and ``max_completion_tokens``, if any."""
    given: list[int] = [
        cap for cap in (body.get("max_tokens"), body.get("max_completion_tokens")) if is_int(cap)
    ]
    return min(given) if given else None


def _choice(
    body: Mapping[str, Any], index: int, natural_max: int, cap: int | None
) -> tuple[str, int, str]:
    """``(content, completion_tokens, finish_reason)`` for one choice."""
    digest = _digest(body, index)
    natural = 1 + int.from_bytes(digest[:4], "big") % natural_max
    tokens = natural if cap is None else min(natural, cap)
    words = " ".join(_WORDS[(digest[j % 32] + j) % len(_WORDS)] for j in range(tokens))
    finish = "length" if tokens < natural else "stop"
    return f"sim-{digest.hex()[:12]} {words}", tokens, finish


def _wanted_json(body: Mapping[str, Any]) -> Any:
    """The schema a request's ``response_format`` asks for (``{}`` for ``json_object``, any
    object), or ``None`` when it asks for text."""
    fmt = body.get("response_format")
    if not isinstance(fmt, Mapping):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "object", "properties": {"answer": {"type": "string"}}}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        return (spec.get("schema") if isinstance(spec, Mapping) else None) or {}
    return None


def _json_choice(
    body: Mapping[str, Any], index: int, schema: Any, cap: int | None, wrong: bool
) -> tuple[str, int, str]:
    """``(content, completion_tokens, finish_reason)`` of a JSON answer: about 4 characters a
    token; a cap below that cuts the text (no longer JSON) with ``finish_reason: "length"``."""
    value = sim_json.instance(schema, _digest(body, index))
    if wrong:
        value = sim_json.broken(schema, value)
    content = json.dumps(value)
    tokens = max(1, math.ceil(len(content) / 4))
    if cap is not None and cap < tokens:
        return content[: cap * 4], cap, "length"
    return content, tokens, "stop"


def _digest(body: Mapping[str, Any], index: int) -> bytes:
    key = {name: body.get(name) for name in ("model", "messages", "seed", "temperature")}
    key["index"] = index
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest()
