"""Results as output rows: the fixed Parquet ``SCHEMA``, a result's column values and the Batch
API JSONL line of a result (``reading.py`` reads either format back into the same dicts).

The writers (``writers.py``) put these rows into files; this module has no file state.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from operator import attrgetter
from typing import Any

import pyarrow as pa

from batcher import jsonfast
from batcher.output.shape import OutputShape, tool_calls_type
from batcher.output.typed import fit, utf8
from batcher.records import Result, Usage

_S, _I32, _I64, _F64 = pa.string(), pa.int32(), pa.int64(), pa.float64()
_TS = pa.timestamp("us", tz="UTC")
# Every choice when n > 1 (content and finish_reason columns keep the first, for convenience);
# tool calls as JSON text, so nothing about them is lost.
_CHOICES = pa.list_(
    pa.struct(
        [
            ("index", pa.int64()),
            ("content", pa.string()),
            ("finish_reason", pa.string()),
            ("refusal", pa.string()),
            ("tool_calls", pa.string()),
        ]
    )
)
# fmt: off
SCHEMA: pa.Schema = pa.schema([
    ("custom_id", _S), ("status", _S), ("model", _S), ("content", _S), ("finish_reason", _S),
    ("prompt_tokens", _I64), ("completion_tokens", _I64), ("total_tokens", _I64),
    ("cached_tokens", _I64), ("reasoning_tokens", _I64),
    ("cost_usd", _F64), ("attempts", _I32), ("latency_s", _F64), ("status_code", _I32),
    ("error_code", _S), ("error_message", _S), ("request_id", _S),
    ("metadata", _S), ("response", _S),
    ("started_at", _TS), ("finished_at", _TS), ("line", _I64),
    ("choices", _CHOICES),
    ("ttft_s", _F64), ("schema_valid", pa.bool_()), ("schema_error", _S), ("endpoint", _S),
    ("variant", _S), ("choices_asked", _I32), ("batch_id", _S),
])
"""The fixed Parquet columns: every output file starts with exactly these, in this order (its
typed columns follow them: ``schema_for``)."""
# fmt: on
NAMES: tuple[str, ...] = tuple(SCHEMA.names)
#: The shape of an output with no typed columns but ``messages`` (request lines, no
#: structured answers).
PLAIN = OutputShape()


def schema_for(shape: OutputShape) -> pa.Schema:
    """The Parquet schema of an output of ``shape``: ``SCHEMA``, then its typed columns."""
    return pa.schema([*SCHEMA, *shape.fields()])


USAGE_KEYS = NAMES[5:10]  # prompt_tokens .. reasoning_tokens, the Usage fields

# Compact, non-ASCII as is; default=str keeps odd values (Decimal, bytes...) from raising.
ENCODE = jsonfast.dumps_text
_EPOCH = datetime(1970, 1, 1)  # naive: isoformat() + "Z" is cheaper than an aware isoformat
_EPOCH_UTC = _EPOCH.replace(tzinfo=UTC)
_MIN_US = round((datetime(1, 1, 2) - _EPOCH).total_seconds()) * 1_000_000
_MAX_US = round((datetime(9999, 12, 30) - _EPOCH).total_seconds()) * 1_000_000
NO_USAGE = (None, None, None, None, None)


def _us(ts: float) -> int | None:
    """Unix seconds to integer microseconds, the one rounding both formats share."""
    try:
        us = round(ts * 1_000_000)
    except (ValueError, OverflowError, TypeError):  # NaN, inf, not a number
        return None
    return us if _MIN_US <= us <= _MAX_US else None  # keep within datetime's range


@lru_cache(maxsize=4096)
def _second_iso(sec: int) -> str:
    return (_EPOCH + timedelta(seconds=sec)).isoformat()


def _iso(us: int | None) -> str | None:
    """ISO-8601 UTC with microseconds; results finish at about the same seconds, so the
    formatted second is cached (about 3x cheaper than formatting a datetime each time)."""
    if us is None:
        return None
    sec, frac = divmod(us, 1_000_000)
    return f"{_second_iso(sec)}.{frac:06d}Z"


def _finite(x: float | None) -> float | None:
    # NaN/inf would make the JSONL line invalid JSON for non-Python readers.
    return x if x is None or math.isfinite(x) else None


def text_value(value: Any) -> str | None:
    """A string column value: strings as they are, anything else as JSON text."""
    if value is None or isinstance(value, str):
        return value
    return ENCODE(value)


def first_choice(body: Any) -> tuple[str | None, str | None]:
    """``(content, finish_reason)`` of the first choice; ``(None, None)`` for odd bodies."""
    if not isinstance(body, dict):
        return None, None
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None, None
    choice = choices[0]
    message = choice.get("message")
    content = text_value(message.get("content")) if isinstance(message, dict) else None
    return content, text_value(choice.get("finish_reason"))


def choices_rows(body: Any) -> list[dict[str, Any]] | None:
    """Every choice of an answer as a row of the ``choices`` column; ``None`` for odd bodies."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return None
    rows = []
    for position, choice in enumerate(body["choices"]):
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        index = choice.get("index")
        calls = message.get("tool_calls")
        rows.append(
            {
                "index": index if isinstance(index, int) and not isinstance(index, bool)
                else position,
                "content": text_value(message.get("content")),
                "finish_reason": text_value(choice.get("finish_reason")),
                "refusal": text_value(message.get("refusal")),
                "tool_calls": None if calls is None else ENCODE(calls),
            }
        )  # fmt: skip
    return rows


