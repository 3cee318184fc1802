"""The simulator's Files and Batches API, served as OpenAI serves it.

``POST /v1/files`` (multipart, ``purpose=batch``), ``GET /v1/files/{id}`` and its
``/content``; ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches`` (newest
first, ``limit``/``after``, ``has_more``) and ``POST /v1/batches/{id}/cancel``. A batch moves
through its statuses on the service's clock (``batch_timeline``); its answers are the
simulator's own chat answers, so a batch answers exactly what the online route would. Files
and batches belong to the bearer token that made them: another token gets a 404, as another
key or project does on OpenAI. ``BatchSimConfig`` sets the stage durations, the per-request
error rate, an expiry window, failed uploads and the enqueued-token limit.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from batcher.sim.batch_files import (
    CHAT_ENDPOINT,
    LineError,
    StoredFile,
    UploadError,
    batch_metadata,
    check_batch_file,
    multipart_fields,
    window_seconds,
)
from batcher.sim.batch_output import (
    REQUEST_ERRORS,
    Answer,
    file_lines,
    new_id,
    plan_outcomes,
    prompt_tokens,
)
from batcher.sim.batch_timeline import TERMINAL, Durations, SimBatch, over_token_limit
from batcher.sim.faults import error_body
from batcher.sim.wire import Response, Scope

#: Paths this module serves (with or without the ``/v1`` prefix).
PREFIXES = ("/v1/files", "/v1/batches", "/files", "/batches")


@dataclass(frozen=True, kw_only=True)
class BatchSimConfig:
    """How simulated batches behave. ``window_s`` overrides the window a batch asks for
    (``completion_window``), so expiry can be shown in seconds; ``error_rate`` is drawn per
    request from ``error_kinds`` (HTTP statuses); the first ``fail_uploads`` uploads answer
    500; ``enqueued_token_limit`` caps the prompt tokens of a key's active batches per model."""

    validating_s: float = 1.0
    in_progress_s: float = 2.0
    finalizing_s: float = 1.0
    cancelling_s: float = 1.0
    window_s: float | None = None
    error_rate: float = 0.0
    error_kinds: tuple[str, ...] = ("500", "429", "400")
    seed: int = 0
    fail_uploads: int = 0
    enqueued_token_limit: int | None = None
    scope_by_key: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be within [0, 1], got {self.error_rate!r}")
        unknown = [kind for kind in self.error_kinds if kind not in REQUEST_ERRORS]
        if unknown or not self.error_kinds:
            raise ValueError(f"error_kinds must be some of {sorted(REQUEST_ERRORS)}")


