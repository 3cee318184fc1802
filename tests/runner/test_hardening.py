"""What the first review found: bad answers, bad inputs and bad setups end cleanly."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import threading
import time
from pathlib import Path

import anyio
import httpx
import pytest

from batcher.config import JobConfig
from batcher.errors import ConfigError
from batcher.http.client import ChatClient
from batcher.job_file import job_from_dict
from batcher.limits.endpoint import MAX_SERVER_WAIT_S, Limits
from batcher.output.journal import Journal, journal_path
from batcher.output.writers import read_results
from batcher.runner.run import run_job
from tests.helpers import write_input

OK = {
    "choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def ok_transport() -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(200, json=OK))


def job(tmp_path: Path, src: Path, out: str = "o.jsonl", **extra: object) -> JobConfig:
    raw: dict[str, object] = {
        "job": {"input": str(src), "output": str(tmp_path / out), "progress": False},
        "endpoint": {"base_url": "http://mock.test/v1"},
        "request": {"model": "m"},
        "retry": {"max_attempts": 2, "backoff_initial_s": 0.001, "backoff_max_s": 0.002},
        **extra,
    }
    return job_from_dict(raw)


def test_body_that_is_not_the_gzip_it_claims_is_an_error_record(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"not gzip", headers={"content-encoding": "gzip"})

    src = write_input(tmp_path / "in.jsonl", 3)
    report = run_job(
        job(tmp_path, src), transport=httpx.MockTransport(handler), stream=io.StringIO()
    )
    rows = list(read_results(report.output))
    assert {(r["status"], r["error_code"]) for r in rows} == {("error", "invalid_response")}


@pytest.mark.anyio
async def test_malformed_http_over_the_real_transport_is_an_attempt_not_a_crash() -> None:
    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}")

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        async with ChatClient(f"http://127.0.0.1:{port}/v1", api_key=None, timeout_s=5) as c:
            attempt = await c.post({"model": "m", "messages": [{"role": "user"}]})
        tg.cancel_scope.cancel()
    assert not attempt.ok and attempt.retryable
    assert attempt.error_code in {"invalid_response", "connection_error"}


def test_key_with_a_stray_carriage_return_is_refused_without_showing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHER_TEST_KEY", "canary-9d1e\r")
    src = write_input(tmp_path / "in.jsonl", 1)
    bad = job(tmp_path, src, endpoint={"base_url": "http://mock.test/v1",
                                       "api_key_env": "BATCHER_TEST_KEY"})  # fmt: skip
    with pytest.raises(ConfigError) as info:
        run_job(bad, transport=ok_transport(), stream=io.StringIO())
    assert info.value.field == "endpoint.api_key_env"
    assert "canary" not in str(info.value)
    assert not (tmp_path / "o.jsonl").exists()


def test_truncated_gzip_input_sends_what_it_read_and_stops_resumably(tmp_path: Path) -> None:
    plain = write_input(tmp_path / "plain.jsonl", 400)
    data = gzip.compress(plain.read_bytes())
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(data[: len(data) // 2])
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200, json=OK)

    printed = io.StringIO()
    report = run_job(job(tmp_path, src), transport=httpx.MockTransport(handler), stream=printed)
    assert report.exit_code == 3
    assert "cannot read the input after line" in printed.getvalue()
    rows = list(read_results(report.output))
    assert 0 < len(rows) == calls < 400


def test_fifo_input_is_read_once_and_fully(tmp_path: Path) -> None:
    lines = write_input(tmp_path / "plain.jsonl", 50).read_bytes()
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with fifo.open("wb") as f:
            f.write(lines)

    threading.Thread(target=feed, daemon=True).start()
    with_progress = dataclasses.replace(job(tmp_path, fifo), progress=True)
    report = run_job(with_progress, transport=ok_transport(), stream=io.StringIO())
    assert report.stats.ok == 50


def test_output_that_is_the_input_is_refused(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 1)
    same = job(tmp_path, src, out="in.jsonl")
    with pytest.raises(ConfigError, match="is the input") as info:
        run_job(same, transport=ok_transport())
    assert info.value.field == "job.output"
    assert src.read_text().count("\n") == 1


def test_an_output_folder_that_is_a_file_is_named_as_one(tmp_path: Path) -> None:
    """Not "folder ... does not exist" when it does, as a file."""
    from batcher.runner.checks import check_output_writable

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"afile is a file, not a folder$") as info:
        check_output_writable(tmp_path / "afile" / "o.parquet")
    assert info.value.field == "job.output"
    with pytest.raises(ConfigError, match=r"nope does not exist$"):
        check_output_writable(tmp_path / "nope" / "o.parquet")


def test_a_second_run_on_the_same_output_is_refused(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 1)
    held = Journal(journal_path(tmp_path / "o.jsonl"))  # another run holds the journal
    with held, pytest.raises(ConfigError, match="another batcher run"):
        run_job(job(tmp_path, src), transport=ok_transport(), stream=io.StringIO())


def test_a_429_pauses_the_whole_pool_for_its_retry_after(tmp_path: Path) -> None:
    arrivals: list[float] = []
    limited_at: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        now = time.monotonic()
        arrivals.append(now)
        if len(arrivals) == 8:
            limited_at.append(now)
            return httpx.Response(429, headers={"retry-after-ms": "400"}, json={"error": {}})
        return httpx.Response(200, json=OK)

    src = write_input(tmp_path / "in.jsonl", 30)
    pool = job(tmp_path, src, limits={"concurrency": 4}, retry={"max_attempts": 3})
    report = run_job(pool, transport=httpx.MockTransport(handler), stream=io.StringIO())
    assert report.stats.ok == 30
    (t429,) = limited_at
    after = [t for t in arrivals if t > t429]
    assert after, "nothing was sent after the 429"
    # every worker waited: not just the request that got the 429 (a lower bound: cannot flake)
    assert min(after) - t429 >= 0.39


def test_bogus_retry_after_is_capped() -> None:
    limits = Limits(clock=lambda: 0.0)
    limits.on_rate_limited(1e9)
    assert limits.paused_s == MAX_SERVER_WAIT_S
