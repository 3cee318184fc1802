"""The simulator's uploaded files: a multipart upload read, and a batch input file checked
line by line the way the Batch API checks it (its errors name the line)."""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: The only endpoint the simulator's batches serve.
CHAT_ENDPOINT = "/v1/chat/completions"
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})([hd])$")


@dataclass(frozen=True, slots=True)
class LineError:
    """A line of an input file the Batch API refuses, as ``errors.data`` shows it."""

    line: int
    code: str
    message: str
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One valid request line of an input file."""

    custom_id: str
    body: dict[str, Any]


@dataclass(kw_only=True)
class StoredFile:
    """A file the simulator holds: its bytes, its owner (the bearer token hash), and for a
    batch input file its parsed lines, model, prompt tokens and the errors found in it."""

    id: str
    owner: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    lines: list[BatchLine] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    model: str | None = None
    prompt_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The ``file`` object of the Files API."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


class UploadError(Exception):
    """A multipart upload that cannot be read (a 400)."""


def multipart_fields(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a ``multipart/form-data`` body: name -> (filename, bytes)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise UploadError("the upload must be multipart/form-data")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise UploadError("the multipart body could not be read")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        fields[name] = (part.get_filename(), data)
    return fields


def check_batch_file(
    stored: StoredFile, count_tokens: Callable[[dict[str, Any]], int]
) -> StoredFile:
    """Parse a batch input file into ``stored``: its lines, model and errors (1-based lines).

    Checked as the Batch API does: JSON object per line, ``custom_id`` unique, ``method``
    POST, ``url`` the chat endpoint, a ``body`` object naming one model for the whole file.
    """
    seen: set[str] = set()
    for number, raw in enumerate(stored.data.splitlines(), start=1):
        if not raw.strip():
            continue
        error = _line_error(number, raw, seen, stored)
        if error is not None:
            stored.errors.append(error)
    if not stored.lines and not stored.errors:
        stored.errors.append(LineError(0, "empty_file", "The batch input file is empty."))
    stored.prompt_tokens = sum(count_tokens(line.body) for line in stored.lines)
    return stored


def _line_error(number: int, raw: bytes, seen: set[str], stored: StoredFile) -> LineError | None:
    try:
        item = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return LineError(number, "invalid_json_line", "This line is not parseable as valid JSON.")
    if not isinstance(item, dict):
        return LineError(number, "invalid_json_line", "This line is not a JSON object.")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        message = "Missing required parameter: 'custom_id'."
        return LineError(number, "missing_required_parameter", message, "custom_id")
    if custom_id in seen:
        message = (
            "The custom_id for this request is a duplicate of another request. The custom_id "
            "parameter must be unique for each request in a batch."
        )
        return LineError(number, "duplicate_custom_id", message, "custom_id")
    seen.add(custom_id)
    if item.get("method") != "POST":
        message = "The method provided for this request is not supported: use POST."
        return LineError(number, "invalid_method", message, "method")
    if item.get("url") != CHAT_ENDPOINT:
        message = (
            f"The URL provided for this request does not match the batch endpoint {CHAT_ENDPOINT}."
        )
        return LineError(number, "invalid_url", message, "url")
    body = item.get("body")
    if not isinstance(body, dict):
        return LineError(number, "missing_required_parameter", "Missing 'body'.", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        message = "Missing required parameter: 'body.model'."
        return LineError(number, "missing_required_parameter", message, "body.model")
    if stored.model is None:
        stored.model = model
    elif model != stored.model:
        message = (
            f"The provided model '{model}' does not match the model '{stored.model}' of the "
            "other requests in this file: a batch serves one model."
        )
        return LineError(number, "mismatched_model", message, "body.model")
    stored.lines.append(BatchLine(custom_id, body))
    return None


def window_seconds(value: Any) -> float:
    """A ``completion_window`` (``"24h"``, ``"7d"``) in seconds; ``ValueError`` otherwise."""
    found = _WINDOW.match(value) if isinstance(value, str) else None
    if found is None:
        raise ValueError("completion_window must be a duration such as '24h'")
    return int(found[1]) * (3600 if found[2] == "h" else 86400)


def batch_metadata(value: Any) -> dict[str, str] | None:
    """Metadata as OpenAI allows it: at most 16 string pairs, keys ≤ 64, values ≤ 512
    characters; ``ValueError`` otherwise."""
    if value is None:
        return None
    pairs = value.items() if isinstance(value, dict) and len(value) <= 16 else [(None, None)]
    if all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
        for k, v in pairs
    ):
        return dict(value)
    raise ValueError("metadata must be at most 16 string pairs (keys ≤ 64, values ≤ 512 chars)")
