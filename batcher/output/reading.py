"""Outputs read back: ``read_results`` reads a JSONL or Parquet output (a Ray engine's folder of
parts too, and JSONL from OpenAI's Batch API or vLLM) into dicts named like the Parquet columns,
for ``batcher report``, ``status``, compaction and the round-trip tests."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batcher import jsonfast
from batcher.errors import InputError
from batcher.output.formats import output_format
from batcher.output.rows import (
    ENCODE,
    NAMES,
    NO_USAGE,
    USAGE_KEYS,
    choices_rows,
    first_choice,
    messages_rows,
    text_value,
    usage_tuple,
)
from batcher.records import Usage


def parquet_parts(folder: Path) -> list[Path]:
    """The finished part files of a Parquet output folder (the Ray engine's), in name order."""
    return sorted(p for p in Path(folder).glob("*.parquet") if p.is_file())


def read_results(path: Path) -> Iterator[dict[str, Any]]:
    """Yield one dict per result (Parquet column names, SCHEMA order, then the typed columns
    the file has: ``messages``, and ``input``, ``parsed``, ``tool_calls`` where written) from
    either format.

    JSONL lines without a ``batcher`` object (files from OpenAI's Batch API or vLLM) are read
    too, with the fields they lack set to ``None`` and the status derived from the answer.
    A ``.parquet`` folder (the Ray engine's output) is read part file by part file.
    """
    path = Path(path)
    try:
        if output_format(path) == ".parquet":
            for part in parquet_parts(path) if path.is_dir() else [path]:
                for batch in pq.ParquetFile(part).iter_batches():
                    yield from batch.to_pylist()
            return
        # newline="\n": only LF ends a line; U+2028, U+0085 etc. may appear raw inside strings.
        with path.open(encoding="utf-8", newline="\n") as f:
            for n, text in enumerate(f, 1):
                if text.strip():
                    try:
                        yield row_from_line(jsonfast.loads_exact(text))
                    except (ValueError, TypeError, AttributeError) as exc:
                        raise InputError(f"{path}:{n}: not a batch output line ({exc})") from exc
    except (OSError, pa.ArrowException) as exc:  # missing file, or not a Parquet file
        raise InputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc


def row_from_line(obj: dict[str, Any]) -> dict[str, Any]:
    """The Parquet-shaped dict of one parsed batch output line, as ``read_results`` gives it
    (the inverse of ``rows.batch_output_line``)."""
    if "response" not in obj and "error" not in obj and "batcher" not in obj:
        # every output line has both keys (one null): this is another file, an input perhaps
        raise ValueError("it has neither 'response' nor 'error'")
    resp = obj.get("response")
    resp = resp if isinstance(resp, dict) else {}
    err = obj.get("error")
    b = obj.get("batcher")
    body = resp.get("body")
    status_code = resp.get("status_code")
    if isinstance(err, dict):
        error_code, error_message = err.get("code"), err.get("message")
    else:  # vLLM writes the error inline as a string
        error_code, error_message = None, err
    custom_id = obj.get("custom_id")
    request_id = resp.get("request_id")
    if isinstance(b, dict):
        if not resp:  # an answer without a usable body: its status and id are batcher's
            status_code, request_id = b.get("status_code"), b.get("request_id")
        status = b.get("status")
        model = b.get("model")
        body = _body_of(b.get("response_body"), body, error_message)
        if "error_code" in b:  # batcher's own; ``error`` holds the Batch API's view
            error_code, error_message = b.get("error_code"), b.get("error_message")
        custom_id = b.get("line_id", custom_id)
    else:
        failed = err is not None or (isinstance(status_code, int) and status_code >= 400)
        status = "error" if failed else "ok"
        model = body.get("model") if isinstance(body, dict) else None
        b = {}
    if "usage" in b:
        u = b["usage"]
        usage = tuple(u.get(k) for k in USAGE_KEYS) if isinstance(u, dict) else NO_USAGE
    else:
        usage = usage_tuple(Usage.from_body(body))
    content, finish = first_choice(body)
    meta = b.get("metadata")
    started, finished = b.get("started_at"), b.get("finished_at")
    values = (
        custom_id,
        status,
        model,
        content,
        finish,
        *usage,
        b.get("cost_usd"),
        b.get("attempts"),
        b.get("latency_s"),
        status_code,
        error_code,
        error_message,
        request_id,
        None if meta is None else ENCODE(meta),
        None if body is None else text_value(body),
        None if started is None else datetime.fromisoformat(started),
        None if finished is None else datetime.fromisoformat(finished),
        b.get("line"),
        choices_rows(body),
        b.get("ttft_s"),
        b.get("schema_valid"),
        b.get("schema_error"),
        b.get("endpoint"),
        b.get("variant"),
        b.get("choices_asked"),
        b.get("batch_id"),
    )
    row = dict(zip(NAMES, values, strict=True))
    row["messages"] = messages_rows(b.get("messages"))
    for key in ("input", "parsed"):
        if key in b:
            row[key] = b[key]
    return row


def _body_of(where: Any, body: Any, error_message: Any) -> Any:
    """The answer's body of a line whose ``batcher.response_body`` says where it went."""
    if where == "none":
        return None
    if where == "text":
        return error_message
    if where == "json" and isinstance(error_message, str):
        return jsonfast.loads_exact(error_message)
    return body
