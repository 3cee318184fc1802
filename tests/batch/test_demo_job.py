"""``jobs/batch.toml``: the demo's prompts in batch mode against the simulator served for the
run (``sim_server``), on the real clock with its fast ``[sim.batch]`` timings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from batcher.batch.runner import run_batch_job
from batcher.errors import ConfigError
from batcher.job_file import load_job
from batcher.sim import sim_server
from tests.batch.batch_job import rows, text

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_batch_demo_job_runs_against_the_simulator(tmp_path: Path) -> None:
    job = dataclasses.replace(load_job(ROOT / "jobs" / "batch.toml"), output=tmp_path / "b.parquet")
    out = text()
    report = run_batch_job(job, sim=sim_server, stream=out)
    assert report.exit_code == 0, out.getvalue()
    got = rows(tmp_path / "b.parquet")
    ids = [r["custom_id"] for r in got]
    assert len(ids) == len(set(ids)) == report.stats.ok == 200
    assert len({r["batch_id"] for r in got}) == 3  # 200 requests, 80 a batch
    assert out.getvalue().count("created") == 3


def test_a_sim_batch_job_without_the_simulator_served_is_refused(tmp_path: Path) -> None:
    job = dataclasses.replace(load_job(ROOT / "jobs" / "batch.toml"), output=tmp_path / "b.parquet")
    with pytest.raises(ConfigError, match=r"endpoint\.base_url"):
        run_batch_job(job, stream=text())
    assert not (tmp_path / "b.parquet.journal").exists()  # nothing begun
