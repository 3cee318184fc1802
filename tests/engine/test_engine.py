"""The engine through the library API, with the simulator in-process behind httpx.ASGITransport."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from batcher.job_file import job_from_dict
from batcher.output.writers import read_results
from batcher.runner.run import run_job
from batcher.sim.answers import expected_content
from batcher.sim.app import Simulator
from batcher.sim.config import SimConfig
from tests.helpers import requests_of, write_input

#: The least answer that is kept as ok: one choice, with its message.
ANSWER = {
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}
    ],
    "usage": {"total_tokens": 1},
}


class MaxRunning:
    """ASGI middleware: counts requests in flight and remembers the most seen at once."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.running = 0
        self.max_running = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1


def job_for(tmp_path: Path, src: Path, out: str, **tables: dict[str, Any]) -> Any:
    raw: dict[str, Any] = {
        "job": {"input": str(src), "output": str(tmp_path / out), "progress": False},
        "endpoint": {"base_url": "http://sim.test/v1"},
        "request": {"model": "m"},
        "retry": {"backoff_initial_s": 0.001, "backoff_max_s": 0.01},
    }
    for name, table in tables.items():
        raw.setdefault(name, {}).update(table)
    return job_from_dict(raw)


def test_concurrency_limit_is_never_exceeded(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 60)
    spy = MaxRunning(Simulator(SimConfig(latency_ms=10)))
    job = job_for(tmp_path, src, "o.jsonl", limits={"concurrency": 5})
    report = run_job(job, transport=httpx.ASGITransport(app=spy), stream=io.StringIO())
    assert report.stats.ok == 60
    assert spy.max_running == 5  # the pool is used fully, and never beyond its limit


def test_library_run_with_faults_retries_to_success(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 120)
    sim = Simulator(SimConfig(error_rate=0.25, error_kinds=("500", "503", "malformed"), seed=3))
    job = job_for(tmp_path, src, "o.parquet", retry={"max_attempts": 14})
    printed = io.StringIO()
    report = run_job(job, transport=httpx.ASGITransport(app=sim), stream=printed)
    bad = [r for r in read_results(report.output) if r["status"] != "ok"]
    assert report.exit_code == 0, bad
    assert report.stats.ok == 120 and report.stats.error == 0
    assert report.stats.retries == sim.stats.faults_injected > 0
    rows = {r["custom_id"]: r for r in read_results(report.output)}
    sent = requests_of(src, {"model": "m"})
    assert rows.keys() == sent.keys()
    for cid, row in rows.items():
        assert row["content"] == expected_content(sent[cid].body)
    assert report.stats.total_tokens == sim.stats.total_tokens_served
    assert "120 ok, 0 error" in printed.getvalue()


def test_non_retryable_answer_is_recorded_once(tmp_path: Path) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        body = {
            "error": {
                "message": "model not found",
                "type": "invalid_request_error",
                "code": "model_not_found",
            }
        }
        return httpx.Response(404, json=body)

    src = write_input(tmp_path / "in.jsonl", 3)
    job = job_for(tmp_path, src, "o.jsonl")
    report = run_job(job, transport=httpx.MockTransport(handler), stream=io.StringIO())
    assert report.exit_code == 1
    assert calls == 3
    rows = list(read_results(report.output))
    assert {(r["status"], r["status_code"], r["error_code"], r["attempts"]) for r in rows} == {
        ("error", 404, "model_not_found", 1)
    }
    assert rows[0]["error_message"] == "model not found"


def test_html_502_and_garbage_200_never_crash_the_run(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if b"r00000" in request.content or b"Question 0:" in request.content:
            return httpx.Response(502, text="<html><body>Bad Gateway</body></html>")
        return httpx.Response(200, text="<html>not json</html>")

    src = write_input(tmp_path / "in.jsonl", 4)
    job = job_for(tmp_path, src, "o.parquet", retry={"max_attempts": 2})
    report = run_job(job, transport=httpx.MockTransport(handler), stream=io.StringIO())
    rows = {r["custom_id"]: r for r in read_results(report.output)}
    assert rows["r00000"]["error_code"] == "http_502"
    assert "Bad Gateway" in rows["r00000"]["error_message"]
    assert {rows[c]["error_code"] for c in ("r00001", "r00002", "r00003")} == {"invalid_response"}
    assert all(r["attempts"] == 2 and r["status"] == "error" for r in rows.values())


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_both_formats_hold_the_same_records(tmp_path: Path, suffix: str) -> None:
    src = write_input(tmp_path / "in.jsonl", 9)
    sim = Simulator(SimConfig())
    job = job_for(tmp_path, src, f"o.{suffix}")
    report = run_job(job, transport=httpx.ASGITransport(app=sim), stream=io.StringIO())
    rows = list(read_results(report.output))
    assert sorted(r["custom_id"] for r in rows) == [f"r{i:05d}" for i in range(9)]
    by_id = {r["custom_id"]: r for r in rows}
    assert by_id["r00000"]["metadata"] is not None
    assert all(r["model"] == "m" and r["finish_reason"] in {"stop", "length"} for r in rows)


def test_stalled_answer_hits_the_per_attempt_timeout(tmp_path: Path) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(30)  # longer than the test's timeout: only the cancel scope ends it
        return httpx.Response(200, json={})

    src = write_input(tmp_path / "in.jsonl", 2)
    job = job_for(tmp_path, src, "o.jsonl", retry={"max_attempts": 2, "timeout_s": 0.05})
    report = run_job(job, transport=httpx.MockTransport(handler), stream=io.StringIO())
    rows = list(read_results(report.output))
    assert {(r["status"], r["error_code"], r["attempts"]) for r in rows} == {
        ("error", "timeout", 2)
    }
    assert report.exit_code == 1


def test_api_key_is_sent_but_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = "canary-key-7f3a9c"  # not a real key format
    monkeypatch.setenv("BATCHER_TEST_KEY", canary)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        if b"Question 1:" in request.content:
            return httpx.Response(
                401, json={"error": {"message": "bad key", "code": "invalid_api_key"}}
            )
        return httpx.Response(200, json=ANSWER)

    src = write_input(tmp_path / "in.jsonl", 3)
    job = job_for(tmp_path, src, "o.jsonl", endpoint={"api_key_env": "BATCHER_TEST_KEY"})
    printed = io.StringIO()
    run_job(job, transport=httpx.MockTransport(handler), stream=printed)
    assert set(seen) == {f"Bearer {canary}"}
    for path in tmp_path.iterdir():
        assert canary not in path.read_text(encoding="utf-8", errors="replace")
    assert canary not in printed.getvalue()


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_every_choice_is_kept_when_n_is_more_than_one(tmp_path: Path, suffix: str) -> None:
    src = write_input(tmp_path / "in.jsonl", 4)
    job = job_for(tmp_path, src, f"o.{suffix}", request={"n": 3})
    report = run_job(job, transport=httpx.ASGITransport(app=Simulator()), stream=io.StringIO())
    sent = requests_of(src, {"model": "m", "n": 3})
    for row in read_results(report.output):
        body = sent[row["custom_id"]].body
        n = body.get("n") or 1
        assert [c["index"] for c in row["choices"]] == list(range(n))
        assert [c["content"] for c in row["choices"]] == [
            expected_content(body, i) for i in range(n)
        ]
        assert row["content"] == row["choices"][0]["content"]  # the first, for convenience
