"""The Batches API client against the simulator on a loopback socket: retries of transient
failures, a 404 under another key, a create whose answer was lost, paging, downloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batcher.batch.client import BatchAPIError, BatchClient, ConflictError, NotVisibleError
from batcher.config import RetryConfig
from batcher.sim.app import Simulator
from batcher.sim.batches import BatchSimConfig
from tests.batch_sim import KEY, OTHER_KEY, batch_sim, lines_of, request_line
from tests.helpers import free_port
from tests.loopback import json_app, serving

pytestmark = pytest.mark.anyio
FAST = RetryConfig(max_attempts=4, backoff_initial_s=0.01, backoff_max_s=0.02, timeout_s=10)


class Sleeps:
    """A sleep that records its waits and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def client(base_url: str, sleeps: Sleeps, key: str = KEY) -> BatchClient:
    return BatchClient(base_url, api_key=key, retry=FAST, sleep=sleeps)


def input_file(tmp_path: Path, n: int = 3) -> Path:
    path = tmp_path / "chunk.jsonl"
    path.write_text("".join(request_line(f"q{i}", f"q {i}") + "\n" for i in range(n)))
    return path


async def test_an_upload_that_fails_twice_then_succeeds(tmp_path: Path) -> None:
    sleeps = Sleeps()
    with batch_sim(BatchSimConfig(fail_uploads=2)) as sim:
        async with client(sim.base_url, sleeps) as api:
            file_id = await api.upload(input_file(tmp_path))
            assert await api.download(file_id) == input_file(tmp_path).read_bytes()
        assert sim.stats()["batches"]["uploads_failed"] == 2
        assert sim.stats()["batches"]["files_uploaded"] == 1
    assert len(sleeps.waits) == 2


async def test_a_batch_of_another_key_is_reported_and_not_retried(tmp_path: Path) -> None:
    sleeps = Sleeps()
    with batch_sim() as sim:
        async with (
            client(sim.base_url, sleeps) as mine,
            client(sim.base_url, sleeps, OTHER_KEY) as theirs,
        ):
            file_id = await mine.upload(input_file(tmp_path))
            batch = await mine.create(file_id, metadata={"batcher_chunk": "c1"})
            with pytest.raises(NotVisibleError) as caught:
                await theirs.retrieve(batch.id)
            with pytest.raises(NotVisibleError):
                await theirs.cancel(batch.id)
            with pytest.raises(NotVisibleError):
                await theirs.download(file_id)
    message = str(caught.value)
    assert batch.id in message and "different key or project" in message
    assert OTHER_KEY not in message and KEY not in message
    assert sleeps.waits == []


async def test_connection_refused_is_retried_then_reported_without_the_key() -> None:
    sleeps = Sleeps()
    url = f"http://127.0.0.1:{free_port()}/v1"
    async with client(url, sleeps) as api:
        with pytest.raises(BatchAPIError) as caught:
            await api.retrieve("batch_abc")
    assert len(sleeps.waits) == FAST.max_attempts - 1
    assert "batch batch_abc" in str(caught.value) and "gave up" in str(caught.value)
    assert KEY not in str(caught.value)


