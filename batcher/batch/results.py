"""Output- and error-file lines read back into ``Result`` records, and batches adopted by
their metadata.

A line's HTTP answer is judged exactly as an online answer is (``http.answers.classify``): a
200 with choices is ``ok``; a 200 without them, a 429, 5xx... is a retryable error; another 4xx
is final. A line with no HTTP answer (``batch_expired``, ``batch_cancelled``) was not
answered: the request goes into a later batch without counting an attempt. Usage is the
server's, as reported; cost is left to the caller (the batch price).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batcher import jsonfast
from batcher.batch.api import Batch
from batcher.batch.chunks import CHUNK_FIELD, JOB_FIELD, Chunk
from batcher.http.answers import classify
from batcher.records import Request, Result, Usage

#: Error codes of lines a batch never ran: sent again, not counted as an attempt.
NOT_RUN = frozenset({"batch_expired", "batch_cancelled"})


@dataclass(frozen=True, slots=True)
class BatchAnswer:
    """One request's outcome in a batch. ``answered``: the batch ran it (else it expired or
    was cancelled first); ``retryable``: a failure worth another batch."""

    result: Result
    batch_id: str
    answered: bool
    retryable: bool


@dataclass(frozen=True, slots=True)
class ReadBack:
    """What a batch's files said: answers by line id, lines naming no request of the chunk,
    and the chunk's requests no line mentions (to be sent again)."""

    answers: dict[str, BatchAnswer]
    strays: list[str]
    missing: list[Request]


def read_back(
    chunk: Chunk, batch: Batch, files: Iterable[bytes | Path], *, attempt: int = 1
) -> ReadBack:
    """Parse the lines of a batch's output and error files (in any order) for ``chunk``:
    their contents, or their paths (read a line at a time).

    A request answered by two lines keeps the first ``ok`` one (else the first). ``attempt``
    is the request's attempt number this batch was.
    """
    wanted = chunk.by_custom_id()
    answers: dict[str, BatchAnswer] = {}
    strays: list[str] = []
    for number, raw in _lines(files):
        try:
            item = jsonfast.loads_answer(raw)
        except ValueError:
            strays.append(f"line {number}: not JSON")
            continue
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        request = wanted.get(custom_id) if isinstance(custom_id, str) else None
        if request is None or not isinstance(custom_id, str):
            strays.append(str(custom_id))
            continue
        answer = answer_of(request, item, batch, attempt=attempt)
        kept = answers.get(custom_id)
        if kept is None or (kept.result.status != "ok" and answer.result.status == "ok"):
            answers[custom_id] = answer
    missing = [request for cid, request in wanted.items() if cid not in answers]
    return ReadBack(answers, strays, missing)


def answer_of(
    request: Request, item: Mapping[str, Any], batch: Batch, *, attempt: int
) -> BatchAnswer:
    """One output or error line as the request's outcome."""
    response = item.get("response")
    error = item.get("error")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        status = response["status_code"]
        body = response.get("body")
        judged = classify(status, {}, jsonfast.dumps(body) if body is not None else b"", 0.0)
        message = judged.error_message
        if not judged.ok and isinstance(error, str) and error:  # vLLM puts its error here
            message = error
        result = _result(
            request,
            batch,
            attempt,
            ok=judged.ok,
            status_code=status,
            request_id=_str(response.get("request_id")),
            body=judged.body,
            code=judged.error_code,
            message=message,
        )
        return BatchAnswer(result, batch.id, answered=True, retryable=judged.retryable)
    code, message = "batch_error", "the batch gave no answer for this request"
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
    elif isinstance(error, str) and error:
        message = error
    not_run = code in NOT_RUN
    result = _result(request, batch, attempt, ok=False, code=code, message=message)
    return BatchAnswer(result, batch.id, answered=not not_run, retryable=not_run)


def adopt(chunks: Sequence[Chunk], batches: Iterable[Batch], *, job: str) -> dict[str, Batch]:
    """The batch each chunk already has, found by the metadata it was created with (the
    newest, if a chunk was submitted again after its batch failed). A batch created just
    before a crash, before the state journal knew of it, is found here and not made again."""
    keys = {chunk.key for chunk in chunks}
    found: dict[str, Batch] = {}
    for batch in batches:
        meta = batch.metadata or {}
        key = meta.get(CHUNK_FIELD)
        if key not in keys or key is None or meta.get(JOB_FIELD) != job[:512]:
            continue
        if key not in found or batch.created_at > found[key].created_at:
            found[key] = batch
    return found


def _result(
    request: Request,
    batch: Batch,
    attempt: int,
    *,
    ok: bool,
    status_code: int | None = None,
    request_id: str | None = None,
    body: Any = None,
    code: str | None = None,
    message: str | None = None,
) -> Result:
    model = body.get("model") if ok and isinstance(body, dict) else None
    if not isinstance(model, str):
        asked = request.body.get("model")
        model = asked if isinstance(asked, str) else None
    n = request.body.get("n")
    return Result(
        custom_id=request.custom_id,
        line=request.line,
        status="ok" if ok else "error",
        model=model,
        attempts=attempt,
        latency_s=0.0,
        started_at=batch.created_at,
        finished_at=batch.ended_at or batch.created_at,
        status_code=status_code,
        request_id=request_id,
        body=body,
        usage=Usage.from_body(body) if ok else None,
        error_code=code,
        error_message=message,
        metadata=request.metadata,
        variant=request.variant,
        choices_asked=n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else None,
        batch_id=batch.id,
        messages=request.body.get("messages"),
        input=request.input,
    )


def _lines(files: Iterable[bytes | Path]) -> Iterator[tuple[int, bytes]]:
    for data in files:
        if isinstance(data, Path):
            with data.open("rb") as f:
                yield from _numbered(f)
        else:
            yield from _numbered(data.splitlines())


def _numbered(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(lines, start=1):
        if raw.strip():
            yield number, raw


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
