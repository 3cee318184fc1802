"""Request bodies: type checks of known fields, defaults merging, and the token estimate.

The known fields are those of the chat-completions reference (model, messages, temperature,
top_p, n, stream, stop, max_tokens, presence_penalty, frequency_penalty, logit_bias, user,
response_format, seed, tools, tool_choice) plus ``max_completion_tokens``. Their types are
checked so a bad line is rejected before it costs a request; every other field passes through
untouched, so new API parameters work without a batcher release.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from batcher.cost.tokens import (
    count_message_tokens,
    encoding_for_model,
    encoding_loaded,
    get_encoding,
)
from batcher.errors import ConfigError
from batcher.records import Request

#: Completion tokens assumed for the TPM estimate when a request sets no max_tokens: a
#: middle-of-the-road answer length. Set max_tokens for a tighter estimate.
DEFAULT_COMPLETION_TOKENS = 256


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # Finite: json.loads and TOML read NaN and Infinity, which JSON cannot carry to a server.
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_stop(v: Any) -> bool:
    return (
        v is None
        or isinstance(v, str)
        or (isinstance(v, list) and all(isinstance(s, str) for s in v))
    )


# field -> (check, what the field must be)
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "temperature": (lambda v: v is None or _is_number(v), "a number"),
    "top_p": (lambda v: v is None or _is_number(v), "a number"),
    "n": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1"),
    "stream": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "stop": (_is_stop, "a string or a list of strings"),
    "max_tokens": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1"),
    "max_completion_tokens": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1"),
    "presence_penalty": (lambda v: v is None or _is_number(v), "a number"),
    "frequency_penalty": (lambda v: v is None or _is_number(v), "a number"),
    "logit_bias": (lambda v: v is None or isinstance(v, dict), "an object"),
    "user": (lambda v: v is None or isinstance(v, str), "a string"),
    "response_format": (lambda v: v is None or isinstance(v, dict), "an object"),
    "seed": (lambda v: v is None or _is_int(v), "an integer"),
    "tools": (lambda v: v is None or isinstance(v, list), "a list"),
    "tool_choice": (lambda v: v is None or isinstance(v, str | dict), "a string or an object"),
}


def field_problem(body: Mapping[str, Any], *, messages: bool = True) -> tuple[str, str] | None:
    """Return ``(field, reason)`` for the first known field with a wrong type, else ``None``.

    ``messages`` is checked only when present (defaults may omit it; lines may not), and not
    when ``messages`` is false (the caller checked it).
    """
    for name, value in body.items():  # a body's few fields: fewer lookups than the checks
        checked = _CHECKS.get(name)
        if checked is not None and not checked[0](value):
            return _first_wrong_type(body)
    if messages and "messages" in body:
        problem = messages_problem(body["messages"])
        if problem:
            return "messages", problem
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return "stream_options", f"must be an object, got {_short(options)}"
    if options is not None and body.get("stream") is not True:
        return "stream_options", "is only allowed with stream: true (the API refuses it)"
    return None


def _first_wrong_type(body: Mapping[str, Any]) -> tuple[str, str]:
    """The first known field (in ``_CHECKS`` order) with a wrong type, of a body that has one."""
    for name, (check, must) in _CHECKS.items():
        if name in body and not check(body[name]):
            return name, f"must be {must}, got {_short(body[name])}"
    raise AssertionError("no field has a wrong type")


def with_stream_usage(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` asking for usage in its stream (``stream_options.include_usage``) when it streams.

    Without it a streamed answer carries no token counts, so nothing could be costed or
    budgeted. An explicit ``include_usage: false`` on the line is kept as it is.
    """
    if body.get("stream") is not True:
        return body
    options = body.get("stream_options") or {}
    if "include_usage" in options:
        return body
    return {**body, "stream_options": {**options, "include_usage": True}}