_USAGE_OF = attrgetter(*USAGE_KEYS)  # Usage's fields are named like the columns


def usage_tuple(usage: Usage | None) -> tuple[int | None, ...]:
    return NO_USAGE if usage is None else _USAGE_OF(usage)


def _has_response(r: Result) -> bool:
    # "No HTTP answer" means nothing of one is known; checking all three keeps the line lossless.
    return r.status_code is not None or r.body is not None or r.request_id is not None


def line_custom_id(custom_id: str, variant: str | None) -> str:
    """A JSONL line's ``custom_id``: the line's own id, and ``id:variant`` in a sweep, so it is
    unique within a file (a variant name holds no ``:``, so the pair reads back unambiguously)."""
    return custom_id if variant is None else f"{custom_id}:{variant}"


def _response_and_error(r: Result, extra: dict[str, Any]) -> tuple[Any, Any]:
    """The line's ``response`` or ``error``, never both.

    ``response`` when an HTTP answer came with a JSON object body (a server's 400 with its
    JSON error too, as the Batch API writes it); else ``error``: no HTTP answer (a timeout, a
    connection error), or an answer without a usable body. Then the answer's status code and
    request id go to ``batcher.status_code`` and ``batcher.request_id``, and
    ``batcher.response_body`` says where its body went: ``"none"`` (there was none),
    ``"text"`` (``error.message`` is the raw answer) or ``"json"`` (``error.message`` is a
    JSON value that is not an object, as JSON text), so the line reads back whole."""
    body = r.body
    if isinstance(body, dict):
        return {"status_code": r.status_code, "request_id": r.request_id, "body": body}, None
    if not _has_response(r):
        failed = r.status == "error" or r.error_code is not None or r.error_message is not None
        return None, {"code": r.error_code, "message": r.error_message} if failed else None
    extra["status_code"] = r.status_code
    extra["request_id"] = r.request_id
    code = r.error_code or "invalid_response"
    if body is None:
        extra["response_body"] = "none"
        return None, {"code": code, "message": r.error_message}
    if isinstance(body, str):
        extra["response_body"] = "text"
        return None, {"code": code, "message": body}
    extra["response_body"] = "json"
    return None, {"code": code, "message": ENCODE(body)}


def batch_output_line(result: Result, *, parsed: bool = False) -> dict[str, Any]:
    """The OpenAI Batch API output line for ``result``, plus a ``batcher`` object of our fields.

    ``batcher.messages`` holds the messages as sent and ``batcher.input`` a tabular input's row
    (each absent when unknown); with ``parsed``, ``batcher.parsed`` holds the first choice's
    content parsed as JSON (null when it is not JSON).

    ``custom_id`` is unique within a file: the line's own id, ``id:variant`` in a sweep (the
    line's own id then in ``batcher.line_id``, the variant in ``batcher.variant``). ``id`` is
    derived from the id and variant, so reruns produce comparable files. A line has
    ``response`` (an answer with an object body) or ``error`` (no usable answer), never both
    (see ``_response_and_error``); batcher's own error code and message are
    ``batcher.error_code`` and ``batcher.error_message``. Usage stays in
    ``response.body.usage`` as the server sent it; ``batcher.usage`` appears only when the
    result's usage differs from what the body says, so nothing is lost.
    """
    r = result
    cid = r.custom_id
    # with variants one id has a line per variant: the id hashes both, to stay unique
    key = cid if r.variant is None else f"{cid}\x00{r.variant}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    extra: dict[str, Any] = {
        "status": r.status,
        "model": r.model,
        "attempts": r.attempts,
        "latency_s": _finite(r.latency_s),
        "started_at": _iso(_us(r.started_at)),
        "finished_at": _iso(_us(r.finished_at)),
        "metadata": r.metadata,
        "cost_usd": _finite(r.cost_usd),
        "line": r.line,
        "ttft_s": _finite(r.ttft_s),
        "schema_valid": r.schema_valid,
        "schema_error": r.schema_error,
        "endpoint": r.endpoint,
        "error_code": r.error_code,
        "error_message": r.error_message,
    }
    if r.variant is not None:  # absent in a job without variants: its lines stay as they were
        extra["variant"] = r.variant
        extra["line_id"] = cid
    if r.choices_asked is not None:  # absent for requests of one choice, likewise
        extra["choices_asked"] = r.choices_asked
    if r.batch_id is not None:  # absent for answers sent online, likewise
        extra["batch_id"] = r.batch_id
    if r.messages is not None:
        extra["messages"] = r.messages
    if r.input is not None:
        extra["input"] = r.input
    if parsed:
        extra["parsed"] = parsed_value(r.body)
    if r.usage != Usage.from_body(r.body):
        u = r.usage
        extra["usage"] = None if u is None else dict(zip(USAGE_KEYS, usage_tuple(u), strict=True))
    response, error = _response_and_error(r, extra)
    return {
        "id": "batch_req_" + digest,
        "custom_id": line_custom_id(cid, r.variant),
        "response": response,
        "error": error,
        "batcher": extra,
    }


