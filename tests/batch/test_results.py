"""Output- and error-file lines as results: ok, retryable, final, not run; OpenAI's and vLLM's
shapes; lines that name no request; adoption by metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batcher.batch.api import Batch
from batcher.batch.chunks import plan_chunks
from batcher.batch.results import adopt, read_back
from batcher.records import Request, Usage

BATCH = Batch(id="batch_1", status="completed", created_at=100.0, ended_at=160.0)


def chunk_of(n: int) -> Any:
    requests = [
        Request(
            custom_id=f"r{i}",
            line=i + 1,
            body={"model": "m", "messages": [{"role": "user", "content": str(i)}], "n": 2},
            metadata={"i": i},
        )
        for i in range(n)
    ]
    return plan_chunks(requests, job="j", max_requests=100, max_bytes=10**6).chunks[0]


def ok_line(custom_id: str) -> dict[str, Any]:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m-2024",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
    response = {"status_code": 200, "request_id": "req_1", "body": body}
    return {"id": "batch_req_1", "custom_id": custom_id, "response": response, "error": None}


def http_error(custom_id: str, status: int) -> dict[str, Any]:
    body = {"error": {"message": f"failed with {status}", "type": "x", "code": None}}
    response = {"status_code": status, "request_id": "req_2", "body": body}
    return {"custom_id": custom_id, "response": response, "error": None}


def not_run(custom_id: str, code: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "response": None, "error": {"code": code, "message": "late"}}


def jsonl(*items: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def test_each_kind_of_line_becomes_its_record() -> None:
    chunk = chunk_of(7)
    output = jsonl(ok_line("r3"), ok_line("r0"))
    errors = jsonl(
        http_error("r1", 500),
        http_error("r2", 400),
        not_run("r4", "batch_expired"),
        http_error("r5", 429),
        {"custom_id": "nobody", "response": None, "error": None},
    )
    got = read_back(chunk, BATCH, [output, errors], attempt=2)
    answers = got.answers
    ok = answers["r0"].result
    assert (ok.status, ok.model, ok.attempts, ok.line) == ("ok", "m-2024", 2, 1)
    assert ok.usage == Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7)
    assert ok.metadata == {"i": 0} and ok.choices_asked == 2
    assert (ok.started_at, ok.finished_at, ok.request_id) == (100.0, 160.0, "req_1")
    assert answers["r0"].batch_id == "batch_1"
    assert (answers["r0"].answered, answers["r0"].retryable) == (True, False)

    server = answers["r1"]
    assert (server.result.status, server.result.status_code) == ("error", 500)
    assert server.result.error_message == "failed with 500"
    assert (server.answered, server.retryable) == (True, True)
    assert answers["r5"].retryable
    final = answers["r2"]
    assert (final.answered, final.retryable, final.result.status_code) == (True, False, 400)
    expired = answers["r4"]
    assert (expired.answered, expired.retryable) == (False, True)
    assert expired.result.error_code == "batch_expired" and expired.result.usage is None
    assert got.strays == ["nobody"]
    assert [r.custom_id for r in got.missing] == ["r6"]


def test_a_200_without_choices_is_retried_as_online() -> None:
    chunk = chunk_of(1)
    line = ok_line("r0")
    line["response"]["body"] = {"object": "chat.completion", "choices": []}
    [answer] = read_back(chunk, BATCH, [jsonl(line)]).answers.values()
    assert answer.result.error_code == "invalid_response"
    assert answer.retryable and answer.answered


def test_vllm_inline_errors_are_read() -> None:
    chunk = chunk_of(1)
    line = {
        "id": "vllm-abc",
        "custom_id": "r0",
        "response": {"status_code": 400, "request_id": "vllm-batch-1", "body": None},
        "error": "This model's maximum context length is 2048 tokens",
    }
    [answer] = read_back(chunk, BATCH, [jsonl(line)]).answers.values()
    assert answer.result.status_code == 400
    assert answer.result.error_message == "This model's maximum context length is 2048 tokens"
    assert not answer.retryable


def test_an_ok_line_wins_over_an_error_line_for_the_same_request() -> None:
    chunk = chunk_of(1)
    got = read_back(chunk, BATCH, [jsonl(http_error("r0", 500)), jsonl(ok_line("r0"))])
    assert got.answers["r0"].result.status == "ok"


def test_adopt_finds_the_newest_batch_naming_each_chunk() -> None:
    chunk = chunk_of(2)
    meta = chunk.metadata("j")

    def batch(batch_id: str, created: float, metadata: dict[str, str] | None) -> Batch:
        return Batch(id=batch_id, status="failed", created_at=created, metadata=metadata)

    batches = [
        batch("b_old", 1.0, meta),
        batch("b_new", 2.0, meta),
        batch("b_other_job", 3.0, {**meta, "batcher_job": "k"}),
        batch("b_none", 4.0, None),
    ]
    assert adopt([chunk], batches, job="j") == {chunk.key: batches[1]}
    assert adopt([chunk], batches[2:], job="j") == {}


def test_result_files_are_read_from_disk_a_line_at_a_time(tmp_path: Path) -> None:
    chunk = chunk_of(3)
    lines = [ok_line(r.key) for r in chunk.requests]
    path = tmp_path / "output.jsonl"
    path.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    got = read_back(chunk, BATCH, [path])
    assert sorted(got.answers) == sorted(r.key for r in chunk.requests)
    assert all(a.result.status == "ok" for a in got.answers.values())