def messages_problem(messages: Any) -> str | None:
    """Why ``messages`` is unusable, or ``None`` when it is a non-empty list of role objects."""
    if not isinstance(messages, list):
        return f"must be a list of message objects, got {_short(messages)}"
    if not messages:
        return "must not be empty"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"item {i} must be an object, got {_short(message)}"
        if not isinstance(message.get("role"), str):
            return f"item {i} has no string 'role'"
    return None


def check_request_fields(body: Mapping[str, Any], *, where: str) -> None:
    """Raise ``ConfigError`` naming ``where.field`` for a badly typed request default."""
    problem = field_problem(body)
    if problem:
        raise ConfigError(f"{where}.{problem[0]}", problem[1])


def merge_defaults(defaults: Mapping[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
    """The line's fields over the job's defaults (shallow: a line's field replaces the default)."""
    if not defaults:
        return dict(body)
    merged = dict(defaults)
    merged.update(body)
    return merged


#: Roles that hold the system prompt (``developer`` is its name for OpenAI's reasoning models).
SYSTEM_ROLES = ("system", "developer")


def apply_variant(
    body: Mapping[str, Any], overrides: Mapping[str, Any], system: str | None
) -> dict[str, Any]:
    """A variant's request: its ``overrides`` over the line's body (the variant wins for the
    fields it names), and its ``system`` prompt in place of the line's first system message
    (put first when the line has none; ``""`` removes it)."""
    merged = {**body, **overrides}
    if system is not None:
        messages = list(merged.get("messages") or [])
        if messages and isinstance(messages[0], dict) and messages[0].get("role") in SYSTEM_ROLES:
            messages.pop(0)
        if system:
            messages.insert(0, {"role": "system", "content": system})
        merged["messages"] = messages
    return merged


def with_system(body: Mapping[str, Any], system: str) -> dict[str, Any]:
    """``body`` with ``system`` as its first message when it has no system (or developer)
    message: the job's ``system`` gives way to the line's own."""
    messages = list(body.get("messages") or [])
    if any(isinstance(m, dict) and m.get("role") in SYSTEM_ROLES for m in messages):
        return dict(body)
    return {**body, "messages": [{"role": "system", "content": system}, *messages]}


def estimate_prompt_tokens(body: Mapping[str, Any], encoding: str | None = None) -> int:
    """Prompt tokens of a request, counted with tiktoken (the model's encoding by default)."""
    messages = body.get("messages") or []
    model = body.get("model")
    return count_message_tokens(
        messages, encoding or encoding_for_model(model if isinstance(model, str) else None)
    )


class LateCounter:
    """Counts the prompt of a request read uncounted, once a TPM meter needs it (a server
    announced a token limit mid-run). The token table loads in a thread, once; ``on_first``
    is called the first time (the runner's readers then count the lines they read next)."""

    def __init__(self, encoding: str | None, *, on_first: Callable[[], object] | None) -> None:
        self._encoding = encoding  # the job's [limits] encoding, if it names one
        self._on_first = on_first
        self._loading = anyio.Lock()

    async def counted(self, request: Request) -> Request:
        """``request`` with ``prompt_tokens`` counted."""
        model = request.body.get("model")
        name = self._encoding or encoding_for_model(model if isinstance(model, str) else None)
        if not encoding_loaded(name):
            async with self._loading:
                if not encoding_loaded(name):  # another request may have loaded it meanwhile
                    await anyio.to_thread.run_sync(get_encoding, name)
        if self._on_first is not None:
            self._on_first()
            self._on_first = None
        counted = estimate_prompt_tokens(request.body, self._encoding)
        return dataclasses.replace(request, prompt_tokens=counted)


#: Tokens an image part may cost at most, for cost bounds: a large image at high detail on the
#: tile-priced models (gpt-4o: 85 + 170 a tile, at most 8 tiles = 1,445; gpt-5: 1,190) and the
#: patch-priced ones at 1,536 patches. Models that bill images at a multiple of that have
#: their own figure (``IMAGE_TOKENS_BY_MODEL``).
IMAGE_TOKENS_BOUND = 1_600
#: Model name prefixes billed more tokens an image (OpenAI's vision pricing): gpt-4o-mini
#: 2,833 + 5,667 a tile (8 tiles), the patch-priced minis at 1,536 patches times their factor.
IMAGE_TOKENS_BY_MODEL = {
    "gpt-4o-mini": 48_200,
    "gpt-4.1-nano": 3_800,
    "gpt-4.1-mini": 2_500,
    "o4-mini": 2_700,
}
#: Message fields counted as text by ``tokens.count_message_tokens`` (the rest are bounded
#: by their JSON here).
_COUNTED_AS_TEXT = frozenset({"role", "content", "name", "tool_calls", "function_call"})
#: Roles a single token encodes.
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def image_tokens_bound(model: object) -> int:
    """The most tokens an image may cost at ``model`` (``IMAGE_TOKENS_BOUND`` or its own)."""
    name = (model if isinstance(model, str) else "").rsplit("/", 1)[-1].lower()
    for prefix, tokens in IMAGE_TOKENS_BY_MODEL.items():
        if name.startswith(prefix):
            return tokens
    return IMAGE_TOKENS_BOUND


def prompt_bound(body: Mapping[str, Any], counted: int) -> int:
    """An upper bound on what the server may count as prompt, for ``--max-cost`` reservations.

    ``counted`` (tiktoken over the message texts and tool-call arguments) leaves out what
    servers also bill; each is bounded here at a token a character of its JSON (ASCII-escaped,
    so never fewer characters than UTF-8 bytes, and a token is at least a byte): tool and
    function definitions, a JSON schema, tool calls' ids and wrapping, any other message field
    or content part (audio, files); and images at ``image_tokens_bound`` each.
    """
    extra = 0
    for key in ("tools", "functions", "response_format"):
        if body.get(key):
            extra += _json_chars(body[key])
    image = image_tokens_bound(body.get("model"))
    for message in body.get("messages") or []:
        if not isinstance(message, Mapping):
            extra += _json_chars(message)
            continue
        role = message.get("role")
        # The role is encoded too (a token for the usual ones; the count leaves it out), plus
        # a token of slack for the message's separators.
        extra += 2 if role in _ROLES else 1 + _json_chars(role)
        for key, value in message.items():
            if key not in _COUNTED_AS_TEXT:
                extra += _json_chars(value)  # tool_call_id, audio, refusal, ...
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            extra += sum(_call_wrapping(call) for call in calls)
        elif calls is not None:
            extra += _json_chars(calls)
        if message.get("function_call") is not None:
            extra += _call_wrapping({"function": message["function_call"]})
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, Mapping):
                    extra += _json_chars(part)
                elif part.get("type") == "text" and isinstance(part.get("text"), str):
                    continue  # counted
                elif part.get("type") == "image_url":
                    extra += image
                else:
                    extra += max(image, _json_chars(part))
        elif content is not None and not isinstance(content, str):
            extra += _json_chars(content)
    return counted + extra


def _json_chars(value: Any) -> int:
    return len(json.dumps(value, default=str))


def _call_wrapping(call: Any) -> int:
    """A bound on a tool call's tokens besides its function's name and arguments (counted as
    text): its id, type and JSON structure."""
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping):
        return _json_chars(call)
    bare = {k: "" if k in ("name", "arguments") and isinstance(v, str) else v
            for k, v in function.items()}  # fmt: skip
    return _json_chars({**call, "function": bare})


def completion_budget(body: Mapping[str, Any]) -> int:
    """Worst-case completion tokens: ``max_completion_tokens`` or ``max_tokens`` (else
    ``DEFAULT_COMPLETION_TOKENS``) times ``n``."""
    budget = body.get("max_completion_tokens") or body.get("max_tokens")
    return int((budget or DEFAULT_COMPLETION_TOKENS) * (body.get("n") or 1))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
