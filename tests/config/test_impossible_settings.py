"""Settings that cannot work are refused before anything is sent, naming the field."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import pytest

from batcher.config import MAX_CONCURRENCY
from batcher.engine.dispatch import Engine
from batcher.errors import ConfigError
from batcher.job_file import job_from_dict, with_overrides
from batcher.runner.run import run_job
from batcher.sim.app import Simulator
from tests.helpers import run_batcher, write_input


@pytest.mark.parametrize(
    ("tables", "field"),
    [({"retry": {"timeout_s": float("inf")}}, "retry.timeout_s"),
     ({"retry": {"timeout_s": 1e12}}, "retry.timeout_s"),
     ({"retry": {"backoff_initial_s": float("nan")}}, "retry.backoff_initial_s"),
     ({"retry": {"backoff_max_s": float("inf")}}, "retry.backoff_max_s"),
     ({"retry": {"outage_patience_s": float("inf")}}, "retry.outage_patience_s"),
     ({"job": {"grace_s": float("inf")}}, "job.grace_s"),
     ({"limits": {"rpm": float("inf")}}, "limits.rpm"),
     ({"limits": {"tpm": float("nan")}}, "limits.tpm"),
     ({"limits": {"max_cost_usd": float("inf")}}, "limits.max_cost_usd"),
     ({"limits": {"concurrency": MAX_CONCURRENCY + 1}}, "limits.concurrency"),
     ({"endpoint": {"rpm": float("inf")}}, "endpoint.rpm"),
     ({"request": {"temperature": float("nan")}}, "request.temperature")],
)  # fmt: skip
def test_impossible_values_are_a_config_error(tables: dict[str, Any], field: str) -> None:
    raw: dict[str, Any] = {"endpoint": {"base_url": "http://x.test/v1"}}
    for name, table in tables.items():
        raw.setdefault(name, {}).update(table)
    if "rpm" in raw["endpoint"]:  # per-endpoint rates belong to [[endpoints]]
        raw = {"endpoints": [{"name": "a", **raw.pop("endpoint")}]}
        field = "endpoints[0].rpm"
    with pytest.raises(ConfigError) as info:
        job_from_dict(raw)
    assert info.value.field == field


def test_library_overrides_are_checked_the_same_way() -> None:
    job = job_from_dict({})
    with pytest.raises(ConfigError) as info:
        with_overrides(job, timeout_s=float("inf"))
    assert info.value.field == "retry.timeout_s"
    with pytest.raises(ConfigError) as info:
        with_overrides(job, concurrency=1_000_000)
    assert info.value.field == "limits.concurrency"
    assert with_overrides(job, concurrency=MAX_CONCURRENCY).limits.concurrency == MAX_CONCURRENCY


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [("--timeout", "inf", "retry.timeout_s"), ("--concurrency", "1000000", "limits.concurrency"),
     ("--max-cost", "inf", "limits.max_cost_usd"), ("--grace", "inf", "job.grace_s")],
)  # fmt: skip
def test_cli_refuses_them_with_exit_2_naming_the_field(
    tmp_path: Path, flag: str, value: str, field: str
) -> None:
    src = write_input(tmp_path / "in.jsonl", 5)
    out = tmp_path / "o.jsonl"
    proc = run_batcher(
        "run", "--input", str(src), "--output", str(out), "--base-url", "http://127.0.0.1:9/v1",
        "--model", "m", flag, value, "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert field in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_workers_are_not_started_far_beyond_the_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool of 10,000 on five lines starts about five workers, not 10,000."""
    started: list[int] = []
    work = Engine._work

    async def counting(self: Engine, *args: Any) -> None:
        started.append(1)
        await work(self, *args)

    monkeypatch.setattr(Engine, "_work", counting)
    src = write_input(tmp_path / "in.jsonl", 5)
    job = job_from_dict(
        {"job": {"input": str(src), "output": str(tmp_path / "o.jsonl"), "progress": False},
         "endpoint": {"base_url": "http://sim.test/v1"}, "request": {"model": "m"},
         "limits": {"concurrency": MAX_CONCURRENCY}}
    )  # fmt: skip
    report = run_job(job, transport=httpx.ASGITransport(app=Simulator()), stream=io.StringIO())
    assert report.stats.ok == 5
    assert 1 <= len(started) <= 5