def messages_rows(messages: Any) -> list[dict[str, str | None]] | None:
    """The ``messages`` column's value: each message's role and content (text as it is,
    a list of parts as JSON text)."""
    if not isinstance(messages, list):
        return None
    rows = []
    for message in messages:
        if isinstance(message, dict):
            role, content = message.get("role"), message.get("content")
            rows.append({"role": _utf8_text(role), "content": _utf8_text(content)})
    return rows


def _utf8_text(value: Any) -> str | None:
    text = text_value(value)
    return None if text is None else utf8(text)


def parsed_value(body: Any) -> Any:
    """The first choice's content parsed as JSON; ``None`` if there is none or it is not JSON."""
    content, _ = first_choice(body)
    if content is None:
        return None
    try:
        return jsonfast.loads_answer(content)
    except (ValueError, TypeError, RecursionError):
        return None


def _tool_calls(body: Any) -> list[dict[str, Any]] | None:
    """The first choice's tool calls: id, function name and arguments parsed (``None`` where
    they are not JSON)."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return None
    choice = body["choices"][0] if body["choices"] else None
    message = choice.get("message") if isinstance(choice, dict) else None
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not isinstance(calls, list):
        return None
    rows = []
    for call in calls:
        if not isinstance(call, dict):
            continue
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = jsonfast.loads_answer(arguments)
            except (ValueError, TypeError, RecursionError):
                arguments = None
        rows.append({"id": call.get("id"), "name": function.get("name"), "arguments": arguments})
    return rows


def typed_values(r: Result, shape: OutputShape) -> tuple[Any, ...]:
    """The typed columns' values of a row (``shape.fields()`` order), each fitted to its type."""
    values: list[Any] = [messages_rows(r.messages)]
    if shape.input is not None:
        values.append(None if r.input is None else fit(r.input, shape.input))
    if shape.parsed is not None:
        values.append(fit(parsed_value(r.body), shape.parsed))
    if shape.tool_arguments is not None:
        calls = _tool_calls(r.body)
        values.append(None if calls is None else fit(calls, tool_calls_type(shape.tool_arguments)))
    return tuple(values)


def row_values(r: Result) -> tuple[Any, ...]:
    """One row in SCHEMA order, timestamps as integer microseconds (cheapest for pyarrow)."""
    content, finish = first_choice(r.body)
    body = r.body
    return (
        r.custom_id,
        r.status,
        r.model,
        content,
        finish,
        *usage_tuple(r.usage),
        _finite(r.cost_usd),
        r.attempts,
        _finite(r.latency_s),
        r.status_code,
        r.error_code,
        r.error_message,
        r.request_id,
        None if r.metadata is None else ENCODE(r.metadata),
        None if body is None else text_value(body),
        _us(r.started_at),
        _us(r.finished_at),
        r.line,
        choices_rows(body),
        _finite(r.ttft_s),
        r.schema_valid,
        r.schema_error,
        r.endpoint,
        r.variant,
        r.choices_asked,
        r.batch_id,
    )


def _to_dt(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH_UTC + timedelta(microseconds=us)


def parquet_row(result: Result, shape: OutputShape = PLAIN) -> dict[str, Any]:
    """The Parquet row for ``result`` as a dict in SCHEMA order, then ``shape``'s typed
    columns (timestamps as aware datetimes)."""
    row = dict(zip(NAMES, row_values(result), strict=True))
    row.update(zip([f.name for f in shape.fields()], typed_values(result, shape), strict=True))
    row["started_at"] = _to_dt(row["started_at"])
    row["finished_at"] = _to_dt(row["finished_at"])
    return row
