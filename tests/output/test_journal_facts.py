"""The facts ``batcher status`` reads from a journal: the latest record of each request, read
backwards as a stream, in flat memory."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from batcher.output import journal_facts as facts_module
from batcher.output.journal import Journal, encode, journal_path
from batcher.output.journal_facts import JournalFacts, JournalReader, journal_facts
from batcher.records import Result, Usage
from batcher.runner.job_status import read_job_status


def result(
    cid: str, status: str = "ok", *, at: float = 1000.0, variant: str | None = None, **kw: object
) -> Result:
    fields: dict[str, object] = {
        "custom_id": cid, "line": 1, "status": status, "model": "m", "attempts": 1,
        "latency_s": 0.1, "started_at": at - 0.1, "finished_at": at, "status_code": 200,
        "request_id": None, "body": None,
        "usage": Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7),
        "cost_usd": 0.5 if status == "ok" else None, "variant": variant,
    }  # fmt: skip
    if status != "ok":
        fields |= {"status_code": 500, "error_code": "server_error", "usage": None}
        fields["error_message"] = f"boom {cid}"
    return Result(**(fields | kw))  # type: ignore[arg-type]


def write_journal(path: Path, results: list[tuple[Result, bool]]) -> Path:
    """A journal written by the journal itself; ``(result, provisional)`` pairs."""
    with Journal(path) as journal:
        for r, provisional in results:
            journal.append(r, "h", provisional=provisional)
    return path


def test_the_latest_record_of_each_request_wins_as_resume_reads_them(tmp_path: Path) -> None:
    path = write_journal(
        tmp_path / "o.jsonl.journal",
        [
            (result("a", "error", at=1001), False),  # re-sent later: ok
            (result("b"), False),
            (result("c", at=1003, cost_usd=0.2), True),  # re-asked: the final record counts
            (result("a", at=1004), False),
            (result("c", at=1005, cost_usd=0.7), False),
            (result("d", "error", at=1006), False),
            (result("b", variant="v2", at=1007), False),  # another variant: its own request
        ],
    )
    with path.open("ab") as f:
        f.write(b'{"custom_id": "e", "status": "ok"')  # torn by a crash: not a record
    facts = journal_facts(path)
    assert facts is not None
    with Journal(path) as journal:  # what resume and the output read (cuts the torn line)
        latest = list(journal.results())
    assert facts.done == len(latest) == 5
    assert facts.ok == sum(r.status == "ok" for r in latest) == 4 and facts.error == 1
    assert facts.cost_usd == pytest.approx(sum(r.cost_usd or 0 for r in latest)) == 2.2
    assert facts.total_tokens == 28 and facts.prompt_tokens == 12
    assert facts.error_codes == {"server_error": 1}
    assert [(e.custom_id, e.message) for e in facts.last_errors] == [("d", "boom d")]
    assert facts.last_finished_at == 1007 and facts.first_started_at == pytest.approx(1000 - 0.1)


def test_lines_longer_than_a_block_read_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = [(result(f"r{i}", "error" if i % 3 == 0 else "ok", at=1000 + i), False)
               for i in range(40)]  # fmt: skip
    path = write_journal(tmp_path / "o.journal", records)
    whole = journal_facts(path)
    monkeypatch.setattr(facts_module, "_BLOCK", 7)  # every line cut across blocks
    cut = journal_facts(path)
    assert whole is not None and cut is not None
    assert (cut.ok, cut.error, cut.total_tokens, cut.cost_usd) == (
        whole.ok, whole.error, whole.total_tokens, whole.cost_usd,
    ) == (26, 14, 26 * 7, 13.0)  # fmt: skip
    assert [e.custom_id for e in cut.last_errors] == ["r39", "r36", "r33", "r30", "r27"]


def test_the_recent_rate_counts_finishes_in_the_window() -> None:
    facts = JournalFacts()
    for second in (0, 100, 480, 700, 701, 702, 790):
        facts.add({"custom_id": str(second), "status": "ok", "finished_at": 1_000_000 + second})
    assert facts.last_finished_at == 1_000_790
    assert facts.finished_since(1_000_790 - 300) == 4  # 480 is out of the last 300 s
    assert facts.finished_since(1_000_701) == 3


def test_memory_stays_flat_over_a_long_journal(tmp_path: Path) -> None:
    path = tmp_path / "o.journal"
    n = 120_000  # past the fingerprints' first 65,536 in memory
    with path.open("wb") as f:
        f.write(b'{"batcher_journal":1}\n')
        for i in range(n):
            f.write(encode(result(f"id-{i:07d}", at=1000 + i / 1000), "h" * 32))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        facts = journal_facts(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert facts is not None and facts.ok == n and facts.total_tokens == 7 * n
    assert size > 40_000_000 and peak < 8_000_000  # a few MB, not the journal's 40+


def test_a_compact_journal_sends_status_to_the_output(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    rows = [
        {"custom_id": "a", "response": {"status_code": 200, "body": {"choices": [],
         "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}},
         "error": None, "batcher": {"status": "ok", "cost_usd": 0.25}},
        {"custom_id": "b", "response": None, "error": {"code": "server_error", "message": "x"},
         "batcher": {"status": "error"}},
    ]  # fmt: skip
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    journal = journal_path(out)
    journal.write_text(
        '{"batcher_journal":1,"compact":true,"spent_usd":0.25}\n'
        '{"custom_id":"a","hash":"h","status":"ok","row":0}\n'
        '{"custom_id":"b","hash":"h","status":"error","row":1}\n'
    )
    assert journal_facts(journal) == read_job_status(out).facts  # the output's rows
    status = read_job_status(out)
    assert (status.facts.ok, status.facts.error) == (1, 1)
    assert status.facts.total_tokens == 5 and status.facts.cost_usd == 0.25
    assert [e.custom_id for e in status.facts.last_errors] == ["b"]


def test_read_again_only_what_was_appended_agrees_with_a_whole_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "o.jsonl.journal"
    spans: list[int] = []  # where each read of the reader's started
    lines_backwards = facts_module._lines_backwards

    def spy(f: Any, start: int, end: int) -> Any:
        spans.append(start)
        return lines_backwards(f, start, end)

    reader = JournalReader(path)
    with Journal(path) as journal:
        for i in range(6):
            journal.append(result(f"r{i}", "error" if i == 2 else "ok", at=1000 + i), "h")
        journal.sync()
        monkeypatch.setattr(facts_module, "_lines_backwards", spy)
        first = reader.facts()
        assert first is not None and (first.ok, first.error) == (5, 1)
        journal.append(result("r6", at=1006), "h")  # a new request: read alone
        journal.append(result("r7", "error", at=1007), "h")
        journal.sync()
        again = reader.facts()
        assert spans[0] == 0 and spans[1] > 0  # only the appended lines read
        assert again == journal_facts(path)
        assert again is not None and (again.ok, again.error) == (6, 2)
        assert [e.custom_id for e in again.last_errors] == ["r7", "r2"]
        journal.append(result("r2", at=1008), "h")  # re-sent: its error record is replaced
        journal.sync()
        spans.clear()
        resent = reader.facts()
        assert spans == [spans[0], 0] and spans[0] > 0  # the appended line, then all again
        assert resent == journal_facts(path)
        assert resent is not None and (resent.ok, resent.error) == (7, 1)
    reader.close()
