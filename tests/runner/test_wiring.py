"""What a run is built from (``wiring.py``) and the checks made before anything is sent
(``checks.py``): the same for the local runner and the Ray engine."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import pytest

import batcher.runner.wiring as wiring
from batcher.cost.pricing import Pricer
from batcher.errors import ConfigError
from batcher.job_file import job_from_dict
from batcher.output.journal import journal_path
from batcher.runner.progress import format_summary
from batcher.runner.run import run_job
from batcher.runner.stats import RunStats
from batcher.sim import sim_server
from tests.helpers import write_input


def test_a_sim_endpoint_without_a_simulator_is_a_config_error_and_nothing_is_sent(
    tmp_path: Path,
) -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500)

    src = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "o.jsonl"
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(out), "progress": False},
            "endpoints": [
                {"name": "real", "base_url": "http://mock.test/v1"},
                {"name": "local", "base_url": "sim"},
            ],
            "request": {"model": "m"},
        }
    )
    with pytest.raises(ConfigError) as caught:
        run_job(job, transport=httpx.MockTransport(handler), stream=io.StringIO())
    assert caught.value.field == "endpoints[1].base_url"
    assert "simulator" in str(caught.value)
    assert sent == [] and not journal_path(out).exists() and not out.exists()


def _refused_sim_table(tmp_path: Path, table: dict[str, Any]) -> ConfigError:
    """The error of a run over the simulator with ``table`` as its ``[sim]``, after checking
    that it left no journal and no output."""
    src = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "o.jsonl"
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(out), "progress": False},
            "endpoint": {"base_url": "sim"},
            "request": {"model": "m"},
            "sim": table,
        }
    )
    with pytest.raises(ConfigError) as caught:
        run_job(job, stream=io.StringIO(), sim=sim_server)
    assert not journal_path(out).exists() and not out.exists()
    return caught.value


def test_a_sim_table_the_simulator_refuses_is_a_config_error_before_the_journal(
    tmp_path: Path,
) -> None:
    assert _refused_sim_table(tmp_path, {"error_rate": 2}).field == "sim"


@pytest.mark.parametrize(
    ("table", "field", "names"),
    [
        ({"latency": 5}, "sim.latency", "latency_ms"),
        ({"batch": {"validating": 1}}, "sim.batch.validating", "validating_s"),
    ],
)
def test_a_misspelt_sim_key_is_named_with_the_keys_it_could_be(
    tmp_path: Path, table: dict[str, Any], field: str, names: str
) -> None:
    """Not Python's ``SimConfig.__init__() got an unexpected keyword argument``."""
    error = _refused_sim_table(tmp_path, table)
    assert error.field == field
    assert "unknown key" in error.reason and names in error.reason
    assert "__init__" not in str(error)


def test_a_run_builds_one_pricer_for_its_check_and_its_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Pricer] = []

    class Counted(Pricer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(wiring, "Pricer", Counted)
    src = write_input(tmp_path / "in.jsonl", 4, start=2)
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / "o.jsonl"), "progress": False},
            "endpoint": {"base_url": "sim"},
            "request": {"model": "m", "max_tokens": 8},
            "limits": {"max_cost_usd": 1.0},
            "pricing": {"m": {"input": 1.0, "output": 2.0}},
        }
    )
    report = run_job(job, stream=io.StringIO(), sim=sim_server)
    assert report.exit_code == 0 and report.stats.ok == 4
    assert len(made) == 1  # the --max-cost check and the engine share it
    assert report.stats.cost_by_model  # and it priced the answers


def test_the_ray_engines_line_comes_before_the_output_in_the_summary() -> None:
    stats = RunStats()
    summary = format_summary(stats, name="j", output="o.parquet", rejects=None, engine="ray: 4")
    lines = summary.splitlines()
    assert lines[-2:] == ["  engine    ray: 4", "  output    o.parquet"]
    assert "engine" not in format_summary(stats, name="j", output="o", rejects=None)


def test_a_local_endpoints_limits_are_the_jobs_and_a_workers_are_its_share() -> None:
    job = job_from_dict(
        {"endpoint": {"base_url": "http://x.test/v1"}, "limits": {"rpm": 600, "concurrency": 10}}
    )
    alone = wiring.endpoint_limits(job, job.endpoint)
    assert alone.max_concurrency == 10 and alone.rpm is not None and alone.rpm.per_minute == 600
    quarter = wiring.endpoint_limits(job, job.endpoint, 4)
    assert quarter.max_concurrency == 2  # rounded down: together never more than the job's
    assert quarter.rpm is not None and quarter.rpm.per_minute == 150
