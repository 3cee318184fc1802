"""``batcher status`` of a job whose journal was compacted: the compact records counted from the
output's rows, the full records a resumed run appended from the journal, the latest record of
each request winning; and the status file of a job left alone by a run its checks refused."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from batcher.errors import ConfigError
from batcher.job_file import job_from_dict
from batcher.output.journal import Journal, journal_path
from batcher.output.journal_facts import JournalReader, journal_facts
from batcher.output.reading import read_results
from batcher.records import Result, Usage
from batcher.runner.job_status import format_status, read_job_status
from batcher.runner.run import RunReport, run_job
from batcher.runner.status_file import read_status_file, status_path
from tests.helpers import write_input
from tests.output.test_resume import Server


def run(tmp_path: Path, server: Server, out: str, **kw: Any) -> RunReport:
    job = job_from_dict(
        {
            "job": {"name": "night", "input": str(tmp_path / "in.jsonl"),
                    "output": str(tmp_path / out), "progress": False},
            "endpoint": {"base_url": "http://mock.test/v1"},
            "request": {"model": "m"},
            "retry": {"max_attempts": 1},
        }
    )  # fmt: skip
    return run_job(job, transport=httpx.MockTransport(server), stream=io.StringIO(), **kw)


def answer(i: int, status: str = "ok") -> Result:
    """A full record a resumed run appends: 10 tokens, $0.5 when ok, finished at 2000 + i."""
    ok = status == "ok"
    return Result(
        custom_id=f"r{i:05d}", line=i + 1, status="ok" if ok else "error", model="m",
        attempts=1, latency_s=0.5, started_at=1999.5 + i, finished_at=2000.0 + i,
        status_code=200 if ok else 500, request_id=None, body=None,
        usage=Usage(prompt_tokens=4, completion_tokens=6, total_tokens=10) if ok else None,
        cost_usd=0.5 if ok else None, error_code=None if ok else "server_error",
        error_message=None if ok else f"boom {i}",
    )  # fmt: skip


@pytest.mark.parametrize("out", ["o.parquet", "o.jsonl"])
def test_status_counts_a_compacted_journal_and_what_a_resumed_run_appended(
    tmp_path: Path, out: str
) -> None:
    write_input(tmp_path / "in.jsonl", 20)
    first = run(tmp_path, Server(not_found={4, 7}), out)
    assert first.exit_code == 1 and '"compact":true' in journal_path(first.output).read_text()
    rows = list(read_results(first.output))
    assert len(rows) == 20 and sum(r["status"] == "ok" for r in rows) == 18
    output_tokens = sum(r["total_tokens"] or 0 for r in rows if r["custom_id"] != "r00004")
    reader = JournalReader(journal_path(first.output))  # --watch: kept between two reads
    before = reader.facts()
    assert (before.ok, before.error, before.total_tokens) == (18, 2, 36)
    assert [e.custom_id for e in before.last_errors] == ["r00007", "r00004"]
    # a resumed run (40 lines more, r00004 sent again): its full records after the compact ones
    with Journal(journal_path(first.output)) as journal:
        for i in (20, 21, 22):
            journal.append(answer(i), "h")
        journal.append(answer(23, "error"), "h")
        journal.append(answer(4), "h")  # its error in the output is replaced
    facts = journal_facts(journal_path(first.output))
    assert (facts.done, facts.ok, facts.error) == (24, 22, 2)
    assert facts.total_tokens == output_tokens + 4 * 10
    assert facts.cost_usd == pytest.approx(sum(r["cost_usd"] or 0 for r in rows) + 4 * 0.5)
    assert facts.error_codes == {"not_found": 1, "server_error": 1}
    assert [e.custom_id for e in facts.last_errors] == ["r00023", "r00007"]
    newest = max(r["finished_at"] for r in rows).timestamp()  # the first run's: after 2023
    assert facts.last_finished_at == newest and facts.first_started_at == 2003.5
    assert facts.unread == 0
    assert reader.facts() == facts  # read again: the same as a whole read
    reader.close()
    shown = format_status(read_job_status(first.output))
    assert "24/20 (120%) done: 22 ok, 2 error" in shown  # the first run's total: 20 lines


def test_status_of_a_compacted_journal_whose_output_is_gone(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 10)
    first = run(tmp_path, Server(not_found={2}), "o.parquet")
    cost = sum(r["cost_usd"] or 0 for r in read_results(first.output))
    first.output.unlink()
    with Journal(journal_path(first.output)) as journal:
        journal.append(answer(10), "h")
    status = read_job_status(first.output)
    facts = status.facts
    assert (facts.done, facts.ok, facts.error, facts.unread) == (11, 10, 1, 10)
    assert facts.total_tokens == 10 and facts.cost_usd == pytest.approx(cost + 0.5)
    assert "10 requests' tokens and times unknown" in format_status(status)


def test_a_run_refused_because_its_output_is_gone_leaves_the_status_file(
    tmp_path: Path,
) -> None:
    write_input(tmp_path / "in.jsonl", 10)
    first = run(tmp_path, Server(), "o.parquet")
    before = read_status_file(first.output)
    assert before is not None and before["state"] == "finished"
    first.output.unlink()
    with pytest.raises(ConfigError, match="is gone"):
        run(tmp_path, Server(), "o.parquet")
    assert read_status_file(first.output) == before


def test_a_job_stopped_by_its_configuration_says_to_fix_it_first(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    journal_path(out).write_text('{"batcher_journal":1}\n')
    info = {"batcher_status": 1, "state": "stopped", "exit_code": 2, "job": "j",
            "stop_reason": "base_url: no such host"}  # fmt: skip
    status_path(out).write_text(json.dumps(info))
    resume = read_job_status(out).resume
    assert resume is not None and resume.startswith("fix what stopped it (base_url: no such")
    info |= {"exit_code": 3, "stop_reason": "interrupted"}
    status_path(out).write_text(json.dumps(info))
    assert str(read_job_status(out).resume).startswith("run the same batcher run command")
