"""The journal: appends survive, a torn tail is cut off, the latest record of an id wins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batcher.output.body_hash import request_hash
from batcher.output.journal import Journal, decode, encode, journal_path
from batcher.output.resume import ResumePlan
from batcher.records import Result, Usage


def result(cid: str, status: str = "ok", **kw: object) -> Result:
    fields: dict[str, object] = {
        "custom_id": cid,
        "line": 1,
        "status": status,
        "model": "m",
        "attempts": 1,
        "latency_s": 0.5,
        "started_at": 1_700_000_000.25,
        "finished_at": 1_700_000_000.75,
        "status_code": 200 if status == "ok" else 503,
        "body": {"choices": [{"message": {"content": f"answer {cid} ✓"}}]},
        "usage": Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
        "error_code": None if status == "ok" else "http_503",
    }
    fields.update(kw)
    return Result(**fields)  # type: ignore[arg-type]


def test_encode_decode_round_trip() -> None:
    original = result("a", metadata={"k": [1, "ü"]}, body="\ud800 lone surrogate")
    import json

    back = decode(json.loads(encode(original, "h1")))
    assert back == original


def test_a_fresh_run_keeps_no_entries_in_memory(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.jsonl") as j:
        for i in range(50):
            j.append(result(f"id{i}"), "h")
        assert j.entries == {}
        assert [r.custom_id for r in j.results()] == [f"id{i}" for i in range(50)]


def test_records_survive_reopening_and_latest_wins(tmp_path: Path) -> None:
    path = journal_path(tmp_path / "out.parquet")
    assert path.name == "out.parquet.journal"
    with Journal(path) as j:
        j.append(result("a", "error"), "h-a")
        j.append(result("b"), "h-b")
    with Journal(path) as j:  # a second run re-sends a
        assert set(j.entries) == {"a", "b"}
        j.append(result("a"), "h-a2")
        assert j.entries["a"].status == "ok"
    with Journal(path) as j:
        assert {k: (e.status, e.hash) for k, e in j.entries.items()} == {
            "a": ("ok", "h-a2"),
            "b": ("ok", "h-b"),
        }
        assert [r.custom_id for r in j.results()] == ["b", "a"]
        assert next(r for r in j.results() if r.custom_id == "a").status == "ok"


def test_torn_last_line_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        j.append(result("a"), "h")
        j.append(result("b"), "h")
    whole = path.read_bytes()
    path.write_bytes(whole[:-20])  # the process died in the middle of writing b's record
    with Journal(path) as j:
        assert set(j.entries) == {"a"}
        assert j.torn_bytes == len(whole) - 20 - path.stat().st_size > 0  # b's part, cut off
        assert f"cut short ({j.torn_bytes} bytes" in j.torn_note
        j.append(result("c"), "h")
    with Journal(path) as j:
        assert set(j.entries) == {"a", "c"}
        assert j.torn_note == ""  # nothing cut off this time: nothing to tell
        assert [r.custom_id for r in j.results()] == ["a", "c"]


def test_garbage_line_in_the_middle_counts_as_not_done(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        j.append(result("a"), "h")
    with path.open("ab") as f:
        f.write(b"{not json\n")
    with Journal(path) as j:
        j.append(result("b"), "h")
    with Journal(path) as j:
        assert set(j.entries) == {"a", "b"}


def test_fsync_at_most_every_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    monkeypatch.setattr(os, "fsync", syncs.append)
    now = [100.0]
    j = Journal(tmp_path / "j.jsonl", fsync_every_s=1.0, clock=lambda: now[0])
    for i in range(5):
        j.append(result(str(i)), "h")  # all within the same second: written, not fsynced
    assert syncs == []
    now[0] += 1.5
    j.append(result("x"), "h")
    assert len(syncs) == 1
    j.close()
    assert len(syncs) == 1  # nothing new since the last fsync
    assert (tmp_path / "j.jsonl").read_bytes().count(b"\n") == 7  # header + 6 records


def test_request_hash_ignores_key_order_but_not_content() -> None:
    a = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    b = {"messages": [{"content": "x", "role": "user"}], "model": "m"}
    assert request_hash(a) == request_hash(b)
    assert request_hash(a) != request_hash({**a, "temperature": 0})


@pytest.mark.parametrize(
    ("retry_errors", "expected"),
    [
        ("none", {"ok": "skip", "e503": "skip", "e400": "skip", "changed": "resend", "new": "new"}),
        ("all", {"ok": "skip", "e503": "resend", "e400": "resend", "changed": "resend"}),
        ("retryable", {"ok": "skip", "e503": "resend", "e400": "skip", "timeout": "resend"}),
    ],
)
def test_resume_plan(tmp_path: Path, retry_errors: str, expected: dict[str, str]) -> None:
    with Journal(tmp_path / "j.jsonl") as j:
        j.append(result("ok"), "h")
        j.append(result("e503", "error"), "h")
        j.append(result("e400", "error", status_code=400, error_code="bad"), "h")
        j.append(result("timeout", "error", status_code=None, error_code="timeout"), "h")
        j.append(result("changed"), "old")
    with Journal(tmp_path / "j.jsonl") as j:
        plan = ResumePlan(j.entries, retry_errors=retry_errors)  # type: ignore[arg-type]
    for cid, decision in expected.items():
        assert plan.decide(cid, "h") == decision, cid


def test_new_fields_round_trip() -> None:
    import json

    original = result("n", ttft_s=0.125, schema_valid=False, schema_error="choice 0 is not JSON")
    assert decode(json.loads(encode(original, "h"))) == original


def test_provisional_record_is_replaced_and_its_cost_not_counted_twice(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path) as journal:
        journal.append(result("a", cost_usd=1.0, schema_valid=False), "h", provisional=True)
        journal.append(result("a", cost_usd=1.0 + 2.0, schema_valid=False), "h", provisional=True)
        journal.append(result("a", cost_usd=1.0 + 2.0 + 4.0, schema_valid=True), "h")
        journal.append(result("b", cost_usd=0.5, schema_valid=False), "h", provisional=True)
        records = list(journal.results())
    # one record an id: the final one for a, the provisional one for b (the run died there)
    assert [(r.custom_id, r.cost_usd) for r in records] == [("a", 7.0), ("b", 0.5)]
    with Journal(path) as again:
        assert again.spent_before == pytest.approx(7.5)
        assert again.entries["a"].status == again.entries["b"].status == "ok"


def test_turning_streaming_on_does_not_change_the_hash() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    assert request_hash(streamed) == request_hash(body)
    assert request_hash({**body, "temperature": 0}) != request_hash(body)
