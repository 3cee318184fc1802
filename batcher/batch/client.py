"""An async client of the Files and Batches API (OpenAI's, and the servers that copy it).

Every call retries what may clear by itself (connection errors, timeouts, 408/429/5xx,
waiting for ``retry-after`` when sent) with the same tenacity policy as online requests
(``engine.retry``). A 404 for a batch or file id is not retried: the key cannot see it (another
key or project made it), and ``NotVisibleError`` says so. A ``create`` that fails in a way that
may have reached the server looks for the batch by its metadata before trying again, so a
retry never makes a second batch. The API key never appears in an error.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import anyio
import httpx

from batcher.batch.api import Batch
from batcher.config import RetryConfig
from batcher.engine.retry import RetryableAttempt, Sleep, retry_policy
from batcher.errors import BatcherError
from batcher.http.answers import Attempt, classify, retry_after_s
from batcher.http.client import check_api_key
from batcher.http.redact import client_secrets, redact_url, scrub_json

T = TypeVar("T")
#: The endpoint batcher's batches serve.
CHAT_ENDPOINT = "/v1/chat/completions"


class BatchAPIError(BatcherError):
    """A Files or Batches API call failed for good. Exit 3: batches already created keep
    running and are journaled, so a later run resumes."""

    exit_code = 3


class ConflictError(BatchAPIError):
    """A call the batch's state refuses (409), such as cancelling a batch that has ended."""


class NotVisibleError(BatchAPIError):
    """A batch or file id the key cannot see (404): made with another key or project."""

    exit_code = 2


