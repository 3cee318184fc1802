"""Re-runs resume from the journal: nothing paid twice, errors re-sent on request, output whole."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from batcher.errors import ConfigError
from batcher.job_file import job_from_dict
from batcher.output.writers import read_results
from batcher.runner.run import RunReport, run_job
from tests.helpers import keep_full_journal, write_input


class Server:
    """A MockTransport handler: 404 for some questions, 503 for others, else a good answer."""

    def __init__(self, not_found: set[int] = frozenset(), unavailable: set[int] = frozenset()):  # type: ignore[assignment]
        self.not_found = set(not_found)
        self.unavailable = set(unavailable)
        self.calls: Counter[str] = Counter()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        text = body["messages"][-1]["content"]
        number = int(text.split(":")[0].removeprefix("Question "))
        self.calls[text] += 1
        if number in self.not_found:
            return httpx.Response(404, json={"error": {"message": "no", "code": "not_found"}})
        if number in self.unavailable:
            return httpx.Response(503, text="down")
        answer = {"message": {"role": "assistant", "content": f"A{number}:{text}"}}
        return httpx.Response(
            200,
            json={"choices": [answer], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                  "total_tokens": 2}},
        )  # fmt: skip


def run(tmp_path: Path, server: Server, out: str = "o.parquet", **kw: Any) -> RunReport:
    job = job_from_dict(
        {
            "job": {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / out),
                    "progress": False},
            "endpoint": {"base_url": "http://mock.test/v1"},
            "request": {"model": "m"},
            "retry": {"max_attempts": 1},
        }
    )  # fmt: skip
    return run_job(job, transport=httpx.MockTransport(server), stream=io.StringIO(), **kw)


def statuses(report: RunReport) -> dict[str, str]:
    rows = list(read_results(report.output))
    ids = [r["custom_id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id appears twice in the output"
    return {r["custom_id"]: r["status"] for r in rows}


def test_rerun_sends_nothing_that_is_recorded(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 12)
    server = Server(not_found={1}, unavailable={2, 3})
    first = run(tmp_path, server)
    assert first.exit_code == 1
    assert sum(server.calls.values()) == 12

    server.calls.clear()
    second = run(tmp_path, server)
    assert sum(server.calls.values()) == 0
    assert second.stats.skipped == 12 and second.stats.submitted == 0
    assert second.exit_code == 1  # the recorded errors are still in the output
    assert statuses(second) == statuses(first)
    assert "12 skipped (done before), 0 re-sent, 0 new" in second.summary


def test_retry_errors_retryable_resends_only_transient_failures(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 12)
    server = Server(not_found={1}, unavailable={2, 3})
    run(tmp_path, server)
    server.unavailable.clear()  # the outage is over
    server.calls.clear()
    report = run(tmp_path, server, retry_errors="retryable")
    assert sorted(k.split(":")[0] for k in server.calls) == ["Question 2", "Question 3"]
    assert report.stats.resent == 2
    final = statuses(report)
    assert final["r00001"] == "error" and final["r00002"] == final["r00003"] == "ok"
    assert Counter(final.values()) == {"ok": 11, "error": 1}

    server.calls.clear()
    run(tmp_path, server, retry_errors="all")  # the 404 is asked again too
    assert sorted(k.split(":")[0] for k in server.calls) == ["Question 1"]


def test_changed_line_is_resent_and_replaces_its_record(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 5)
    server = Server()
    run(tmp_path, server, out="o.jsonl")
    lines = src.read_text(encoding="utf-8").splitlines()
    changed = json.loads(lines[4])
    changed["messages"][0]["content"] = "Question 4: something else entirely"
    lines[4] = json.dumps(changed)
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    server.calls.clear()
    report = run(tmp_path, server, out="o.jsonl")
    assert list(server.calls) == ["Question 4: something else entirely"]
    rows = {r["custom_id"]: r for r in read_results(report.output)}
    assert len(rows) == 5
    assert rows["r00004"]["content"] == "A4:Question 4: something else entirely"
    assert "4 skipped (done before), 1 re-sent, 0 new" in report.summary


def test_new_lines_appended_to_the_input_are_sent_alone(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 5)
    server = Server()
    run(tmp_path, server)
    with (tmp_path / "in.jsonl").open("a", encoding="utf-8") as f:
        extra = tmp_path / "extra.jsonl"
        f.write(write_input(extra, 3, start=5).read_text(encoding="utf-8"))
    server.calls.clear()
    report = run(tmp_path, server)
    assert sorted(k.split(":")[0] for k in server.calls) == [f"Question {i}" for i in (5, 6, 7)]
    assert len(statuses(report)) == 8


def test_restart_forgets_the_journal(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 4)
    server = Server()
    run(tmp_path, server)
    server.calls.clear()
    report = run(tmp_path, server, restart=True)
    assert sum(server.calls.values()) == 4
    assert report.stats.skipped == 0 and len(statuses(report)) == 4


def test_unwritable_output_folder_sends_nothing(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 2)
    server = Server()
    job = job_from_dict(
        {
            "job": {"input": str(tmp_path / "in.jsonl"), "output": "/sys/o.parquet"},
            "endpoint": {"base_url": "http://mock.test/v1"},
            "request": {"model": "m"},
        }
    )
    with pytest.raises(ConfigError, match="not writable") as info:
        run_job(job, transport=httpx.MockTransport(server), stream=io.StringIO())
    assert info.value.field == "job.output"
    assert sum(server.calls.values()) == 0


def test_an_output_that_is_a_folder_sends_nothing(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 2)
    (tmp_path / "o.parquet").mkdir()  # e.g. the Ray engine's output of the same job
    server = Server()
    job = job_from_dict(
        {
            "job": {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "o.parquet")},
            "endpoint": {"base_url": "http://mock.test/v1"},
            "request": {"model": "m"},
        }
    )
    with pytest.raises(ConfigError, match="is a folder") as info:
        run_job(job, transport=httpx.MockTransport(server), stream=io.StringIO())
    assert info.value.field == "job.output"
    assert sum(server.calls.values()) == 0
    assert not (tmp_path / "o.parquet.journal").exists()


def test_too_little_free_space_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real full disk cannot be made here without privileges; disk_usage is the one mock.
    import shutil

    write_input(tmp_path / "in.jsonl", 2)
    server = Server()
    usage = shutil.disk_usage(tmp_path)._replace(free=1024 * 1024)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    with pytest.raises(ConfigError, match="only 1024 KiB free") as info:
        run(tmp_path, server)
    assert info.value.field == "job.output"
    assert sum(server.calls.values()) == 0


def test_a_journal_with_fields_this_version_does_not_know_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal written by another version (an unknown usage field, an unknown record field)
    is read: the unknown fields are ignored, the known ones kept, nothing is sent again."""
    keep_full_journal(monkeypatch)
    write_input(tmp_path / "in.jsonl", 3)
    server = Server()
    run(tmp_path, server)
    journal = tmp_path / "o.parquet.journal"
    lines = journal.read_text(encoding="utf-8").splitlines()
    for i in range(1, len(lines)):
        record = json.loads(lines[i])
        record["usage"]["audio_tokens"] = 7
        record["usage"]["prompt_tokens_details"] = {"cached_tokens": 0}
        record["a_field_from_the_future"] = {"x": 1}
        lines[i] = json.dumps(record)
    journal.write_text("\n".join(lines) + "\n", encoding="utf-8")
    server.calls.clear()
    report = run(tmp_path, server)
    assert report.exit_code == 0 and sum(server.calls.values()) == 0
    rows = list(read_results(report.output))
    assert sorted(r["custom_id"] for r in rows) == ["r00000", "r00001", "r00002"]
    assert all(r["status"] == "ok" and r["prompt_tokens"] == 1 for r in rows)
