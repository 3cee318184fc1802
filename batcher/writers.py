"""Output writers: OpenAI Batch API JSONL or Parquet, written incrementally, plus a reader.

Both writers stream: JSONL goes through a buffered file, Parquet keeps at most one row group of
column lists in memory. Both write ``PATH.partial`` and ``os.replace`` it onto ``PATH`` on
``close()``, so a reader never sees a half-written file. ``read_results`` reads either format
back into the same dicts (the Parquet column names), which is what ``batcher report`` and the
round-trip tests rely on.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from operator import attrgetter
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self

import pyarrow as pa
import pyarrow.parquet as pq

from batcher import jsonfast
from batcher.errors import InputError, OutputError
from batcher.formats import SUFFIXES as SUFFIXES
from batcher.formats import Closing
from batcher.formats import RejectsWriter as RejectsWriter
from batcher.formats import output_format as output_format
from batcher.records import Result, Usage

# About 6 MB of buffered rows. Each row group also costs the writer about 30 KB of footer
# metadata held until the file closes (pyarrow has no buffered row-group mode to avoid it):
# with 2,000-row groups a 1,000,000-row output grew the process by 20 MB over a 100,000-row one,
# with 5,000 by 8 MB, while 20,000-row groups cost more in buffered rows than they save (issue 8).
DEFAULT_ROW_GROUP_SIZE = 5_000
# Rows are held as Python objects only this many at a time, then as Arrow arrays until a row
# group is full: a row group of Python rows takes about twice the memory (issue 8).
_CONVERT_EVERY = 250

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
    ("variant", _S),
])
"""The fixed Parquet schema; every output file has exactly these columns in this order."""
# fmt: on
# Dictionary encoding only where values repeat: on unique text (ids, answers, bodies) it is
# tried on every page, then given up, which cost 10 % more CPU and 6 % more bytes (issue 8).
_DICTIONARY = ["status", "model", "finish_reason", "error_code", "endpoint", "variant"]
# Min/max statistics where a reader may filter on them; not on long text (answers, bodies),
# whose values would sit in the footer, kept in memory until the file is closed.
_STATISTICS = [
    f.name for f in SCHEMA
    if f.name not in {"content", "error_message", "request_id", "metadata", "response",
                      "choices", "schema_error"}
]  # fmt: skip
_NAMES: tuple[str, ...] = tuple(SCHEMA.names)
_USAGE_KEYS = _NAMES[5:10]  # prompt_tokens .. reasoning_tokens, the Usage fields

# Compact, non-ASCII as is; default=str keeps odd values (Decimal, bytes...) from raising.
_ENCODE = jsonfast.dumps_text
_EPOCH = datetime(1970, 1, 1)  # naive: isoformat() + "Z" is cheaper than an aware isoformat
_EPOCH_UTC = _EPOCH.replace(tzinfo=UTC)
_MIN_US = round((datetime(1, 1, 2) - _EPOCH).total_seconds()) * 1_000_000
_MAX_US = round((datetime(9999, 12, 30) - _EPOCH).total_seconds()) * 1_000_000
_NO_USAGE = (None, None, None, None, None)


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


def _text(value: Any) -> str | None:
    """A string column value: strings as they are, anything else as JSON text."""
    if value is None or isinstance(value, str):
        return value
    return _ENCODE(value)


def _first_choice(body: Any) -> tuple[str | None, str | None]:
    """``(content, finish_reason)`` of the first choice; ``(None, None)`` for odd bodies."""
    if not isinstance(body, dict):
        return None, None
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None, None
    choice = choices[0]
    message = choice.get("message")
    content = _text(message.get("content")) if isinstance(message, dict) else None
    return content, _text(choice.get("finish_reason"))


def _choices(body: Any) -> list[dict[str, Any]] | None:
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
                "content": _text(message.get("content")),
                "finish_reason": _text(choice.get("finish_reason")),
                "refusal": _text(message.get("refusal")),
                "tool_calls": None if calls is None else _ENCODE(calls),
            }
        )  # fmt: skip
    return rows


_USAGE_OF = attrgetter(*_USAGE_KEYS)  # Usage's fields are named like the columns


def _usage_tuple(usage: Usage | None) -> tuple[int | None, ...]:
    return _NO_USAGE if usage is None else _USAGE_OF(usage)


def _has_response(r: Result) -> bool:
    # "No HTTP answer" means nothing of one is known; checking all three keeps the line lossless.
    return r.status_code is not None or r.body is not None or r.request_id is not None


def batch_output_line(result: Result) -> dict[str, Any]:
    """The OpenAI Batch API output line for ``result``, plus a ``batcher`` object of our fields.

    ``id`` is derived from ``custom_id`` (and the variant, if any) so reruns produce comparable
    files; ``custom_id`` stays the line's own, and ``batcher.variant`` names the variant.
    ``response`` is null only when nothing of an HTTP answer is known (no status code, body or
    request id); ``error`` is set for every ``error`` result (and whenever an error code or
    message exists). Usage stays in ``response.body.usage`` as the server sent it;
    ``batcher.usage`` appears only when the result's usage differs from what the body says, so
    nothing is lost.
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
    }
    if r.variant is not None:  # absent in a job without variants: its lines stay as they were
        extra["variant"] = r.variant
    if r.usage != Usage.from_body(r.body):
        u = r.usage
        extra["usage"] = None if u is None else dict(zip(_USAGE_KEYS, _usage_tuple(u), strict=True))
    has_error = r.status == "error" or r.error_code is not None or r.error_message is not None
    return {
        "id": "batch_req_" + digest,
        "custom_id": cid,
        "response": {"status_code": r.status_code, "request_id": r.request_id, "body": r.body}
        if _has_response(r)
        else None,
        "error": {"code": r.error_code, "message": r.error_message} if has_error else None,
        "batcher": extra,
    }


