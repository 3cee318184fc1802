"""The Parquet output loads in pandas, polars, DuckDB and Hugging Face `datasets`.

All four are in the test extra. `datasets` is pointed at a private cache and kept offline.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest

from batcher.job_file import job_from_dict
from batcher.runner.run import run_job
from batcher.sim.app import Simulator
from batcher.sim.config import SimConfig
from tests.helpers import write_input

N = 12
#: the module on one xdist worker: its output is written once, not once a worker
pytestmark = pytest.mark.xdist_group("dataframes")


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("frames")
    src = write_input(tmp / "in.jsonl", N)
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp / "o.parquet"), "progress": False},
            "endpoint": {"base_url": "http://sim.test/v1"},
            "request": {"model": "gpt-4o-mini"},
        }
    )
    sim = Simulator(SimConfig(error_rate=0.0))
    return run_job(job, transport=httpx.ASGITransport(app=sim), stream=io.StringIO()).output


def test_pandas(output: Path) -> None:
    import pandas as pd

    frame = pd.read_parquet(output)
    assert len(frame) == N and set(frame["status"]) == {"ok"}
    assert str(frame["started_at"].dtype).startswith("datetime64")
    assert frame["cost_usd"].notna().all()


def test_polars(output: Path) -> None:
    import polars as pl

    frame = pl.read_parquet(output)
    assert frame.height == N
    assert frame["prompt_tokens"].sum() > 0


def test_duckdb(output: Path) -> None:
    import duckdb

    relation = duckdb.sql(
        f"select status, count(*), sum(total_tokens) from read_parquet('{output}') group by 1"
    )
    assert relation is not None  # a select gives a relation (other statements give None)
    rows = relation.fetchall()
    assert rows[0][0] == "ok" and rows[0][1] == N and rows[0][2] > 0


def test_hugging_face_datasets(
    output: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    data = datasets.Dataset.from_parquet(str(output), cache_dir=str(tmp_path / "cache"))
    assert len(data) == N
    assert set(data["status"]) == {"ok"}
