"""``--max-cost`` against servers that bill more than the bound, answer with a pricier model,
or report usage that cannot be true: the cap holds within the requests in flight when the
overshoot is seen, and bad usage is never credited. Real loopback servers (``loopback``)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from batcher.cost.tokens import get_encoding
from batcher.input.requests import prompt_bound
from batcher.job_file import job_from_dict
from batcher.output.writers import read_results
from batcher.runner.run import RunReport, run_job
from tests.loopback import chat_answer, json_app, serving

CHEAP = {"input": 1.0, "output": 1.0}  # USD per million tokens
DEAR = {"input": 50.0, "output": 50.0}
MAX_TOKENS = 100


class Server:
    """Bills honestly what it was sent (every string of every message, with tiktoken), or as
    told: ``model`` answers, ``usage`` replaces the bill. Counts the requests received."""

    def __init__(self, *, model: str = "cheap", usage: dict[str, Any] | None = None) -> None:
        self.model = model
        self.usage = usage
        self.received = 0
        self.billed: list[int] = []

    async def __call__(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        self.received += 1
        prompt = honest_prompt_tokens(body)
        self.billed.append(prompt)
        usage = self.usage or {
            "prompt_tokens": prompt,
            "completion_tokens": MAX_TOKENS,  # every answer as long as it may be
            "total_tokens": prompt + MAX_TOKENS,
        }
        return 200, chat_answer(self.model, usage), {}


def honest_prompt_tokens(body: dict[str, Any]) -> int:
    """What a server bills as prompt: 3 tokens a message plus every string in it (roles,
    contents, tool-call ids, names and arguments), the reply's 3, and the tool definitions."""
    enc = get_encoding("cl100k_base")

    def strings(value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return []

    total = 3 + sum(3 + sum(len(enc.encode(s)) for s in strings(m)) for m in body["messages"])
    return total + sum(len(enc.encode(s)) for s in strings(body.get("tools") or []))


def tool_call_lines(n: int) -> list[dict[str, Any]]:
    """Agent transcripts: a short question, a tool call with long arguments, its result."""
    arguments = json.dumps({"query": " ".join(f"word{i} alpha beta" for i in range(300))})
    return [
        {
            "custom_id": f"r{i}",
            "messages": [
                {"role": "user", "content": f"look this up {i}"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": f"call_{i}", "type": "function",
                     "function": {"name": "search", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": f"call_{i}", "content": "found"},
            ],
        }
        for i in range(n)
    ]  # fmt: skip


def plain_lines(n: int) -> list[dict[str, Any]]:
    return [{"custom_id": f"r{i}", "prompt": f"question {i}"} for i in range(n)]


def run_capped(
    tmp_path: Path,
    url: str,
    lines: list[dict[str, Any]],
    cap: float,
    *,
    concurrency: int = 4,
    model: str = "cheap",
    pricing: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
) -> RunReport:
    """Run ``lines`` against ``url`` under ``--max-cost cap`` (one attempt each unless
    ``retry`` says otherwise; the job prices "cheap" and "dear" unless ``pricing`` is given)."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    job = job_from_dict(
        {"job": {"input": str(src), "output": str(tmp_path / "o.parquet"), "progress": False},
         "endpoint": {"base_url": url},
         "request": {"model": model, "max_tokens": MAX_TOKENS},
         "limits": {"concurrency": concurrency, "max_cost_usd": cap},
         "pricing": {"cheap": CHEAP, "dear": DEAR} if pricing is None else pricing,
         "retry": {"max_attempts": 1, **(retry or {})}}
    )  # fmt: skip
    return run_job(job, stream=io.StringIO())


def spent(report: RunReport) -> float:
    return sum(r["cost_usd"] or 0.0 for r in read_results(report.output))


def test_tool_call_arguments_are_in_the_bound(tmp_path: Path) -> None:
    lines = tool_call_lines(60)
    server = Server()
    cap = 0.01
    with serving(json_app(server)) as url:
        report = run_capped(tmp_path, url, lines, cap)
    each = (server.billed[0] + MAX_TOKENS) * CHEAP["input"] / 1e6
    assert 60 * each > 2 * cap  # sending them all would pass the cap twice over
    assert spent(report) <= cap  # every reservation covered its answer: no overshoot at all
    assert report.stats.stopped_early and "--max-cost $0.01 reached" in report.summary
    assert "reserved for it" not in report.summary  # no answer cost more than its bound
    assert server.received < 60


def test_the_bound_covers_every_message_part() -> None:
    enc_count = 10  # what the count found: far less than what is sent
    image = {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}
    audio = {"type": "input_audio", "input_audio": {"data": "A" * 9000, "format": "wav"}}
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}, image, audio]},
            {"role": "assistant", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1" * 100, "content": "x"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"x": "y" * 500}}}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"d": "z" * 700}}},
    }  # fmt: skip
    bound = prompt_bound(body, enc_count)
    assert bound >= enc_count + 48_200 + 9000 + 200 + 500 + 700  # gpt-4o-mini's image figure
    assert prompt_bound({**body, "model": "gpt-4o"}, enc_count) < bound


def test_a_pricier_answering_model_stops_dispatch_once_seen(tmp_path: Path) -> None:
    """The cap is far off, but the first answer cost more than its reservation: only the
    requests reserved by then (at most one a worker) are sent."""
    server = Server(model="dear")  # asked "cheap", answered (and billed) as "dear"
    cap, concurrency = 0.1, 4
    with serving(json_app(server)) as url:
        report = run_capped(tmp_path, url, plain_lines(40), cap, concurrency=concurrency)
    rows = list(read_results(report.output))
    worst_dear = max(r["prompt_tokens"] + r["completion_tokens"] for r in rows) * 50.0 / 1e6
    assert {r["model"] for r in rows} == {"dear"}
    assert all(r["cost_usd"] == pytest.approx(
        (r["prompt_tokens"] + r["completion_tokens"]) * 50.0 / 1e6) for r in rows)  # fmt: skip
    assert server.received == len(rows) <= concurrency
    assert spent(report) <= concurrency * worst_dear < cap
    assert report.exit_code == 3 and "reserved for it" in report.summary


@pytest.mark.parametrize(
    ("usage", "says"),
    [({"prompt_tokens": -1_000_000_000, "completion_tokens": 5, "total_tokens": -999_999_995},
      "usage.prompt_tokens is negative"),
     ({"prompt_tokens": 5, "completion_tokens": 10**9, "total_tokens": 10**9 + 5},
      "usage.completion_tokens is absurd"),
     ({"prompt_tokens": 5, "completion_tokens": 50_000, "total_tokens": 50_005},
      "usage is absurd"),
     ({"prompt_tokens": 5.5, "completion_tokens": 5, "total_tokens": 10.5},
      "usage.prompt_tokens is not a whole number")],
)  # fmt: skip
def test_usage_that_cannot_be_true_is_never_credited(
    tmp_path: Path, usage: dict[str, Any], says: str
) -> None:
    server = Server(usage=usage)
    cap = 0.001  # about eight requests' worst case at "cheap"
    with serving(json_app(server)) as url:
        report = run_capped(tmp_path, url, plain_lines(40), cap, concurrency=2)
    rows = list(read_results(report.output))
    assert rows and 0 < spent(report) <= cap
    assert server.received < 40  # the cap bound: not every request was sent
    for row in rows:
        assert row["status"] == "ok" and row["cost_usd"] > 0  # its reserved worst case
        assert row["error_message"].startswith("usage_invalid: " + says)
        assert row["prompt_tokens"] is None and row["completion_tokens"] is None
    assert report.stats.prompt_tokens >= 0 and report.stats.completion_tokens >= 0


def test_a_negative_cost_in_a_journal_is_not_a_credit(tmp_path: Path) -> None:
    """A journal written before invalid usage was caught may hold negative costs: a resumed
    run's budget does not start below zero for them."""
    from batcher.output.journal import Journal
    from batcher.records import Result

    def record(cid: str, cost: float) -> Result:
        return Result(custom_id=cid, line=1, status="ok", model="cheap", attempts=1,
                      latency_s=0.1, started_at=0.0, finished_at=0.1, cost_usd=cost)  # fmt: skip

    path = tmp_path / "j.jsonl"
    with Journal(path) as journal:
        journal.append(record("a", -120.0), "h")
        journal.append(record("b", 0.25), "h")
    with Journal(path) as again:
        assert again.spent_before == pytest.approx(0.25)


class Unusable:
    """Answers 200 with usage but an error object instead of choices: an answer that may have
    been billed and cannot be used, every time."""

    def __init__(self) -> None:
        self.received = 0

    async def __call__(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        self.received += 1
        usage = {"prompt_tokens": 10, "completion_tokens": MAX_TOKENS, "total_tokens": 110}
        return 200, {"error": {"message": "upstream failed"}, "usage": usage}, {}


def test_unusable_2xx_answers_count_against_the_cap(tmp_path: Path) -> None:
    """Every answer is a 200 that cannot be used, retried up to 4 times: each was counted at its
    worst case, so the cap binds (it was never reached: they cost nothing), and the records
    carry what was counted, so a resumed run starts from it."""
    server = Unusable()
    cap = 0.002  # about sixteen attempts' worst case at "cheap"
    retry = {"max_attempts": 4, "backoff_initial_s": 0.001, "backoff_max_s": 0.002}
    with serving(json_app(server)) as url:
        report = run_capped(tmp_path, url, plain_lines(40), cap, concurrency=2, retry=retry)
    rows = list(read_results(report.output))
    assert report.exit_code == 3 and "--max-cost" in (report.stats.stop_reason or "")
    assert server.received < 40  # stopped by the cap, long before every line was tried
    worst = (prompt_bound({"messages": [{"role": "user", "content": "question 10"}]}, 4)
             + MAX_TOKENS) * 1.0 / 1e6  # fmt: skip
    assert {r["status"] for r in rows} == {"error"}
    assert all(r["cost_usd"] > 0 for r in rows)
    assert spent(report) <= cap
    assert server.received * worst * 0.5 <= spent(report)  # every attempt counted


class ManyNames:
    """Answers as a new model every time (a gateway gone wrong, or a hostile one)."""

    def __init__(self) -> None:
        self.received = 0

    async def __call__(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        self.received += 1
        usage = {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
        return 200, chat_answer(f"model-{self.received}", usage), {}


def test_too_many_answering_model_names_stop_a_capped_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the answering names whose prices are looked up, an answer would be priced as the
    model asked, maybe below what answered: under --max-cost the run stops (the limit is
    lowered from 64 to 3 so the test looks up few names)."""
    monkeypatch.setattr("batcher.cost.pricing.MAX_ANSWERING_MODELS", 3)
    monkeypatch.setattr("batcher.engine.asking.MAX_ANSWERING_MODELS", 3)
    server = ManyNames()
    with serving(json_app(server)) as url:
        # priced by genai-prices, not the job: the answering model's price is looked up
        report = run_capped(
            tmp_path, url, plain_lines(40), 1.0, concurrency=1, model="gpt-4o-mini", pricing={}
        )
    assert report.exit_code == 3
    assert "named more than 3 models" in (report.stats.stop_reason or "")
    assert server.received < 10
