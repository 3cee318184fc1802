"""Rows in input order (line, then variants as declared), and JSONL lines a Batch API reader
takes: unique ``custom_id``, ``response.body`` always an object, ``error`` only without a usable
answer."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pyarrow.json as pj
import pytest

from batcher.job_file import job_from_dict
from batcher.output.journal import Journal
from batcher.output.live_output import LiveOutput, write_output
from batcher.output.writers import read_results
from batcher.records import Result
from batcher.runner.run import run_job
from batcher.runner.stats import RunStats
from batcher.sim.config import SimConfig
from batcher.sim.serve import running_sim
from tests.helpers import jsonl, output_from_journal, write_input

#: Declared out of alphabetical order: the output follows the job, not the names.
VARIANTS = ["c", "a", "b"]


def sweep_job(tmp_path: Path, base_url: str, output: str, **job: Any) -> Any:
    return job_from_dict(
        {
            "job": {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / output),
                    "progress": False, **job},
            "endpoint": {"base_url": base_url},
            "request": {"model": "gpt-4o-mini", "max_tokens": 16},
            "limits": {"concurrency": 16},
            "retry": {"max_attempts": 1},
            "variants": [{"name": name, "temperature": t / 10}
                         for t, name in enumerate(VARIANTS)],
        }
    )  # fmt: skip


def in_order(n: int) -> list[tuple[int, str]]:
    return [(line, variant) for line in range(1, n + 1) for variant in VARIANTS]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
@pytest.mark.parametrize("live", [True, False], ids=["live", "from-journal"])
def test_a_sweep_of_three_variants_is_written_in_line_then_variant_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, live: bool
) -> None:
    n = 20
    write_input(tmp_path / "in.jsonl", n)
    if not live:  # as for a resumed run: the output written from the journal at the end
        output_from_journal(monkeypatch)
    config = SimConfig(latency_ms=2, latency_jitter_ms=20, seed=5)
    with running_sim(config) as sim:
        report = run_job(sweep_job(tmp_path, sim.base_url, "o" + suffix), stream=io.StringIO())
    assert report.exit_code == 0
    rows = list(read_results(report.output))
    assert [(r["line"], r["variant"]) for r in rows] == in_order(n)
    # read back, each row is the line's own id and its variant
    assert [r["custom_id"] for r in rows] == [f"r{i:05d}" for i in range(n) for _ in VARIANTS]
    if suffix == ".jsonl":
        lines = jsonl(report.output)
        ids = [line["custom_id"] for line in lines]
        assert len(set(ids)) == len(ids) == 3 * n
        assert len({line["custom_id"]: line for line in lines}) == 3 * n  # a dict keeps all
        assert ids[:3] == ["r00000:c", "r00000:a", "r00000:b"]
        assert [line["batcher"]["line_id"] for line in lines[:3]] == ["r00000"] * 3


def result(custom_id: str, line: int, variant: str | None = None, **fields: Any) -> Result:
    base: dict[str, Any] = dict(
        custom_id=custom_id, line=line, status="ok", model="m", attempts=1, latency_s=0.1,
        started_at=1_700_000_000.0, finished_at=1_700_000_001.0, status_code=200,
        body={"choices": [{"message": {"content": f"{custom_id}/{variant}"}}]}, variant=variant,
    )  # fmt: skip
    return Result(**(base | fields))


def shuffled_results(n: int) -> list[Result]:
    results = [result(f"id{line}", line, v) for line in range(1, n + 1) for v in VARIANTS]
    random.Random(7).shuffle(results)
    return results


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_write_output_sorts_a_journal_written_in_completion_order(
    tmp_path: Path, suffix: str
) -> None:
    n = 300
    with Journal(tmp_path / "o.journal") as journal:
        for r in shuffled_results(n):
            journal.append(r, "h")
        stats = RunStats()
        write_output(journal, tmp_path / ("o" + suffix), stats, variants=VARIANTS)
    rows = list(read_results(tmp_path / ("o" + suffix)))
    assert [(r["line"], r["variant"]) for r in rows] == in_order(n)
    assert [r["content"] for r in rows[:2]] == ["id1/c", "id1/a"]
    assert stats.output_ok == 3 * n


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_live_output_reorders_at_close(tmp_path: Path, suffix: str) -> None:
    n = 300
    with Journal(tmp_path / "o.journal") as journal:
        live = LiveOutput(
            journal, tmp_path / ("o" + suffix), dict, row_group_size=100, variants=VARIANTS
        )
        for r in shuffled_results(n):
            live.append(r, "h")
        assert live.close()
    rows = list(read_results(tmp_path / ("o" + suffix)))
    assert [(r["line"], r["variant"]) for r in rows] == in_order(n)


def test_a_malformed_200_still_gives_jsonl_a_batch_reader_reads(tmp_path: Path) -> None:
    """A 200 cut off half way and a proxy's HTML 502: no ``response`` but an ``error`` (the
    raw answer is ``error.message``, the status in ``batcher``), so pyarrow's JSON reader
    reads the file; read back, the raw answer and batcher's own error are both there."""
    n = 40
    write_input(tmp_path / "in.jsonl", n)
    config = SimConfig(error_rate=0.5, error_kinds=("malformed", "502"), seed=2)
    with running_sim(config) as sim:
        job = sweep_job(tmp_path, sim.base_url, "o.jsonl")
        report = run_job(job, stream=io.StringIO())
    assert report.exit_code == 1
    table = pj.read_json(report.output)  # fails on a body that is a string in some lines
    assert table.num_rows == 3 * n
    lines = jsonl(report.output)
    rows = list(read_results(report.output))
    malformed = [i for i, line in enumerate(lines)
                 if line["batcher"].get("status_code") == 200]  # fmt: skip
    proxy = [i for i, line in enumerate(lines) if line["batcher"].get("status_code") == 502]
    assert malformed and proxy
    for line in lines:  # never both
        assert (line["response"] is None) != (line["error"] is None)
    for i in malformed + proxy:
        line, row = lines[i], rows[i]
        assert line["response"] is None and line["batcher"]["response_body"] == "text"
        assert row["status_code"] == line["batcher"]["status_code"]
        assert row["response"] == line["error"]["message"]  # the raw answer, read back as is
        assert row["error_code"] == line["batcher"]["error_code"] is not None
        assert row["status"] == "error"
    for i in malformed:
        with pytest.raises(json.JSONDecodeError):
            json.loads(lines[i]["error"]["message"])  # cut off half way
        assert "not JSON" in rows[i]["error_message"]
    for i in proxy:
        assert "502 Bad Gateway" in lines[i]["error"]["message"]
    for line in lines:  # answered requests carry no error, as the Batch API's lines
        if line["batcher"]["status"] == "ok":
            assert line["error"] is None and line["response"]["body"]["choices"]
