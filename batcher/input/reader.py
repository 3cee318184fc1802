"""Streams JSONL input into ``Request``s and ``Reject``s, one line at a time (flat memory).

Three input forms are recognised per line:

1. an OpenAI Batch API line ``{"custom_id", "method", "url", "body": {...}}``;
2. a request body ``{"messages": [...], ...request fields, "metadata"?, "custom_id"?}``;
3. a prompt ``{"prompt": "text", "system"?: "text", "custom_id"?, ...request fields}``.

The job's request defaults are merged under each body (the line wins). Ids come from
``custom_id`` (or ``id``), else ``line-N``. Blank lines are skipped silently; every other line
that cannot become a request is a ``Reject`` with its 1-based line number and a one-line reason.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from batcher import jsonfast
from batcher.errors import INPUT_UNREADABLE, InputError
from batcher.input.idset import IdSet
from batcher.input.sources import open_input
from batcher.output.body_hash import request_hash
from batcher.records import Reject, Request

if TYPE_CHECKING:
    from batcher.config import VariantConfig
    from batcher.input.field_names import FieldNames
from batcher.input.requests import (
    apply_variant,
    completion_budget,
    estimate_prompt_tokens,
    field_problem,
    merge_defaults,
    messages_problem,
    with_stream_usage,
    with_system,
)

_BOM = b"\xef\xbb\xbf"
_ID_KEYS = ("custom_id", "id")


class LineError(Exception):
    """Why one line was rejected (internal: becomes a ``Reject``)."""


def load_first_encoding(path: Path, defaults: Mapping[str, Any], encoding: str | None) -> None:
    """Parse the input's first non-blank line, which loads the token tables it needs.

    Loading ``o200k_base`` needs about 70 MB for a moment (tiktoken's Python copy of the table
    and the tokenizer built from it). Done before the HTTP client and the rest are imported,
    that happens while the process is small instead of on top of them (peak RSS).
    Does nothing for stdin, an unreadable input or a first line that is not a request: the
    tables then load with the first request, as they would anyway.
    """
    from batcher.input.table_files import input_form

    if str(path) == "-" or input_form(path) != "jsonl":
        return  # a table's first request is made from a template: it loads them then
    try:
        with open_input(path) as stream:
            for line in stream:
                raw = line.removeprefix(_BOM).rstrip(b"\r\n")
                if raw.strip():
                    parse_line(raw, 1, defaults, encoding)
                    return
    except (OSError, EOFError, zlib.error, InputError):
        return


class Reader:
    """Iterates an input stream, yielding a ``Request`` or a ``Reject`` per non-blank line.

    Duplicate ids are rejected here, since only the reader sees every line in order. With a
    ``variant`` every request is that variant's (a job with variants reads its input once per
    variant). ``count_tokens=False`` leaves prompts uncounted, for a run where no limit needs
    the counts (loading a token table costs 0.1-0.25 s and about 45 MB). With ``fields``,
    ``warn`` is called (in the reading thread) with a warning for each near-miss field name,
    the first time a line carries it (see ``field_names``). ``system`` (the job's) is put
    first in every request that has no system message. ``first_line`` and ``seen`` read a
    later file of several as if joined to the earlier ones: its lines (and the ids made from
    them) number on from ``first_line``, and its ids are checked against ``seen`` (the earlier
    files' ids; its owner closes it).
    """

    def __init__(
        self,
        stream: IO[bytes],
        defaults: Mapping[str, Any] | None = None,
        *,
        encoding: str | None = None,
        variant: VariantConfig | None = None,
        count_tokens: bool = True,
        fields: FieldNames | None = None,
        warn: Callable[[str], object] | None = None,
        system: str | None = None,
        first_line: int = 1,
        seen: IdSet | None = None,
    ) -> None:
        self._stream = stream
        # a later file of several read as one: its lines number on, its ids are checked
        # against the earlier files' (``seen``, shared and closed by its owner)
        self._first = first_line
        self._own_seen = seen is None
        self._system = system
        self._fields = fields if warn is not None else None
        self._warn = warn
        self._count = count_tokens
        self._defaults = dict(defaults or {})
        self._encoding = encoding
        self._variant = variant
        self._seen = IdSet() if seen is None else seen
        self.lines_read = first_line - 1
        self.blank_lines = 0

    def count_from_now(self) -> None:
        """Count the prompts of the lines read from now on (a token limit appeared mid-run).

        Called from the event loop while this reader may be iterating in its thread: one
        attribute, read once a line."""
        self._count = True

    def __iter__(self) -> Iterator[Request | Reject]:
        try:
            for item, raw in self._items():
                if isinstance(item, Request) and not self._seen.add(item.custom_id):
                    item = Reject(
                        line=item.line,
                        reason=f"duplicate id {item.custom_id!r} (ids must be unique)",
                        text=_text(raw) if raw is not None else jsonfast.dumps_text(item.input),
                        custom_id=item.custom_id,
                    )
                elif isinstance(item, Request) and self._fields is not None and self._warn:
                    for message in self._fields.warnings(item.body, f"first on line {item.line}"):
                        self._warn(message)
                yield item
        finally:
            if self._own_seen:
                self._seen.close()  # its temporary database, if it has one

    def _items(self) -> Iterator[tuple[Request | Reject, bytes | None]]:
        """Each non-blank line parsed, with the line itself (for a duplicate's reject).

        A table's reader (``batcher.input.tabular``) yields its rows here instead, with
        ``None`` for the line (its reject text is the row's JSON)."""
        for line_no, raw in enumerate(_checked(self._stream), start=self._first):
            self.lines_read = line_no
            if line_no == self._first and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                self.blank_lines += 1
                continue
            raw = raw.rstrip(b"\r\n")
            item = parse_line(
                raw,
                line_no,
                self._defaults,
                self._encoding,
                self._variant,
                count=self._count,
                system=self._system,
            )
            yield item, raw

    def batches(self, size: int, *, first: int | None = None) -> Iterator[list[Request | Reject]]:
        """The same items in lists of up to ``size`` (to cross a thread boundary cheaply).

        With ``first``, the lists start that long and double up to ``size``: the first requests
        go out while the next lines are read, a few at a time
        (see ``runner.lanes.FIRST_READ_BATCH``).
        """
        if size < 1 or (first is not None and first < 1):
            raise ValueError(f"batch sizes must be >= 1, got {size} and {first}")
        batch: list[Request | Reject] = []
        limit = size if first is None else min(first, size)
        try:
            for item in self:
                batch.append(item)
                if len(batch) >= limit:
                    yield batch
                    batch = []
                    limit = min(2 * limit, size)
        except InputError:
            if batch:
                yield batch  # the lines read before the error still count
            raise
        if batch:
            yield batch


def _checked(stream: IO[bytes]) -> Iterator[bytes]:
    """The stream's lines; a read or decompression error becomes an ``InputError``."""
    lines = iter(stream)
    count = 0
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt .gz, say
            raise InputError(f"{INPUT_UNREADABLE} {count}: {exc}") from None
        count += 1
        yield raw


def parse_line(
    raw: bytes,
    line_no: int,
    defaults: Mapping[str, Any],
    encoding: str | None = None,
    variant: VariantConfig | None = None,
    *,
    count: bool = True,
    system: str | None = None,
) -> Request | Reject:
    """Turn one raw line (without duplicate check) into a ``Request`` or a ``Reject``.

    ``count=False`` leaves the prompt's tokens uncounted (``prompt_tokens`` is ``None``).
    ``system`` is put first when the line has no system message.

    The line is checked as it stands (over the defaults) before a ``variant`` is applied, so a
    bad line is rejected alike in every variant (the rare clash of a variant's field with the
    line's is rejected with the variant named).
    """
    custom_id: str | None = None
    try:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LineError(f"invalid UTF-8 at byte {exc.start}") from None
        obj = _loads(text, raw)
        if not isinstance(obj, dict):
            raise LineError(f"not a JSON object (got {_json_kind(obj)})")
        custom_id = _custom_id(obj, line_no)
        if jsonfast.too_deep(obj, text):
            raise LineError(jsonfast.TOO_DEEP)  # the journal and the output could not hold it
        body, metadata = _body_of(obj)
        return request_of(
            body,
            custom_id=custom_id,
            line_no=line_no,
            defaults=defaults,
            encoding=encoding,
            variant=variant,
            count=count,
            system=system,
            metadata=metadata,
            messages_checked=True,  # by _body_of
        )
    except LineError as exc:
        return Reject(line=line_no, reason=str(exc), text=_text(raw), custom_id=custom_id)


def request_of(
    body: Mapping[str, Any],
    *,
    custom_id: str,
    line_no: int,
    defaults: Mapping[str, Any],
    encoding: str | None = None,
    variant: VariantConfig | None = None,
    count: bool = True,
    system: str | None = None,
    metadata: dict[str, Any] | None = None,
    row: dict[str, Any] | None = None,
    messages_checked: bool = False,
) -> Request:
    """A line's (or a row's) request ``body`` checked and completed: the defaults under it,
    the job's ``system`` first when it has none, then the ``variant``; ``LineError`` when it
    cannot be sent. ``row`` becomes ``Request.input``; ``messages_checked``: the body's
    ``messages`` were checked already (``messages_problem``), as a line's are."""
    body = merge_defaults(defaults, body)
    if "messages" not in body:
        raise LineError("no 'messages' (nor 'prompt')")
    problem = field_problem(body, messages=not messages_checked)
    if problem:
        raise LineError(f"{problem[0]}: {problem[1]}")
    if system:
        body = with_system(body, system)
    if variant is not None:
        body = apply_variant(body, variant.request, variant.system)
        problem = field_problem(body)
        if problem:  # only the variant's fields with the line's: stream_options, say
            raise LineError(f"{problem[0]}: {problem[1]} (variant {variant.name})")
    if "model" not in body:
        where = "" if variant is None else f" (variant {variant.name})"
        raise LineError(
            f"no model{where}: set model in the line, in the job's [request], or --model"
        )
    body = with_stream_usage(body)
    return Request(
        custom_id=custom_id,
        line=line_no,
        body=body,
        metadata=metadata,
        prompt_tokens=estimate_prompt_tokens(body, encoding) if count else None,
        completion_budget=completion_budget(body),
        body_hash=request_hash(body),
        variant=None if variant is None else variant.name,
        input=row,
    )


#: Each byte as ``0`` (an ASCII digit) or a space, to look for a run of 19 digits.
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_NINETEEN_DIGITS = b"0" * 19


def _loads(text: str, raw: bytes | None = None) -> Any:
    """A line's JSON value, exactly as ``json.loads(text)`` reads it (``jsonfast.loads_exact``);
    ``LineError`` when it is not JSON. ``raw``: the line's bytes, when at hand (faster)."""
    try:
        if raw is None:
            return jsonfast.loads_exact(text, parse_constant=_no_constant)
        return _loads_bytes(raw, text)
    except json.JSONDecodeError as exc:
        msg = exc.msg.removesuffix(" at")
        raise LineError(f"invalid JSON: {msg} at column {exc.colno}") from None
    except RecursionError:
        raise LineError(jsonfast.TOO_DEEP) from None


def _loads_bytes(raw: bytes, text: str) -> Any:
    """``jsonfast.loads_exact`` of the line ``raw`` (decoded: ``text``): orjson on the bytes,
    unless they hold a run of 19 digits (a number that may not fit in 64 bits) or orjson
    refuses them; then the standard library on the text, whose errors name the column. The
    digit run is looked for in the bytes: mapping each byte costs a quarter of a regex scan of
    the text."""
    if _NINETEEN_DIGITS not in raw.translate(_DIGITS_AS_ZEROS):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # NaN, deep nesting, a lone surrogate escape: or a real error
    return json.loads(text, parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise LineError(f"invalid JSON: {name} is not allowed")


def _custom_id(obj: Mapping[str, Any], line_no: int) -> str:
    for key in _ID_KEYS:
        if key in obj and obj[key] is not None:
            value = obj[key]
            if isinstance(value, bool) or not isinstance(value, str | int):
                # integers are taken (as their text): say so, and show a number that is not one
                got = repr(value) if isinstance(value, float) else _json_kind(value)
                raise LineError(f"{key} must be a string or an integer, got {got}")
            value = str(value)
            if not value:
                raise LineError(f"{key} must not be empty")
            _check_unicode(key, value)
            return value
    return f"line-{line_no}"


def _check_unicode(key: str, value: str) -> None:
    """Refuse an id holding a lone surrogate (from a ``"\\ud800"`` escape): it is no text
    and cannot be written as UTF-8, and its stand-in ``\\ud800`` would make two ids one."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = f"\\u{ord(value[exc.start]):04x}"
        raise LineError(
            f"{key} is not valid Unicode: lone surrogate {char} at character {exc.start + 1}"
        ) from None


def _body_of(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Recognise the line's form; return the request body and the line's metadata."""
    if "body" in obj and ("url" in obj or "method" in obj or "messages" not in obj):
        return _batch_body(obj), None
    rest = {k: v for k, v in obj.items() if k not in _ID_KEYS}
    metadata = rest.pop("metadata", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise LineError(f"metadata must be an object, got {_json_kind(metadata)}")
    if "messages" in rest:
        problem = messages_problem(rest["messages"])
        if problem:
            raise LineError(f"messages: {problem}")
        return rest, metadata
    if "prompt" in rest:
        return _prompt_body(rest), metadata
    raise LineError("no 'messages', 'prompt' or 'body': not a recognised input form")


def _batch_body(obj: Mapping[str, Any]) -> dict[str, Any]:
    method = obj.get("method", "POST")
    if method != "POST":
        raise LineError(f"method must be POST, got {method!r}")
    url = obj.get("url", "/v1/chat/completions")
    if not isinstance(url, str) or not url.rstrip("/").endswith("/chat/completions"):
        raise LineError(f"url {url!r} is not supported (only /v1/chat/completions)")
    body = obj["body"]
    if not isinstance(body, dict):
        raise LineError(f"body must be an object, got {_json_kind(body)}")
    if "messages" not in body:
        raise LineError("body has no 'messages'")
    problem = messages_problem(body["messages"])
    if problem:
        raise LineError(f"messages: {problem}")
    return dict(body)


def _prompt_body(rest: dict[str, Any]) -> dict[str, Any]:
    prompt = rest.pop("prompt")
    system = rest.pop("system", None)
    if not isinstance(prompt, str) or not prompt:
        raise LineError("prompt must be a non-empty string")
    if system is not None and not isinstance(system, str):
        raise LineError(f"system must be a string, got {_json_kind(system)}")
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return {"messages": messages, **rest}


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _text(raw: bytes) -> str:
    # Rejects keep the whole line (decoded leniently) so the user can fix and re-run it.
    return raw.rstrip(b"\r\n").decode("utf-8", "replace")
