"""The journal compacted once a run recorded every request and wrote its output; resume from a
compact journal (answers read back from the output); the older journal name adopted; failures
split off into ``OUTPUT.errors.jsonl``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from batcher.errors import ConfigError
from batcher.job_file import job_from_dict
from batcher.output.compaction import COMPACT_FIELDS
from batcher.output.formats import errors_path
from batcher.output.journal import Journal, journal_path
from batcher.output.live_output import finish_output, write_output
from batcher.output.writers import read_results
from batcher.records import Result
from batcher.runner.run import RunReport, run_job
from batcher.runner.stats import RunStats
from tests.helpers import jsonl, keep_full_journal, write_input
from tests.output.test_resume import Server


def run(tmp_path: Path, server: Server, out: str = "o.parquet", **kw: Any) -> RunReport:
    split = kw.pop("split_errors", False)
    job = job_from_dict(
        {
            "job": {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / out),
                    "progress": False, "split_errors": split},
            "endpoint": {"base_url": "http://mock.test/v1"},
            "request": {"model": "m"},
            "retry": {"max_attempts": 1},
        }
    )  # fmt: skip
    return run_job(job, transport=httpx.MockTransport(server), stream=io.StringIO(), **kw)


def journal_lines(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in journal_path(output).read_text().splitlines()]


def content(report: RunReport) -> dict[str, str | None]:
    return {r["custom_id"]: r["content"] for r in read_results(report.output)}


@pytest.mark.parametrize("out", ["o.parquet", "o.jsonl"])
def test_a_finished_run_leaves_a_compact_journal_and_a_rerun_writes_the_same_output(
    tmp_path: Path, out: str
) -> None:
    write_input(tmp_path / "in.jsonl", 30)
    server = Server(not_found={4})
    first = run(tmp_path, server, out)
    assert first.exit_code == 1
    header, *records = journal_lines(first.output)
    assert header["compact"] is True and len(records) == 30
    for i, record in enumerate(records):  # what resume needs, and the answer's row
        assert set(record) <= {*COMPACT_FIELDS, "variant", "row", "in_errors"}
        assert record["row"] == i and record["line"] == i + 1
    before = list(read_results(first.output))
    server.calls.clear()
    again = run(tmp_path, server, out)
    assert sum(server.calls.values()) == 0 and again.exit_code == 1
    assert list(read_results(again.output)) == before  # every answer read back as written


def test_retry_errors_and_a_changed_line_after_compaction_keep_the_earlier_answers(
    tmp_path: Path,
) -> None:
    write_input(tmp_path / "in.jsonl", 12)
    server = Server(unavailable={2, 5})
    first = run(tmp_path, server)
    answers = content(first)
    assert first.exit_code == 1 and answers["r00002"] is None
    server.unavailable.clear()
    server.calls.clear()
    retried = run(tmp_path, server, retry_errors="all")
    assert retried.exit_code == 0 and sum(server.calls.values()) == 2
    now = content(retried)
    assert now["r00002"] == "A2:Question 2: what is 2 squared? Ünïcödé ✓"
    assert {k: v for k, v in now.items() if k not in {"r00002", "r00005"}} == {
        k: v for k, v in answers.items() if k not in {"r00002", "r00005"}
    }
    lines = (tmp_path / "in.jsonl").read_text(encoding="utf-8").splitlines()
    lines[7] = lines[7].replace("Question 7:", "Question 70:")
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    server.calls.clear()
    changed = run(tmp_path, server)
    assert sum(server.calls.values()) == 1
    after = content(changed)
    assert after["r00007"] is not None and after["r00007"].startswith("A70:")
    assert [r["line"] for r in read_results(changed.output)] == list(range(1, 13))
    assert {k: v for k, v in after.items() if k != "r00007"} == {
        k: v for k, v in now.items() if k != "r00007"
    }


def test_an_output_gone_with_its_compact_journal_is_refused_until_restart(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 5)
    server = Server()
    first = run(tmp_path, server)
    first.output.unlink()
    server.calls.clear()
    with pytest.raises(ConfigError, match=r"is gone.*--restart") as info:
        run(tmp_path, server)
    assert info.value.field == "job.output" and sum(server.calls.values()) == 0
    restarted = run(tmp_path, server, restart=True)
    assert restarted.exit_code == 0 and sum(server.calls.values()) == 5


def test_rows_that_moved_are_found_by_their_id(tmp_path: Path) -> None:
    """A crash between writing the output and compacting its journal leaves records whose
    rows point elsewhere: the answer is found by its id, never taken from another row."""
    write_input(tmp_path / "in.jsonl", 8)
    server = Server()
    first = run(tmp_path, server)
    before = list(read_results(first.output))
    header, *records = journal_lines(first.output)
    for record in records:
        record["row"] = 7 - record["row"]
    text = "".join(json.dumps(r) + "\n" for r in [header, *records])
    journal_path(first.output).write_text(text)
    write_input(tmp_path / "in.jsonl", 9)  # one line more, so the output is written again
    server.calls.clear()
    again = run(tmp_path, server)
    assert sum(server.calls.values()) == 1
    assert list(read_results(again.output))[:8] == before


def test_an_older_journal_name_is_adopted_and_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep_full_journal(monkeypatch)  # as an older version left it
    write_input(tmp_path / "in.jsonl", 4)
    server = Server()
    first = run(tmp_path, server)
    old = tmp_path / "o.parquet.journal.jsonl"
    journal_path(first.output).rename(old)
    write_input(tmp_path / "in.jsonl", 6)
    server.calls.clear()
    again = run(tmp_path, server)
    assert sum(server.calls.values()) == 2  # the two new lines only
    assert not old.exists() and journal_path(again.output).exists()
    assert len(list(read_results(again.output))) == 6


def answered(custom_id: str, line: int, cost: float, status: str = "ok") -> Result:
    return Result(
        custom_id=custom_id, line=line, status="ok" if status == "ok" else "error", model="m",
        attempts=1, latency_s=0.1, started_at=1.0, finished_at=2.0, status_code=200,
        body={"choices": [{"message": {"content": "x" * 200}}]}, cost_usd=cost,
    )  # fmt: skip


def test_compaction_keeps_what_was_spent_and_a_stopped_run_keeps_its_journal(
    tmp_path: Path,
) -> None:
    out, path = tmp_path / "o.parquet", tmp_path / "o.parquet.journal"
    with Journal(path) as journal:
        journal.append(answered("a", 1, 0.25), "h")
        journal.append(answered("a", 1, 0.5), "h")  # re-sent: both were paid
        journal.append(answered("b", 2, 1.0), "h")
        stopped = RunStats(stopped_early=True)
        finish_output(journal, None, out, stopped, dict)
    assert '"body"' in path.read_text()  # not compacted: the run did not record everything
    full_size = path.stat().st_size
    with Journal(path) as journal:
        assert journal.spent_before == pytest.approx(1.75)
        finish_output(journal, None, out, RunStats(), dict)
    assert path.stat().st_size < full_size and '"body"' not in path.read_text()
    with Journal(path) as journal:
        assert journal.spent_before == pytest.approx(1.75)
        assert journal.kept_elsewhere() == {"output"}
        journal.append(answered("c", 3, 2.0), "h")
        write_output(journal, out, RunStats())  # holds compact records: compacted again
    with Journal(path) as journal:
        assert journal.spent_before == pytest.approx(3.75)
    rows = list(read_results(out))
    assert [r["custom_id"] for r in rows] == ["a", "b", "c"] and rows[0]["cost_usd"] == 0.5


@pytest.mark.parametrize("out", ["o.parquet", "o.jsonl"])
def test_split_errors_writes_failures_apart_and_resumes(tmp_path: Path, out: str) -> None:
    write_input(tmp_path / "in.jsonl", 10)
    server = Server(not_found={1, 4}, unavailable={6})
    first = run(tmp_path, server, out, split_errors=True)
    assert first.exit_code == 1
    assert [r["custom_id"] for r in read_results(first.output)] == [
        f"r{i:05d}" for i in range(10) if i not in {1, 4, 6}
    ]
    errors = errors_path(first.output)
    assert errors.name == out + ".errors.jsonl"
    failed = list(read_results(errors))  # the output's line format
    assert [(r["custom_id"], r["status"]) for r in failed] == [
        ("r00001", "error"), ("r00004", "error"), ("r00006", "error")
    ]  # fmt: skip
    assert [r["status_code"] for r in failed] == [404, 404, 503]
    assert all(line["response"] is None or line["error"] is None for line in jsonl(errors))
    server.calls.clear()
    again = run(tmp_path, server, out, split_errors=True)  # from the compact journal
    assert sum(server.calls.values()) == 0
    assert list(read_results(errors)) == failed
    server.not_found.clear()
    server.unavailable.clear()
    fixed = run(tmp_path, server, out, split_errors=True, retry_errors="all")
    assert fixed.exit_code == 0 and sum(server.calls.values()) == 3
    assert len(list(read_results(fixed.output))) == 10 and not errors.exists()
    assert again.output == fixed.output