def flaky(sim: Simulator, faults: list[tuple[str, str, int, dict[str, str]]]) -> Any:
    """An ASGI app in front of ``sim``: the next request matching each fault's method and
    path prefix gets that status. A "lost" status forwards the request first (the server
    acts on it) and then answers the status instead of the server's answer."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for fault in faults:
                method, prefix, status, headers = fault
                if scope["method"] == method and scope["path"].startswith(prefix):
                    faults.remove(fault)
                    if headers.pop("x-lost", None):
                        await sim(scope, receive, _discard)
                    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
                    await send({"type": "http.response.start", "status": status, "headers": raw})
                    await send({"type": "http.response.body", "body": b'{"error": "injected"}'})
                    return
        await sim(scope, receive, send)

    return app


async def _discard(message: Any) -> None:
    return None


async def test_429_waits_for_retry_after(tmp_path: Path) -> None:
    sleeps = Sleeps()
    with batch_sim() as sim:
        faults = [("GET", "/v1/batches", 429, {"retry-after": "7"})]
        with serving(flaky(sim.handle.simulator, faults)) as url:
            async with client(url, sleeps) as api:
                assert await api.list_all() == []
    assert sleeps.waits == [7.0]


@pytest.mark.parametrize("lost", [True, False])
async def test_a_create_that_failed_makes_one_batch(tmp_path: Path, lost: bool) -> None:
    """Whether the failed attempt made the batch (its answer lost) or not, one batch."""
    sleeps = Sleeps()
    with batch_sim() as sim:
        faults = [("POST", "/v1/batches", 502, {"x-lost": "1"} if lost else {})]
        with serving(flaky(sim.handle.simulator, faults)) as url:
            async with client(url, sleeps) as api:
                file_id = await api.upload(input_file(tmp_path))
                batch = await api.create(file_id, metadata={"batcher_chunk": "c1"})
                listed = await api.list_all()
        assert sim.stats()["batches"]["created"] == 1
    assert [b.id for b in listed] == [batch.id]
    assert batch.metadata == {"batcher_chunk": "c1"}
    assert len(sleeps.waits) == 1


async def test_list_all_pages_through_every_batch_and_stops_at_since(tmp_path: Path) -> None:
    with batch_sim() as sim:
        async with client(sim.base_url, Sleeps()) as api:
            file_id = await api.upload(input_file(tmp_path))
            made = []
            for i in range(7):
                made.append((await api.create(file_id, metadata={"i": str(i)})).id)
                sim.clock.advance(10)
            every = await api.list_all(page_size=3)
            recent = await api.list_all(page_size=3, since=sim.clock.now - 30)
    assert [b.id for b in every] == made[::-1]
    assert [b.id for b in recent] == made[::-1][:3]


async def test_progress_cancel_and_download_to(tmp_path: Path) -> None:
    config = BatchSimConfig(validating_s=1, in_progress_s=10, finalizing_s=1, cancelling_s=1)
    with batch_sim(config) as sim:
        async with client(sim.base_url, Sleeps()) as api:
            batch = await api.create(await api.upload(input_file(tmp_path, 10)), metadata={})
            sim.clock.advance(6)
            running = await api.retrieve(batch.id)
            cancelling = await api.cancel(batch.id)
            sim.clock.advance(2)
            cancelled = await api.retrieve(batch.id)
            assert cancelled.output_file_id is not None
            out = tmp_path / "out.jsonl"
            await api.download_to(cancelled.output_file_id, out)
            with pytest.raises(BatchAPIError, match="409"):
                await api.cancel(batch.id)
    assert (running.status, running.request_counts.completed) == ("in_progress", 5)
    assert cancelling.status == "cancelling" and not cancelling.ended
    assert cancelled.status == "cancelled" and cancelled.ended
    assert cancelled.ended_at is not None
    assert sorted(line["custom_id"] for line in lines_of(out.read_bytes())) == [
        f"q{i}" for i in range(5)
    ]
    assert not (tmp_path / "out.jsonl.partial").exists()


async def test_a_server_quoting_the_key_does_not_put_it_in_the_error() -> None:
    async def refuse(_: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        message = f"Incorrect API key provided: {KEY}. You can find your API key at ..."
        return 401, {"error": {"message": message, "code": "invalid_api_key"}}, {}

    sleeps = Sleeps()
    with serving(json_app(refuse)) as url:
        async with client(url, sleeps) as api:
            with pytest.raises(BatchAPIError) as caught:
                await api.retrieve("batch_abc")
    assert KEY not in str(caught.value)
    assert "401 invalid_api_key: Incorrect API key provided: ***" in str(caught.value)
    assert sleeps.waits == []


async def test_a_server_quoting_a_credential_header_does_not_put_it_in_the_error() -> None:
    token = "xauth-secret-999"

    async def refuse(_: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 401, {"error": {"message": f"bad X-Auth-Token {token}", "code": "denied"}}, {}

    with serving(json_app(refuse)) as url:
        api = BatchClient(url, api_key=None, headers={"X-Auth-Token": token}, retry=FAST)
        async with api:
            with pytest.raises(BatchAPIError) as caught:
                await api.retrieve("batch_abc")
    assert token not in str(caught.value)
    assert "bad X-Auth-Token ***" in str(caught.value)


async def test_the_base_urls_query_is_kept_on_every_call() -> None:
    seen: list[tuple[str, str]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append((scope["path"], scope["query_string"].decode()))
        page = {"object": "list", "data": [], "has_more": False}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(page).encode()})

    with serving(app) as url:
        async with client(f"{url}?api-version=2024-10-21", Sleeps()) as api:
            assert await api.list_all(page_size=5) == []
    assert seen == [("/v1/batches", "api-version=2024-10-21&limit=5")]


async def test_an_answer_that_cannot_be_decoded_is_retried_then_reported() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"not gzip at all"})

    sleeps = Sleeps()
    with serving(app) as url:
        async with client(url, sleeps) as api:
            with pytest.raises(BatchAPIError) as caught:
                await api.retrieve("batch_abc")
    assert "DecodingError" in str(caught.value) and "gave up" in str(caught.value)
    assert KEY not in str(caught.value)
    assert len(sleeps.waits) == FAST.max_attempts - 1


async def test_cancelling_an_ended_batch_is_a_conflict(tmp_path: Path) -> None:
    with batch_sim(BatchSimConfig(validating_s=1, in_progress_s=1, finalizing_s=1)) as sim:
        async with client(sim.base_url, Sleeps()) as api:
            file_id = await api.upload(input_file(tmp_path))
            batch = await api.create(file_id, metadata={"k": "v"})
            sim.clock.advance(60)
            with pytest.raises(ConflictError, match="409"):
                await api.cancel(batch.id)
