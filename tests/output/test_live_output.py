"""The output written as the run goes (``batcher.output.live_output``), over the simulator.

A run that starts with an empty journal writes its output while it runs; the file must be the
one the journal would give (``live_output.write_output``), re-asked answers included, and a run that
fails or whose live output fails must leave a whole output, or the previous one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq
import pytest

from batcher.config import JobConfig
from batcher.job_file import job_from_dict
from batcher.output import live_output, writers
from batcher.output.formats import rejects_path
from batcher.output.journal import Journal, journal_path
from batcher.output.live_output import LiveOutput, write_output
from batcher.output.provenance import provenance
from batcher.output.shape import output_shape
from batcher.output.writers import read_results
from batcher.records import Result
from batcher.runner import run as runner
from batcher.runner.progress import Progress
from batcher.runner.run import arun_job, run_job
from batcher.runner.stats import RunStats
from batcher.sim.config import SimConfig
from batcher.sim.serve import running_sim
from tests.helpers import keep_full_journal

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "rank": {"type": "integer"}},
    "required": ["city", "rank"],
}


def output_count(stats: RunStats) -> int:
    """Records in the final output (a finished run knows how many)."""
    assert stats.output_ok is not None and stats.output_error is not None
    return stats.output_ok + stats.output_error


def structured_job(
    tmp_path: Path, base_url: str, output: str, n: int, concurrency: int = 8
) -> JobConfig:
    src = tmp_path / "in.jsonl"
    with src.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"c{i}", "prompt": f"City {i} as JSON"}) + "\n")
    return job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / output), "progress": False},
            "endpoint": {"base_url": base_url},
            "request": {
                "model": "gpt-4o-mini",
                "max_tokens": 100,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "city", "schema": SCHEMA},
                },
            },
            "limits": {"concurrency": concurrency},
            "validate": {"json_schema": True, "max_reasks": 2},
        }
    )


def rebuilt_from_journal(output: Path, into: Path, job: JobConfig) -> list[dict[str, Any]]:
    with Journal(journal_path(output)) as journal:
        write_output(journal, into, RunStats(), shape=output_shape(job))
    return list(read_results(into))


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_live_output_is_what_the_journal_gives(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep_full_journal(monkeypatch)
    gave_up: list[bool] = []
    real_close = LiveOutput.close

    def watched(self: LiveOutput, *args: Any, **kwargs: Any) -> bool:
        gave_up.append(self.failed)
        return real_close(self, *args, **kwargs)

    monkeypatch.setattr(LiveOutput, "close", watched)
    config = SimConfig(schema_error_rate=0.4, seed=3, latency_ms=5, latency_jitter_ms=10)
    with running_sim(config) as sim:
        job = structured_job(tmp_path, sim.base_url, "o" + suffix, 30)
        report = run_job(job, stream=io.StringIO())
    assert report.exit_code == 0
    assert gave_up == [False]  # re-asked lines settle once their final record is in
    journaled = journal_path(report.output).read_text().splitlines()
    assert any('"provisional":true' in line for line in journaled)  # re-asks were journaled
    rows = list(read_results(report.output))
    assert len(rows) == 30 == output_count(report.stats)
    assert sorted(r["custom_id"] for r in rows) == [f"c{i}" for i in sorted(range(30), key=str)]
    rebuilt = rebuilt_from_journal(report.output, tmp_path / ("again" + suffix), job)
    assert rows == rebuilt  # same records, same order, each re-asked one in its final form
    assert not list(tmp_path.glob("*.partial"))


def test_a_live_output_that_fails_is_written_from_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = writers.ParquetWriter.write
    calls = 0

    def failing_once(self: writers.ParquetWriter, result: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise OSError(28, "No space left on device")
        real_write(self, result)

    monkeypatch.setattr(writers.ParquetWriter, "write", failing_once)
    with running_sim(SimConfig(latency_ms=2)) as sim:
        job = structured_job(tmp_path, sim.base_url, "o.parquet", 20)
        report = run_job(job, stream=io.StringIO())
    assert report.exit_code == 0
    rows = list(read_results(report.output))
    assert sorted(r["custom_id"] for r in rows) == sorted(f"c{i}" for i in range(20))
    assert report.stats.output_ok == 20
    assert not list(tmp_path.glob("*.partial"))


def test_a_run_that_fails_leaves_the_previous_output_and_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "o.parquet"
    with running_sim(SimConfig(latency_ms=2)) as sim:
        job = structured_job(tmp_path, sim.base_url, "o.parquet", 10)
        run_job(job, stream=io.StringIO())
        before = pq.read_table(output)
        advanced = 0
        real_advance = Progress.advance

        def breaks_on_the_fourth(self: Progress, n: int = 1) -> None:
            nonlocal advanced
            advanced += 1
            if advanced == 4:
                raise RuntimeError("a bug")
            real_advance(self, n)

        monkeypatch.setattr(Progress, "advance", breaks_on_the_fourth)
        with pytest.raises(BaseExceptionGroup) as failed:
            run_job(job, restart=True, stream=io.StringIO())
        assert failed.group_contains(RuntimeError, match="a bug", depth=None)
    assert pq.read_table(output).equals(before)
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("latency_ms", [1, 100])
def test_the_writer_import_and_the_input_hash_never_run_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, latency_ms: int
) -> None:
    keep_full_journal(monkeypatch)
    # They are held here, as a large input's hash would be, until a pool's worth of answers
    # is journaled: only a loop that goes on meanwhile journals them. The first final record
    # starts them in a thread; the answers that come meanwhile are journaled and wait, in
    # order, for the writer.
    threads: list[int] = []
    journaled_meanwhile: list[int] = []

    def journaled() -> int:
        try:
            lines = journal_path(tmp_path / "o.parquet").read_text().count("\n")
        except FileNotFoundError:
            return 0
        return max(lines - 1, 0)  # the journal's header line

    def slow_provenance(*args: Any) -> dict[str, str]:
        threads.append(threading.get_ident())
        deadline = time.monotonic() + 30  # generous: the loop journals these in milliseconds
        while journaled() < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        journaled_meanwhile.append(journaled())
        return provenance(*args)

    monkeypatch.setattr(runner, "provenance", slow_provenance)
    with running_sim(SimConfig(latency_ms=latency_ms)) as sim:
        job = structured_job(tmp_path, sim.base_url, "o.parquet", 30)
        report = run_job(job, stream=io.StringIO())
    assert len(threads) == 1 and threads[0] != threading.get_ident()
    assert journaled_meanwhile[0] >= 8  # a pool's worth at least: the loop was not held up
    assert pq.read_schema(report.output).metadata[b"batcher.input"]
    rows = list(read_results(report.output))
    assert len(rows) == 30 == output_count(report.stats)
    assert rows == rebuilt_from_journal(report.output, tmp_path / "again.parquet", job)


def test_a_run_that_sends_nothing_ends_and_writes_an_empty_output(tmp_path: Path) -> None:
    # Every line is rejected: no request goes out, no answer comes, and the run ends at once
    # with an output of no rows.
    src = tmp_path / "in.jsonl"
    src.write_text("not json\n[1, 2]\n")
    output = tmp_path / "o.parquet"
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(output), "progress": False},
            "endpoint": {"base_url": "http://127.0.0.1:9/v1"},  # never asked
            "request": {"model": "gpt-4o-mini"},
        }
    )

    async def main() -> None:
        with anyio.fail_after(30):
            await arun_job(job, stream=io.StringIO())

    anyio.run(main)
    assert pq.read_table(output).num_rows == 0
    rejects = [json.loads(line) for line in rejects_path(output).read_text().splitlines()]
    assert [r["line"] for r in rejects] == [1, 2]


@pytest.mark.parametrize("limit", [1 << 20, 100])
def test_a_fresh_run_writes_as_it_goes_whatever_the_size_of_its_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    # Past LIVE_OUTPUT_MAX_BYTES too, the rows are written as the lines are settled: when the
    # output closes, only the last answers are held back (at most a pool of 4 in flight).
    monkeypatch.setattr(live_output, "LIVE_OUTPUT_MAX_BYTES", limit)
    at_close: list[tuple[int, bool]] = []
    real_close = LiveOutput.close

    def watched(self: LiveOutput, *args: Any, **kwargs: Any) -> bool:
        at_close.append((self.held_rows, self.failed))
        return real_close(self, *args, **kwargs)

    monkeypatch.setattr(LiveOutput, "close", watched)
    with running_sim(SimConfig(latency_ms=2, latency_jitter_ms=6, seed=4)) as sim:
        job = structured_job(tmp_path, sim.base_url, "o.parquet", 40, concurrency=4)
        report = run_job(job, stream=io.StringIO())
    [(held, failed)] = at_close
    assert not failed and held <= 4
    assert [r["custom_id"] for r in read_results(report.output)] == [f"c{i}" for i in range(40)]


@pytest.mark.parametrize(("limit", "groups"), [(1 << 20, [5, 5, 2]), (100, [12])])
def test_a_small_input_is_written_in_small_row_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, groups: list[int]
) -> None:
    # The last row group is written after the last answer: a small one ends the run sooner.
    # A large input keeps the writer's default, since each row group's footer metadata stays
    # in memory until the file closes.
    monkeypatch.setattr(live_output, "SMALL_ROW_GROUP_SIZE", 5)
    monkeypatch.setattr(live_output, "LIVE_OUTPUT_MAX_BYTES", limit)
    with running_sim(SimConfig(latency_ms=2)) as sim:
        job = structured_job(tmp_path, sim.base_url, "o.parquet", 12)
        run_job(job, stream=io.StringIO())
    meta = pq.ParquetFile(tmp_path / "o.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == groups


def _result(custom_id: str) -> Result:
    return Result(
        custom_id=custom_id, line=1, status="ok", model="m", attempts=1, latency_s=0.1,
        started_at=1.0, finished_at=2.0, status_code=200, body={"choices": []},
    )  # fmt: skip


def test_a_reask_left_unfinished_sends_the_output_to_the_journal(tmp_path: Path) -> None:
    # A provisional record (an answer about to be re-asked) whose final record never came
    # (the re-ask was cancelled at the end of the grace period) is the journal's answer for
    # that id: the live output does not hold it, so the output is written from the journal.
    with Journal(tmp_path / "o.jsonl.journal") as journal:
        live = LiveOutput(journal, tmp_path / "o.jsonl", dict)
        live.append(_result("a"), "h")
        live.append(_result("b"), "h", provisional=True)
        assert live.close() is False
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "o.jsonl").exists()
    with Journal(tmp_path / "o.jsonl.journal") as journal:
        live = LiveOutput(journal, tmp_path / "o.jsonl", dict)  # (a journal with records
        live.append(_result("c"), "h", provisional=True)  # would not go live; this is a unit
        live.append(_result("c"), "h")  # test: the final record came, so the output stands)
        assert live.close() is True
    assert [r["custom_id"] for r in read_results(tmp_path / "o.jsonl")] == ["c"]


def test_final_records_the_journal_refuses_leave_the_output_to_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every answer fails its schema; the journal takes each provisional record and refuses
    # the final one (a full disk): the run stops, and the output still holds what the
    # journal holds, the paid provisional answers.
    real_append = Journal.append
    provisional_ids: set[str] = set()

    def append(self: Journal, result: Result, body_hash: str, *, provisional: bool = False) -> None:
        if provisional:
            provisional_ids.add(result.custom_id)
        elif result.custom_id in provisional_ids:
            raise OSError(28, "No space left on device")
        real_append(self, result, body_hash, provisional=provisional)

    monkeypatch.setattr(Journal, "append", append)
    with running_sim(SimConfig(schema_error_rate=1.0, seed=3, latency_ms=5)) as sim:
        job = structured_job(tmp_path, sim.base_url, "o.jsonl", 10)
        report = run_job(job, stream=io.StringIO())
    monkeypatch.setattr(Journal, "append", real_append)
    assert report.exit_code == 3
    rows = list(read_results(report.output))
    assert rows and rows == rebuilt_from_journal(report.output, tmp_path / "again.jsonl", job)
    assert {r["custom_id"] for r in rows} <= provisional_ids
    assert not list(tmp_path.glob("*.partial"))


def test_a_provenance_that_fails_sends_the_output_to_the_journal(tmp_path: Path) -> None:
    # The records wait for the writer, whose preparation fails in its thread (quietly): the
    # output is then written from the journal, as for any failure of the live output.
    def broken() -> dict[str, str]:
        raise OSError(5, "Input/output error")

    with Journal(tmp_path / "o.jsonl.journal") as journal:
        live = LiveOutput(journal, tmp_path / "o.jsonl", broken)
        live.append(_result("a"), "h")
        live.append(_result("b"), "h")
        assert live.close() is False
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "o.jsonl").exists()


def _answer(line: int) -> Result:
    """An ok record of input line ``line`` with a 200-character answer."""
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 200}}]}
    return Result(
        custom_id=f"r{line}", line=line, status="ok", model="m", attempts=1, latency_s=0.1,
        started_at=1.0, finished_at=2.0, status_code=200, body=body,
    )  # fmt: skip


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
@pytest.mark.parametrize(("max_held", "live"), [(20_000, False), (1 << 30, True)])
def test_a_live_output_gives_up_past_its_bound_and_the_output_stays_whole(
    tmp_path: Path, suffix: str, max_held: int, live: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No line is settled (no watermark: as if the first request were stuck in its retries):
    # every row is held back. Past the bound they are dropped (memory stays bounded however
    # long the answers) and the output is written from the journal at the end, still
    # complete and in input order.
    output = tmp_path / ("o" + suffix)
    lines = list(range(600, 0, -1))  # answers come in reverse input order
    stats = RunStats()
    with Journal(journal_path(output)) as journal:
        out = LiveOutput(journal, output, dict, max_held=max_held)
        held: list[int] = []
        for line in lines:
            out.append(_answer(line), "h")
            held.append(out.held_rows)
        assert out.failed is not live
        if live:
            assert max(held) == 600
        else:  # weighed at every row, each over 1 KiB: fewer than 20 rows pass the bound
            assert max(held) < 20_000 // 1024 and held[-1] == 0  # the held rows were let go
        live_output.finish_output(journal, out, output, stats, dict)
    rows = list(read_results(output))
    assert [r["custom_id"] for r in rows] == [f"r{line}" for line in range(1, 601)]
    assert output_count(stats) == 600
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_rows_made_apart_are_written_as_results_are(tmp_path: Path, suffix: str) -> None:
    with writers.open_writer(tmp_path / ("o" + suffix)) as w:
        rows = [w.row(_answer(line)) for line in range(1, 301)]
        for row in reversed(rows):
            w.write_row(row)
    with writers.open_writer(tmp_path / ("p" + suffix)) as w:
        for line in range(300, 0, -1):
            w.write(_answer(line))
    assert list(read_results(tmp_path / ("o" + suffix))) == list(
        read_results(tmp_path / ("p" + suffix))
    )


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_long_prompts_count_towards_the_bound_of_held_rows(tmp_path: Path, suffix: str) -> None:
    # Short answers to 34 kB prompts: what a held row takes is mostly its prompt (the
    # ``messages`` column), which the bound must weigh, from the first row held.
    output = tmp_path / ("o" + suffix)
    prompt = [{"role": "user", "content": "x" * 34_000}]
    with Journal(journal_path(output)) as journal:
        out = LiveOutput(journal, output, dict, max_held=1 << 20)
        held = []
        for line in range(400, 0, -1):  # no line settles before the last: every row held
            out.append(dataclasses.replace(_answer(line), messages=prompt), "h")
            held.append(out.held_rows)
        assert out.failed
        assert max(held) <= (1 << 20) // 34_000  # ~30 rows of 34 kB, not hundreds
        live_output.finish_output(journal, out, output, RunStats(), dict)
    rows = list(read_results(output))
    assert [r["custom_id"] for r in rows] == [f"r{line}" for line in range(1, 401)]


def _parquet_input(path: Path, rows: int) -> Path:
    import pyarrow as pa

    pq.write_table(pa.table({"q": [f"q{i}" for i in range(rows)]}), path)
    return path


def test_a_small_parquet_file_of_many_rows_keeps_the_writers_row_groups(tmp_path: Path) -> None:
    # A Parquet file's size says little of its rows: 100,000 short rows take a few hundred
    # KB, far below the size limit, and small row groups' footers would be held until close.
    many = _parquet_input(tmp_path / "many.parquet", live_output.LIVE_OUTPUT_MAX_ROWS * 2)
    few = _parquet_input(tmp_path / "few.parquet", 1_000)
    assert many.stat().st_size < live_output.LIVE_OUTPUT_MAX_BYTES
    assert live_output.small_input(many) is False
    assert live_output.small_input(few) is True
    assert live_output.small_input(Path("-")) is False  # stdin