def _row_values(r: Result) -> tuple[Any, ...]:
    """One row in SCHEMA order, timestamps as integer microseconds (cheapest for pyarrow)."""
    content, finish = _first_choice(r.body)
    body = r.body
    return (
        r.custom_id,
        r.status,
        r.model,
        content,
        finish,
        *_usage_tuple(r.usage),
        _finite(r.cost_usd),
        r.attempts,
        _finite(r.latency_s),
        r.status_code,
        r.error_code,
        r.error_message,
        r.request_id,
        None if r.metadata is None else _ENCODE(r.metadata),
        None if body is None else _text(body),
        _us(r.started_at),
        _us(r.finished_at),
        r.line,
        _choices(body),
        _finite(r.ttft_s),
        r.schema_valid,
        r.schema_error,
        r.endpoint,
        r.variant,
    )


def _to_dt(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH_UTC + timedelta(microseconds=us)


def parquet_row(result: Result) -> dict[str, Any]:
    """The Parquet row for ``result`` as a dict in SCHEMA order (timestamps as aware datetimes)."""
    row = dict(zip(_NAMES, _row_values(result), strict=True))
    row["started_at"] = _to_dt(row["started_at"])
    row["finished_at"] = _to_dt(row["finished_at"])
    return row


class Writer(Protocol):
    """What the engine needs from an output writer."""

    @property
    def rows_written(self) -> int:
        """Results accepted by ``write`` so far."""
        ...

    def write(self, result: Result) -> None:
        """Append one result."""
        ...

    def close(self) -> None:
        """Finish the file and move it onto its final path; idempotent."""
        ...

    def abort(self) -> None:
        """Drop the unfinished file; whatever was at the path before stays."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class _AtomicFile(Closing):
    """Shared plumbing: the ``.partial`` path and an idempotent, atomic close."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.rows_written = 0
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        except OSError as exc:
            raise OutputError(f"cannot write {self.partial}: {exc.strerror or exc}") from exc

    def _open(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush, finish the file and atomically rename it onto ``path``; idempotent."""
        if self._closed:
            return
        self._closed = True  # even if finishing fails: a second close must not write again
        try:
            self._finish()
            os.replace(self.partial, self.path)
        except OSError as exc:
            self.partial.unlink(missing_ok=True)
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def abort(self) -> None:
        """Drop the ``.partial`` file; whatever was at ``path`` before stays untouched."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):  # the file is being thrown away anyway
            self._release()
        self.partial.unlink(missing_ok=True)

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Interrupted (Ctrl+C, a disk error, a bad record): a half-written output must never
        # replace a whole one. The journal still holds everything; the next run writes it.
        if et is None:
            self.close()
        else:
            self.abort()


class JsonlWriter(_AtomicFile):
    """Writes one compact OpenAI Batch API output line per result (UTF-8)."""

    _f: IO[str]

    def _open(self) -> None:
        # backslashreplace: a lone surrogate (possible from a JSON "\ud800" escape in the input)
        # becomes the text \ud800, which inside a JSON string is the same escape: no crash, and
        # json.loads gives the original string back.
        self._f = open(  # noqa: SIM115 - closed in _finish
            self.partial,
            "w",
            encoding="utf-8",
            errors="backslashreplace",
            newline="\n",
            buffering=1 << 16,
        )

    def write(self, result: Result) -> None:
        """Append the result's line to the buffered file."""
        self._f.write(_ENCODE(batch_output_line(result)) + "\n")
        self.rows_written += 1

    def flush(self) -> None:
        """Push buffered lines to the OS (the file is still ``.partial`` until ``close``)."""
        self._f.flush()

    def _finish(self) -> None:
        with self._f:
            self._f.flush()
            os.fsync(self._f.fileno())  # the rename must not land before the data

    def _release(self) -> None:
        self._f.close()


class ParquetWriter(_AtomicFile):
    """Writes results as Parquet (zstd) with SCHEMA, one row group every ``row_group_size``."""

    def __init__(
        self,
        path: Path,
        *,
        row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Start ``PATH.partial``; rows are buffered and written ``row_group_size`` at a time.

        ``metadata`` goes into the file's key-value metadata (provenance: job, version, input).
        """
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
        self.row_group_size = row_group_size
        self._schema = SCHEMA.with_metadata(dict(metadata)) if metadata else SCHEMA
        self._cols: list[list[Any]] = [[] for _ in _NAMES]
        self._batches: list[pa.RecordBatch] = []
        self._buffered = 0  # rows in self._batches
        super().__init__(path)

    def _open(self) -> None:
        self._pq = pq.ParquetWriter(
            self.partial,
            self._schema,
            compression="zstd",
            use_dictionary=_DICTIONARY,
            write_statistics=_STATISTICS,
        )

    def write(self, result: Result) -> None:
        """Buffer the result's row; a full buffer is written out as a row group."""
        for col, value in zip(self._cols, _row_values(result), strict=True):
            col.append(value)
        self.rows_written += 1
        if len(self._cols[0]) >= min(_CONVERT_EVERY, self.row_group_size - self._buffered):
            self._convert()
            if self._buffered >= self.row_group_size:
                self._write_group()

    def _convert(self) -> None:
        """Turn the buffered Python rows into an Arrow batch: about half the memory."""
        arrays = [_array(col, field.type) for col, field in zip(self._cols, SCHEMA, strict=True)]
        self._cols = [[] for _ in _NAMES]
        self._batches.append(pa.RecordBatch.from_arrays(arrays, schema=self._schema))
        self._buffered += len(arrays[0])

    def _write_group(self) -> None:
        table = pa.Table.from_batches(self._batches, schema=self._schema)
        self._batches, self._buffered = [], 0
        try:
            self._pq.write_table(table, row_group_size=self.row_group_size)
        except OSError as exc:
            raise OutputError(f"cannot write {self.partial}: {exc.strerror or exc}") from exc

    def _finish(self) -> None:
        try:
            if self._cols[0]:
                self._convert()
            if self._batches:
                self._write_group()
        finally:
            self._pq.close()  # with no rows this still writes a valid file with the schema
        fd = os.open(self.partial, os.O_RDONLY)
        try:
            os.fsync(fd)  # pyarrow owns its file handle, so sync by path before the rename
        finally:
            os.close(fd)

    def _release(self) -> None:
        self._pq.close()


def results_table(results: Iterable[Result], metadata: Mapping[str, str] | None = None) -> pa.Table:
    """The results as one Arrow table with exactly SCHEMA (the Ray engine's blocks)."""
    cols: list[list[Any]] = [[] for _ in _NAMES]
    for result in results:
        for col, value in zip(cols, _row_values(result), strict=True):
            col.append(value)
    schema = SCHEMA.with_metadata(dict(metadata)) if metadata else SCHEMA
    arrays = [_array(col, field.type) for col, field in zip(cols, SCHEMA, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


def rows_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows read back by ``read_results`` as one Arrow table with exactly SCHEMA; values Arrow
    refuses (a lone surrogate in an answer) are coerced as when writing."""
    cols: list[list[Any]] = [[] for _ in _NAMES]
    for row in rows:
        for col, name in zip(cols, _NAMES, strict=True):
            col.append(row.get(name))
    arrays = [_array(col, field.type) for col, field in zip(cols, SCHEMA, strict=True)]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def parquet_parts(folder: Path) -> list[Path]:
    """The finished part files of a Parquet output folder (the Ray engine's), in name order."""
    return sorted(p for p in Path(folder).glob("*.parquet") if p.is_file())


def _array(values: list[Any], type_: pa.DataType) -> pa.Array:
    """Build a column; on a value pyarrow refuses, coerce that column instead of losing rows."""
    try:
        return pa.array(values, type=type_)
    except (ValueError, TypeError, OverflowError):  # ArrowInvalid is a ValueError
        return pa.array([_coerce(v, type_) for v in values], type=type_)


def _coerce(value: Any, type_: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(type_):
        # Lone surrogates are not UTF-8: keep them as their \uXXXX escape text.
        return str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    if pa.types.is_integer(type_):
        bits = type_.bit_width - 1
        ok = isinstance(value, int) and -(1 << bits) <= value < (1 << bits)
        return value if ok else None  # e.g. a server's absurd usage count
    if pa.types.is_floating(type_):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    if pa.types.is_list(type_):  # the choices: coerce each field of each choice
        fields = type_.value_type
        return [{f.name: _coerce(item.get(f.name), f.type) for f in fields} for item in value]
    return value


def open_writer(
    path: Path,
    *,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    metadata: Mapping[str, str] | None = None,
) -> Writer:
    """Open the writer for ``path`` by its suffix; ``row_group_size`` and ``metadata`` apply to
    Parquet only (JSONL lines have no place for file-level metadata)."""
    suffix = output_format(path)
    if suffix == ".parquet":
        return ParquetWriter(path, row_group_size=row_group_size, metadata=metadata)
    return JsonlWriter(path)


def read_results(path: Path) -> Iterator[dict[str, Any]]:
    """Yield one dict per result (Parquet column names, SCHEMA order) from either format.

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
                        yield _row_from_line(jsonfast.loads_exact(text))
                    except (ValueError, TypeError, AttributeError) as exc:
                        raise InputError(f"{path}:{n}: not a batch output line ({exc})") from exc
    except (OSError, pa.ArrowException) as exc:  # missing file, or not a Parquet file
        raise InputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc


def _row_from_line(obj: dict[str, Any]) -> dict[str, Any]:
    """The Parquet-shaped dict for one batch output line (the inverse of batch_output_line)."""
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
    if isinstance(b, dict):
        status = b.get("status")
        model = b.get("model")
    else:
        failed = err is not None or (isinstance(status_code, int) and status_code >= 400)
        status = "error" if failed else "ok"
        model = body.get("model") if isinstance(body, dict) else None
        b = {}
    if "usage" in b:
        u = b["usage"]
        usage = tuple(u.get(k) for k in _USAGE_KEYS) if isinstance(u, dict) else _NO_USAGE
    else:
        usage = _usage_tuple(Usage.from_body(body))
    content, finish = _first_choice(body)
    meta = b.get("metadata")
    started, finished = b.get("started_at"), b.get("finished_at")
    values = (
        obj.get("custom_id"),
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
        resp.get("request_id"),
        None if meta is None else _ENCODE(meta),
        None if body is None else _text(body),
        None if started is None else datetime.fromisoformat(started),
        None if finished is None else datetime.fromisoformat(finished),
        b.get("line"),
        _choices(body),
        b.get("ttft_s"),
        b.get("schema_valid"),
        b.get("schema_error"),
        b.get("endpoint"),
        b.get("variant"),
    )
    return dict(zip(_NAMES, values, strict=True))
