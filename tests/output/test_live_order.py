"""A fresh run's output written in input order as the run goes (``live_output`` following the
engine's watermark), over the simulator: retries and jittered answers that come out of order,
variants, rejected and duplicate lines, a run stopped and resumed, failures split off; and the
compact journal written beside it, put in place without reading the journal again."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from batcher.job_file import job_from_dict
from batcher.output import journal as journal_module
from batcher.output import live_output
from batcher.output.formats import errors_path, rejects_path
from batcher.output.journal import Journal, journal_path
from batcher.output.live_output import LiveOutput
from batcher.output.writers import read_results
from batcher.records import Result
from batcher.runner.run import run_job
from batcher.runner.stats import RunStats
from batcher.sim.config import SimConfig
from batcher.sim.serve import running_sim
from tests.helpers import ids_of, jsonl, write_input

FAST_RETRIES = {"max_attempts": 8, "backoff_initial_s": 0.01, "backoff_max_s": 0.05}


def job_for(tmp_path: Path, base_url: str, output: str, **extra: Any) -> Any:
    tables: dict[str, Any] = {
        "job": {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / output),
                "progress": False, **extra.pop("job", {})},
        "endpoint": {"base_url": base_url},
        "request": {"model": "gpt-4o-mini", "max_tokens": 16},
        "limits": {"concurrency": 16},
        "retry": FAST_RETRIES,
    }  # fmt: skip
    return job_from_dict(tables | extra)


@pytest.fixture
def at_close(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """(rows held back, gave up) of each live output when it closes."""
    seen: list[tuple[int, bool]] = []
    real_close = LiveOutput.close

    def watched(self: LiveOutput, *args: Any, **kwargs: Any) -> bool:
        seen.append((self.held_rows, self.failed))
        return real_close(self, *args, **kwargs)

    monkeypatch.setattr(LiveOutput, "close", watched)
    return seen


@pytest.fixture
def journal_read_back(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each time the journal's records are read back (``latest``): the output written from
    the journal, or the journal compacted by reading it."""
    reads: list[str] = []
    real_latest = Journal.latest

    def latest(self: Journal) -> Any:
        reads.append(self.path.name)
        return real_latest(self)

    monkeypatch.setattr(journal_module.Journal, "latest", latest)
    return reads


def is_compact(journal: Path) -> bool:
    header = json.loads(journal.read_text().splitlines()[0])
    return header.get("compact") is True


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_retried_and_jittered_answers_are_written_in_input_order_as_they_settle(
    tmp_path: Path,
    suffix: str,
    at_close: list[tuple[int, bool]],
    journal_read_back: list[str],
) -> None:
    n = 300
    write_input(tmp_path / "in.jsonl", n)
    # a fifth of the attempts fail and are retried: their answers come long after the next
    # lines'; the jitter shuffles the rest
    config = SimConfig(latency_ms=1, latency_jitter_ms=15, error_rate=0.2, seed=11)
    with running_sim(config) as sim:
        report = run_job(job_for(tmp_path, sim.base_url, "o" + suffix), stream=io.StringIO())
        assert report.exit_code == 0 and report.stats.retries > 0
        [(held, failed)] = at_close
        # written as the run went: held back at the end, only the rows after the last
        # requests to settle (a request in its retries holds back the rows after it)
        assert not failed and held < n // 4
        rows = list(read_results(report.output))
        assert ids_of(rows) == [f"r{i:05d}" for i in range(n)]
        assert [r["line"] for r in rows] == list(range(1, n + 1))
        assert journal_read_back == []  # neither written nor compacted from the journal
        assert is_compact(journal_path(report.output))
        assert not list(tmp_path.glob("*.partial"))
        # the compact journal's rows point at the answers: a re-run writes the same output
        again = run_job(job_for(tmp_path, sim.base_url, "o" + suffix), stream=io.StringIO())
    assert again.stats.skipped == n
    assert list(read_results(again.output)) == rows