class BatchClient:
    """Files and Batches calls against one endpoint (``base_url`` ends in ``/v1`` or the
    like; an ``?api-version=`` query is kept on every call). Use ``async with``."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        retry: RetryConfig | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        all_headers = dict(headers or {})
        if api_key:
            check_api_key(api_key)
            all_headers["authorization"] = f"Bearer {api_key}"
        self._secrets = client_secrets(base_url, api_key, headers)
        self._base = base_url
        self._retry = retry or RetryConfig()
        self._sleep = sleep
        timeout = httpx.Timeout(self._retry.timeout_s, connect=min(30.0, self._retry.timeout_s))
        self._http = httpx.AsyncClient(
            headers=all_headers, timeout=timeout, transport=transport, follow_redirects=False
        )

    async def __aenter__(self) -> BatchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def upload(self, path: Path) -> str:
        """Upload a JSONL batch input file; returns its file id."""

        async def send() -> str:
            with path.open("rb") as f:
                files = {"file": (path.name, f, "application/jsonl")}
                reply = await self._http.post(self._url("/files"), data=_PURPOSE, files=files)
            return str(self._json(reply, f"upload of {path.name}")["id"])

        return await self._call(f"upload of {path.name}", send)

    async def create(
        self,
        input_file_id: str,
        *,
        metadata: dict[str, str],
        completion_window: str = "24h",
        endpoint: str = CHAT_ENDPOINT,
    ) -> Batch:
        """Create a batch of an uploaded file. Before a retry it lists the batches made since
        the file was uploaded (by the server's clock) and returns the one of this file
        carrying ``metadata``, if the failed attempt made it (``metadata`` must not be empty
        for that)."""
        body = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
            "metadata": metadata,
        }

        async def send() -> Batch:
            reply = await self._http.post(self._url("/batches"), json=body)
            return Batch.from_json(self._json(reply, f"batch of file {input_file_id}"))

        async def made_already() -> Batch | None:
            since = await self.file_created_at(input_file_id)
            for batch in await self.list_all(since=since):
                mine = batch.input_file_id in (None, input_file_id)
                if mine and batch.metadata and metadata.items() <= batch.metadata.items():
                    return batch
            return None

        look = made_already if metadata else None
        return await self._call(f"batch of file {input_file_id}", send, look)

    async def file_created_at(self, file_id: str) -> float:
        """When the server says a file was uploaded (Unix seconds; 0 when it does not say)."""
        what = f"file {file_id}"

        async def send() -> float:
            created = self._json(await self._http.get(self._url(f"/files/{file_id}")), what)
            value = created.get("created_at")
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            return 0.0

        return await self._call(what, send)

    async def retrieve(self, batch_id: str) -> Batch:
        """The batch as the server shows it now."""
        what = f"batch {batch_id}"

        async def send() -> Batch:
            reply = await self._http.get(self._url(f"/batches/{batch_id}"))
            return Batch.from_json(self._json(reply, what))

        return await self._call(what, send)

    async def cancel(self, batch_id: str) -> Batch:
        """Ask the server to cancel a batch (it goes through ``cancelling``)."""
        what = f"batch {batch_id}"

        async def send() -> Batch:
            reply = await self._http.post(self._url(f"/batches/{batch_id}/cancel"))
            return Batch.from_json(self._json(reply, what))

        return await self._call(what, send)

    async def list_all(self, *, since: float | None = None, page_size: int = 100) -> list[Batch]:
        """Every batch the key can see, newest first, page by page; with ``since`` (Unix
        seconds), stops at the first batch created before it."""
        found: list[Batch] = []
        after: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": page_size}
            if after is not None:
                params["after"] = after

            async def send(params: dict[str, str | int] = params) -> dict[str, Any]:
                reply = await self._http.get(self._url("/batches", params))
                return self._json(reply, "list of batches")

            page = await self._call("list of batches", send)
            data = page.get("data")
            batches = [Batch.from_json(item) for item in data] if isinstance(data, list) else []
            for batch in batches:
                if since is not None and batch.created_at < since:
                    return found
                found.append(batch)
            if not page.get("has_more") or not batches:
                return found
            after = batches[-1].id

    async def download(self, file_id: str) -> bytes:
        """A file's whole content."""
        what = f"file {file_id}"

        async def send() -> bytes:
            reply = await self._http.get(self._url(f"/files/{file_id}/content"))
            self._check(reply, what)
            return reply.content

        return await self._call(what, send)

    async def download_to(self, file_id: str, path: Path) -> None:
        """A file's content streamed to ``path`` (written to ``path.partial``, then renamed,
        so ``path`` is only ever whole)."""
        what = f"file {file_id}"
        partial = path.with_name(path.name + ".partial")

        async def send() -> None:
            async with self._http.stream("GET", self._url(f"/files/{file_id}/content")) as reply:
                if reply.status_code >= 300:
                    await reply.aread()
                self._check(reply, what)
                with partial.open("wb") as out:
                    async for chunk in reply.aiter_bytes():
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(partial, path)

        await self._call(what, send)

    def _url(self, path: str, params: dict[str, str | int] | None = None) -> str:
        """The base URL's path with ``path`` added; its query kept, ``params`` after it (httpx
        would replace the query with ``params``, losing an ``api-version``)."""
        parts = urlsplit(self._base)
        query = "&".join(q for q in (parts.query, urlencode(params or {})) if q)
        return urlunsplit(
            parts._replace(path=parts.path.rstrip("/") + path, query=query, fragment="")
        )

    async def _call(
        self,
        what: str,
        send: Callable[[], Awaitable[T]],
        before_retry: Callable[[], Awaitable[T | None]] | None = None,
    ) -> T:
        """``send`` under the retry policy; its last failure as a ``BatchAPIError``."""
        try:
            async for attempt in retry_policy(self._retry, sleep=self._sleep):
                with attempt:
                    if before_retry is not None and attempt.retry_state.attempt_number > 1:
                        earlier = await before_retry()
                        if earlier is not None:
                            return earlier
                    try:
                        return await send()
                    except httpx.RequestError as exc:  # transport, decoding, redirects
                        message = self._clean(f"{type(exc).__name__}: {exc}")
                        raise RetryableAttempt(_failed(None, "connection_error", message)) from None
                    except ValueError as exc:  # a batch object without its id or status
                        invalid = _failed(None, "invalid_response", f"an odd answer: {exc}")
                        raise RetryableAttempt(invalid) from None
        except RetryableAttempt as exc:
            failed = exc.attempt
            raise BatchAPIError(f"{what}: {failed.error_message} (gave up retrying)") from None
        raise AssertionError("unreachable: the retry policy re-raises")  # pragma: no cover

    def _json(self, reply: httpx.Response, what: str) -> dict[str, Any]:
        self._check(reply, what)
        try:
            data = reply.json()
        except ValueError:
            invalid = _failed(reply.status_code, "invalid_response", "an answer that is not JSON")
            raise RetryableAttempt(invalid) from None
        if not isinstance(data, dict):
            raise RetryableAttempt(_failed(reply.status_code, "invalid_response", "not an object"))
        return data

    def _check(self, reply: httpx.Response, what: str) -> None:
        """Raise for an answer that is not a success: retryable, invisible id, or final."""
        if 200 <= reply.status_code < 300:
            return
        attempt = classify(reply.status_code, reply.headers, reply.content, 0.0)
        message = self._clean(f"HTTP {reply.status_code} {attempt.error_code}: ")
        message += self._clean(attempt.error_message or "")
        if reply.status_code == 404 and not what.startswith(("list", "upload")):
            raise NotVisibleError(
                f"{what}: not found for this API key ({message}); it was most likely made "
                "with a different key or project: use that key to collect or cancel it"
            )
        # 409 is a state conflict here (cancelling an ended batch): asking again will not help
        if attempt.retryable and reply.status_code != 409:
            delay = retry_after_s(reply.headers)
            raise RetryableAttempt(_failed(reply.status_code, attempt.error_code, message, delay))
        if reply.status_code == 409:
            raise ConflictError(f"{what}: {message}")
        raise BatchAPIError(f"{what}: {message}")

    def _clean(self, text: str) -> str:
        """``text`` without the credentials sent (the key, the headers', the base URL's)."""
        text = scrub_json(text, self._secrets)
        return text.replace(self._base, redact_url(self._base))


_PURPOSE = {"purpose": "batch"}


def _failed(
    status: int | None, code: str | None, message: str, retry_after: float | None = None
) -> Attempt:
    return Attempt(
        ok=False,
        retryable=True,
        latency_s=0.0,
        status_code=status,
        error_code=code,
        error_message=message,
        retry_after=retry_after,
    )
