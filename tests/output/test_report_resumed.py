"""``batcher report`` of a job run more than once: a resumed run's journal after compaction
(its compact records read back from the output's rows, or left out with a note when the
output is gone), and a header that spans every answer, not only the last run's."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx

from batcher.job_file import job_from_dict
from batcher.output.journal import Journal, journal_path
from batcher.output.provenance import run_record
from batcher.output.reading import read_results
from batcher.output.report import build_report
from batcher.output.report_html import render_html
from batcher.output.report_text import format_report
from batcher.output.writers import open_writer
from batcher.records import Result, Usage
from batcher.runner.run import RunReport, run_job
from batcher.runner.status_file import status_path
from tests.helpers import write_input
from tests.output.test_resume import Server

T0 = 1_796_600_000.0  # 2026-12-06 23:33:20 UTC


def run(tmp_path: Path, server: Any, out: str, *, attempts: int = 1, **kw: Any) -> RunReport:
    job = job_from_dict(
        {
            "job": {"name": "night", "input": str(tmp_path / "in.jsonl"),
                    "output": str(tmp_path / out), "progress": False},
            "endpoint": {"base_url": "http://mock.test/v1"},
            "request": {"model": "m"},
            "retry": {"max_attempts": attempts, "backoff_initial_s": 0.01,
                      "backoff_max_s": 0.02},
        }
    )  # fmt: skip
    return run_job(job, transport=httpx.MockTransport(server), stream=io.StringIO(), **kw)


def answer(i: int, at: float) -> Result:
    """A full record a resumed run appends, finished at ``at``."""
    return Result(
        custom_id=f"r{i:05d}", line=i + 1, status="ok", model="m", attempts=1, latency_s=0.5,
        started_at=at - 0.5, finished_at=at, status_code=200, request_id=None,
        body={"choices": [{"message": {"content": f"late {i}"}}]},
        usage=Usage(prompt_tokens=4, completion_tokens=6, total_tokens=10), cost_usd=0.5,
    )  # fmt: skip


def write(path: Path, results: list[Result], meta: dict[str, str] | None = None) -> Path:
    with open_writer(path, metadata=meta) as writer:
        for r in results:
            writer.write(r)
    return path


def test_report_of_a_resumed_run_reads_compact_records_from_the_output(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 20)
    first = run(tmp_path, Server(not_found={4}), "o.parquet")
    rows = list(read_results(first.output))
    first_start = min(r["started_at"] for r in rows)
    with Journal(journal_path(first.output)) as journal:  # a resumed run, still running
        now = max(r["finished_at"] for r in rows).timestamp() + 5
        for i in (20, 21, 22):
            journal.append(answer(i, now + i), "h")
        journal.sync()
        report, series = build_report(first.output)
        assert report.source == "journal" and report.state is not None
        assert report.state.startswith("running")
        assert (report.requests, report.ok, report.error, report.left_out) == (23, 22, 1, 0)
        assert set(report.groups) == {"m"} and report.usage_missing == 0
        assert (
            report.groups["m"]["ok"].completion_tokens
            == sum(r["completion_tokens"] or 0 for r in rows) + 3 * 6
        )
        assert report.started_at == first_start.isoformat(timespec="seconds")
        assert min(series["finished_at"]) >= first_start.timestamp()  # no answer from 1970
        assert 0 < report.wall_s < 60 + 22  # the two runs' answers, not 56 years
        assert report.error_classes == {"not_found": 1}
        assert "usage missing" not in format_report(report)
    # the resumed run killed: no run holds the journal, which holds more than the output
    report, _ = build_report(first.output)
    assert report.source == "journal" and str(report.state).startswith("not finished")
    assert (report.requests, report.ok, report.left_out) == (23, 22, 0)
    first.output.unlink()  # and the output gone
    report, _ = build_report(first.output)
    assert report.source == "journal" and report.state is not None
    # not "the same command resumes it": a run is refused until the output is back
    assert report.state.startswith("its output is gone (put it back, or run with --restart")
    assert (report.requests, report.ok, report.left_out) == (3, 3, 20)
    assert set(report.groups) == {"m"} and report.usage_missing == 0
    text = format_report(report)
    assert "20 requests answered before are left out" in text
    assert text.splitlines()[0].endswith("(its output is gone: what its journal still holds)")


def test_the_header_spans_every_answer_and_names_the_last_run(tmp_path: Path) -> None:
    # every answer came in a first run; a second one, an hour later, had nothing to send
    last_run = run_record(
        state="finished", exit_code=0, started_at=T0 + 3600, ended_at=T0 + 3601,
        rate_limited_at={},
    )  # fmt: skip
    path = write(tmp_path / "o.parquet", [answer(i, T0 + i) for i in range(5)], last_run)
    report, _ = build_report(path)
    assert (report.state, report.exit_code) == ("finished", 0)
    assert report.started_at == "2026-12-06T23:33:19+00:00"  # the first answer's start
    assert report.ended_at == "2026-12-06T23:33:24+00:00"  # the last answer's end
    assert report.last_run_started_at == "2026-12-07T00:33:20+00:00"
    assert report.last_run_ended_at == "2026-12-07T00:33:21+00:00"
    text = format_report(report)
    assert "answers 2026-12-06T23:33:19+00:00 to 2026-12-06T23:33:24+00:00 UTC" in text
    assert "last run 2026-12-07T00:33:20+00:00 to 2026-12-07T00:33:21+00:00 UTC" in text
    page = render_html(report, build_report(path)[1])
    assert "<dt>last run (UTC)</dt><dd>2026-12-07 00:33:20 to 2026-12-07 00:33:21</dd>" in page
    assert "<dt>ended (UTC)</dt><dd>2026-12-06 23:33:24</dd>" in page


def test_a_jsonl_output_takes_its_last_run_from_the_status_file(tmp_path: Path) -> None:
    path = write(tmp_path / "o.jsonl", [answer(i, T0 + i) for i in range(3)])
    assert build_report(path)[0].state is None  # no metadata, no status file
    info = {"batcher_status": 1, "state": "stopped", "exit_code": 3, "job": "night",
            "stop_reason": "--max-cost reached", "started_at": T0 - 10,
            "ended_at": T0 + 60}  # fmt: skip
    status_path(path).write_text(json.dumps(info))
    report, _ = build_report(path)
    assert (report.job_name, report.exit_code) == ("night", 3)
    assert report.state == "stopped early: --max-cost reached"
    assert report.last_run_started_at == "2026-12-06T23:33:10+00:00"
    assert report.last_run_ended_at == "2026-12-06T23:34:20+00:00"
    assert report.started_at == "2026-12-06T23:33:19+00:00"


def test_a_rerun_keeps_the_429s_of_the_runs_before(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 12)
    first_tries: set[int] = set()

    def server(request: httpx.Request) -> httpx.Response:
        number = int(json.loads(request.content)["messages"][-1]["content"].split(":")[0][9:])
        if number in (2, 5) and number not in first_tries:  # a 429 on each's first try
            first_tries.add(number)
            return httpx.Response(429, headers={"retry-after-ms": "1"}, json={})
        if number == 7 and len(first_tries) < 3:  # an error in the first run only
            first_tries.add(7)
            return httpx.Response(404, json={"error": {"message": "no", "code": "nf"}})
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        body = {"choices": [{"message": {"role": "assistant", "content": "a"}}], "usage": usage}
        return httpx.Response(200, json=body)

    first = run(tmp_path, server, "o.parquet", attempts=4)
    assert first.exit_code == 1 and first.stats.rate_limited == 2
    again = run(tmp_path, server, "o.parquet", attempts=4, retry_errors="all")
    assert again.exit_code == 0 and again.stats.rate_limited == 0
    report, _ = build_report(again.output)
    assert report.rate_limited == 2 and report.rate_limited_bins is not None
    assert sum(n for _, n in report.rate_limited_bins) == 2