class BatchService:
    """Files and batches in memory; ``handle`` answers one request. ``config`` and ``clock``
    (Unix seconds) may be replaced at any time, by a test say."""

    def __init__(
        self,
        answer: Answer,
        config: BatchSimConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.answer = answer
        self.config = config or BatchSimConfig()
        self.clock = clock
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, SimBatch] = {}
        self.created = 0
        self.uploads = 0
        self.uploads_failed = 0

    def stats(self) -> dict[str, dict[str, int]]:
        """What ``/stats`` adds, under ``batches``: batches created, files uploaded, uploads
        failed on purpose."""
        counts = {
            "created": self.created,
            "files_uploaded": self.uploads,
            "uploads_failed": self.uploads_failed,
        }
        return {"batches": counts}

    async def handle(self, scope: Scope, body: bytes) -> Response:
        """Answer ``scope``'s request (its whole ``body`` read)."""
        method: str = scope["method"]
        parts = scope["path"].removeprefix("/v1").strip("/").split("/")
        owner = self._owner(scope)
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        try:
            match (method, parts):
                case ("POST", ["files"]):
                    return self._upload(owner, _header(scope, b"content-type"), body)
                case ("GET", ["files", file_id]):
                    return _ok(self._file(owner, file_id).as_dict())
                case ("GET", ["files", file_id, "content"]):
                    data = self._file(owner, file_id).data
                    return Response(200, data, [], b"application/octet-stream")
                case ("POST", ["batches"]):
                    return self._create(owner, body)
                case ("GET", ["batches"]):
                    return self._list(owner, query)
                case ("GET", ["batches", batch_id]):
                    return _ok(self._view(self._batch(owner, batch_id)))
                case ("POST", ["batches", batch_id, "cancel"]):
                    return self._cancel(self._batch(owner, batch_id))
        except _Refusal as refusal:
            return refusal.response
        return _error(404, f"Invalid URL ({method} {scope['path']})")

    def _owner(self, scope: Scope) -> str:
        if not self.config.scope_by_key:
            return ""
        token = _header(scope, b"authorization").removeprefix("Bearer ").strip()
        return hashlib.sha256(token.encode()).hexdigest()

    def _upload(self, owner: str, content_type: str, body: bytes) -> Response:
        if self.uploads_failed < self.config.fail_uploads:
            self.uploads_failed += 1
            message = "The server had an error while processing your request."
            return Response(500, error_body(message, "server_error"), [])
        try:
            fields = multipart_fields(content_type, body)
        except UploadError as exc:
            raise _Refusal(_error(400, str(exc))) from None
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if purpose != "batch":
            raise _Refusal(_error(400, f"purpose must be 'batch', got {purpose!r}", "purpose"))
        if "file" not in fields:
            raise _Refusal(_error(400, "Missing required parameter: 'file'.", "file"))
        filename, data = fields["file"]
        stored = StoredFile(
            id=new_id("file-"),
            owner=owner,
            filename=filename or "upload.jsonl",
            purpose="batch",
            data=data,
            created_at=int(self.clock()),
        )
        self.files[stored.id] = check_batch_file(stored, prompt_tokens)
        self.uploads += 1
        return _ok(stored.as_dict())

    def _file(self, owner: str, file_id: str) -> StoredFile:
        self._settle_all()
        stored = self.files.get(file_id)
        if stored is None or stored.owner != owner:
            raise _Refusal(_error(404, f"No such File object: {file_id}", "id"))
        return stored

    def _batch(self, owner: str, batch_id: str) -> SimBatch:
        batch = self.batches.get(batch_id)
        if batch is None or batch.owner != owner:
            raise _Refusal(_error(404, f"No batch found with id '{batch_id}'.", "batch_id"))
        return batch

    def _create(self, owner: str, raw: bytes) -> Response:
        try:
            request = json.loads(raw)
        except ValueError:
            raise _Refusal(_error(400, "The body is not valid JSON.")) from None
        if not isinstance(request, dict):
            raise _Refusal(_error(400, "The body must be a JSON object."))
        stored = self._file(owner, str(request.get("input_file_id")))
        if request.get("endpoint") != CHAT_ENDPOINT:
            raise _Refusal(_error(400, f"endpoint must be {CHAT_ENDPOINT!r}", "endpoint"))
        window = str(request.get("completion_window"))
        try:
            window_s = window_seconds(window)
        except ValueError as exc:
            raise _Refusal(_error(400, str(exc), "completion_window")) from None
        try:
            metadata = batch_metadata(request.get("metadata"))
        except ValueError as exc:
            raise _Refusal(_error(400, str(exc), "metadata")) from None
        now = self.clock()
        config = self.config
        durations = Durations(
            config.validating_s, config.in_progress_s, config.finalizing_s, config.cancelling_s
        )
        batch = SimBatch(
            id=new_id("batch_"),
            seq=self.created,
            owner=owner,
            file=stored,
            endpoint=CHAT_ENDPOINT,
            completion_window=window,
            window_s=config.window_s if config.window_s is not None else window_s,
            metadata=metadata,
            created_at=now,
            durations=durations,
            outcomes=plan_outcomes(
                stored.lines,
                error_rate=config.error_rate,
                error_kinds=config.error_kinds,
                seed=f"{config.seed}-batch-{self.created}",
            ),
            refused=self._over_limit(owner, stored, now),
        )
        self.batches[batch.id] = batch
        self.created += 1
        return _ok(self._view(batch))

    def _over_limit(self, owner: str, stored: StoredFile, now: float) -> list[LineError]:
        limit = self.config.enqueued_token_limit
        if limit is None or stored.errors:
            return []
        mine = (batch for batch in self.batches.values() if batch.owner == owner)
        return over_token_limit(mine, stored, now, limit)

    def _list(self, owner: str, query: dict[str, str]) -> Response:
        try:
            limit = max(1, min(100, int(query.get("limit", "20"))))
        except ValueError:
            raise _Refusal(_error(400, "limit must be an integer", "limit")) from None
        mine = sorted(
            (batch for batch in self.batches.values() if batch.owner == owner),
            key=lambda batch: (batch.created_at, batch.seq),
            reverse=True,
        )
        after = query.get("after")
        if after is not None:
            ids = [batch.id for batch in mine]
            mine = mine[ids.index(after) + 1 :] if after in ids else []
        page = [self._view(batch) for batch in mine[:limit]]
        return _ok(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(mine) > limit,
            }
        )

    def _cancel(self, batch: SimBatch) -> Response:
        now = self.clock()
        status = batch.status(now)
        if status in TERMINAL:
            return _error(409, f"Cannot cancel a batch with status '{status}'.", code="conflict")
        if batch.cancel_at is None:
            batch.cancel_at = now
        return _ok(self._view(batch))

    def _view(self, batch: SimBatch) -> dict[str, Any]:
        now = self.clock()
        self._settle(batch, now)
        return batch.as_dict(now)

    def _settle_all(self) -> None:
        now = self.clock()
        for batch in self.batches.values():
            self._settle(batch, now)

    def _settle(self, batch: SimBatch, now: float) -> None:
        """Write the output and error files of a batch that has ended with answers."""
        status = batch.status(now)
        if batch.files_made or status not in ("completed", "expired", "cancelled"):
            return
        batch.files_made = True
        reason = "batch_expired" if status == "expired" else "batch_cancelled"
        outputs, errors = file_lines(
            batch.file.lines,
            batch.outcomes,
            batch.done(now),
            reason,
            self.answer,
            shuffle_seed=batch.id,
        )
        batch.output_file_id = self._output_file(batch, outputs, "output")
        batch.error_file_id = self._output_file(batch, errors, "error")

    def _output_file(self, batch: SimBatch, lines: list[bytes], kind: str) -> str | None:
        if not lines:
            return None
        stored = StoredFile(
            id=new_id("file-"),
            owner=batch.owner,
            filename=f"{batch.id}_{kind}.jsonl",
            purpose="batch_output",
            data=b"\n".join(lines) + b"\n",
            created_at=int(self.clock()),
        )
        self.files[stored.id] = stored
        return stored.id


class _Refusal(Exception):
    """An error answer, raised from deep inside a route."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


def _ok(payload: dict[str, Any]) -> Response:
    return Response(200, json.dumps(payload, separators=(",", ":")).encode(), [])


def _error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> Response:
    kind = "invalid_request_error"
    return Response(status, error_body(message, kind, code, param), [])