def test_variants_rejects_and_duplicates_keep_the_input_order(
    tmp_path: Path, at_close: list[tuple[int, bool]]
) -> None:
    # Three variants run as three lanes, each at its own pace; rejected lines (not JSON, a
    # duplicate id) are never sent and never hold the rows after them back.
    lines = []
    for i in range(60):
        lines.append(json.dumps({"custom_id": f"r{i:03d}", "prompt": f"Question {i}"}))
        if i % 10 == 3:
            lines.append("not json")
        if i % 10 == 7:
            lines.append(json.dumps({"custom_id": f"r{i - 1:03d}", "prompt": "again"}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    variants = [{"name": name, "temperature": t / 10} for t, name in enumerate(["c", "a", "b"])]
    config = SimConfig(latency_ms=1, latency_jitter_ms=15, error_rate=0.1, seed=5)
    with running_sim(config) as sim:
        job = job_for(tmp_path, sim.base_url, "o.parquet", variants=variants)
        report = run_job(job, stream=io.StringIO())
    assert report.exit_code == 1  # rejected lines
    assert report.stats.ok == 180 and report.stats.rejected == 12
    [(held, failed)] = at_close
    # rows were written as the run went; the lanes go at their own pace, and the rows of
    # the lines the slowest one has not settled are held back
    assert not failed and held < 180
    rows = list(read_results(report.output))
    expected = [(f"r{i:03d}", v) for i in range(60) for v in ["c", "a", "b"]]
    assert [(r["custom_id"].split(":")[0], r["variant"]) for r in rows] == expected
    lines_of = [r["line"] for r in rows]
    assert lines_of == sorted(lines_of)
    assert len(jsonl(rejects_path(report.output))) == 12  # 6 not JSON, 6 duplicates
    assert is_compact(journal_path(report.output))


def test_a_run_stopped_mid_way_then_resumed_writes_each_id_once_in_order(
    tmp_path: Path, at_close: list[tuple[int, bool]]
) -> None:
    n = 120
    write_input(tmp_path / "in.jsonl", n)
    config = SimConfig(latency_ms=1, latency_jitter_ms=10, seed=2)
    with running_sim(config) as sim:
        capped = job_for(
            tmp_path, sim.base_url, "o.jsonl", limits={"concurrency": 8, "max_cost_usd": 0.0003}
        )
        stopped = run_job(capped, stream=io.StringIO())
        assert stopped.exit_code == 3  # the budget ran out: resumable
        written = ids_of(list(read_results(stopped.output)))
        assert 0 < len(written) < n
        assert written == sorted(written) and len(set(written)) == len(written)
        assert not at_close[0][1]  # written as the run went, then closed
        journal = journal_path(stopped.output)
        assert not is_compact(journal)  # a stopped run keeps its full journal
        assert not list(tmp_path.glob("*.partial"))
        resumed = run_job(job_for(tmp_path, sim.base_url, "o.jsonl"), stream=io.StringIO())
    assert resumed.exit_code == 0
    assert ids_of(list(read_results(resumed.output))) == [f"r{i:05d}" for i in range(n)]
    assert len(at_close) == 1  # the resumed run wrote its output from the journal
    assert is_compact(journal)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_failures_split_off_are_in_order_and_the_compact_journal_points_at_them(
    tmp_path: Path, suffix: str, at_close: list[tuple[int, bool]]
) -> None:
    n = 200
    write_input(tmp_path / "in.jsonl", n)
    config = SimConfig(latency_ms=1, latency_jitter_ms=10, error_rate=0.3,
                       error_kinds=("400",), seed=8)  # fmt: skip
    with running_sim(config) as sim:
        job = job_for(tmp_path, sim.base_url, "o" + suffix, job={"split_errors": True})
        report = run_job(job, stream=io.StringIO())
        assert report.exit_code == 1
        [(_, failed)] = at_close
        assert not failed
        ok, errors = list(read_results(report.output)), jsonl(errors_path(report.output))
        assert ok and errors and len(ok) + len(errors) == n
        assert ids_of(ok) == sorted(ids_of(ok)) and all(r["status"] == "ok" for r in ok)
        failed_ids = [line["custom_id"] for line in errors]
        assert failed_ids == sorted(failed_ids)
        assert is_compact(journal_path(report.output))
        records = [json.loads(x) for x in journal_path(report.output).read_text().splitlines()]
        in_errors = sorted((r["row"], r["custom_id"]) for r in records[1:] if r.get("in_errors"))
        assert [cid for _, cid in in_errors] == failed_ids
        assert [row for row, _ in in_errors] == list(range(len(failed_ids)))
        # a re-run sends nothing and writes both files again from the rows they point at
        again = run_job(job, stream=io.StringIO())
    assert list(read_results(again.output)) == ok
    assert jsonl(errors_path(again.output)) == errors


def test_past_the_bound_of_held_rows_the_output_is_written_from_the_journal(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    at_close: list[tuple[int, bool]],
    journal_read_back: list[str],
) -> None:
    # A bound of a few rows: the answers that come before an earlier line's pass it, the
    # live output gives up, and the output is written (and the journal compacted) from the
    # journal at the end, whole and in order.
    monkeypatch.setattr(live_output, "LIVE_OUTPUT_MAX_HELD_BYTES", 3_000)
    n = 100
    write_input(tmp_path / "in.jsonl", n)
    config = SimConfig(latency_ms=1, latency_jitter_ms=20, error_rate=0.2, seed=4)
    with running_sim(config) as sim:
        report = run_job(job_for(tmp_path, sim.base_url, "o.parquet"), stream=io.StringIO())
    assert report.exit_code == 0
    [(held, failed)] = at_close
    assert failed and held == 0
    assert ids_of(list(read_results(report.output))) == [f"r{i:05d}" for i in range(n)]
    assert journal_read_back  # written from the journal
    assert is_compact(journal_path(report.output))
    assert not list(tmp_path.glob("*.partial"))


def _result(line: int) -> Result:
    return Result(
        custom_id=f"r{line}", line=line, status="ok", model="m", attempts=1, latency_s=0.1,
        started_at=1.0, finished_at=2.0, status_code=200, body={"choices": []},
    )  # fmt: skip


def test_a_row_whose_place_was_written_already_sends_the_output_to_the_journal(
    tmp_path: Path,
) -> None:
    # A result held back (one of an endpoint's first 404s, say) and recorded once its line
    # was settled: a row after it may be written already, and the output is then written
    # from the journal at the end, in order.
    output = tmp_path / "o.jsonl"
    settled_below = 1
    stats = RunStats()
    with Journal(journal_path(output)) as journal:
        live = LiveOutput(journal, output, dict)
        live.follow(lambda: settled_below)
        live._prepare()  # the writer ready at once (else the first records wait for it)
        live.append(_result(1), "h")
        assert live.held_rows == 1  # line 1 is not settled
        settled_below = 3
        live.append(_result(2), "h")
        assert live.held_rows == 0  # 1 and 2 written
        settled_below = 4
        live.append(_result(4), "h")
        live.append(_result(3), "h")  # late, but 4 is still held: 3 is written before it
        assert live.held_rows == 1 and not live.failed
        settled_below = 8
        live.append(_result(7), "h")  # 4 and 7 written
        live.append(_result(6), "h")  # below what is written: too late
        assert live.failed and live.held_rows == 0
        live_output.finish_output(journal, live, output, stats, dict)
    assert ids_of(list(read_results(output))) == ["r1", "r2", "r3", "r4", "r6", "r7"]
    assert not list(tmp_path.glob("*.partial"))
