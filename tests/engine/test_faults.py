"""Every simulator fault over a real loopback socket (uvicorn + the aiohttp transport).

Retryable faults end `ok` after retries; the others end as error records with a precise code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from batcher.job_file import job_from_dict
from batcher.output.writers import read_results
from batcher.runner.run import RunReport, run_job
from batcher.sim.config import SimConfig
from batcher.sim.serve import running_sim
from tests.helpers import write_input


def run_against(
    tmp_path: Path,
    config: SimConfig,
    n: int,
    *,
    request: dict[str, Any] | None = None,
    **retry: Any,
) -> tuple[RunReport, int]:
    """Run n requests against a simulator over loopback; the report and the faults it played.

    ``request`` adds job-wide request fields (``{"stream": True}``, say) to the model."""
    src = write_input(tmp_path / "in.jsonl", n)
    with running_sim(config) as sim:
        job = job_from_dict(
            {
                "job": {"input": str(src), "output": str(tmp_path / "o.parquet"),
                        "progress": False},
                "endpoint": {"base_url": sim.base_url},
                "request": {"model": "gpt-4o-mini", **(request or {})},
                "limits": {"concurrency": 8},
                "retry": {"max_attempts": 12, "timeout_s": 0.5, "backoff_initial_s": 0.01,
                          "backoff_max_s": 0.05, **retry},
            }
        )  # fmt: skip
        report = run_job(job, stream=io.StringIO())
    return report, sim.simulator.stats.faults_injected


@pytest.mark.parametrize(
    "kind",
    ["500", "502", "503", "504", "malformed", "no_choices", "wrong_content_type",
     "reset_headers", "reset_body", pytest.param("stall", marks=pytest.mark.slow)],
)  # fmt: skip
def test_retryable_fault_ends_ok(tmp_path: Path, kind: str) -> None:
    config = SimConfig(error_rate=0.3, error_kinds=(kind,), seed=7)
    report, faults = run_against(tmp_path, config, 24)
    rows = list(read_results(report.output))
    assert report.exit_code == 0, report.summary
    assert len(rows) == 24 and {r["status"] for r in rows} == {"ok"}
    assert faults > 0
    assert report.stats.retries == faults  # one retry per fault


@pytest.mark.parametrize(
    "kind",
    ["429", pytest.param("retry_after_date", marks=pytest.mark.slow)],  # whole seconds
)
def test_rate_limit_faults_pause_then_end_ok(tmp_path: Path, kind: str) -> None:
    config = SimConfig(error_rate=0.15, error_kinds=(kind,), seed=5, fault_retry_after_s=0.1)
    report, faults = run_against(tmp_path, config, 12)
    assert report.exit_code == 0, report.summary
    assert report.stats.ok == 12 and faults > 0


def test_huge_answer_is_kept_whole(tmp_path: Path) -> None:
    report, _ = run_against(tmp_path, SimConfig(error_rate=1.0, error_kinds=("huge",)), 2)
    rows = list(read_results(report.output))
    assert {r["status"] for r in rows} == {"ok"}
    assert all(len(r["content"]) > 2_000_000 for r in rows)


def test_answer_without_usage_is_ok_with_null_tokens(tmp_path: Path) -> None:
    report, _ = run_against(tmp_path, SimConfig(error_rate=1.0, error_kinds=("no_usage",)), 3)
    rows = list(read_results(report.output))
    assert {(r["status"], r["total_tokens"]) for r in rows} == {("ok", None)}


def test_bad_request_is_an_error_record_at_once(tmp_path: Path) -> None:
    report, _ = run_against(tmp_path, SimConfig(error_rate=1.0, error_kinds=("400",)), 3)
    rows = list(read_results(report.output))
    assert report.exit_code == 1
    assert {(r["status"], r["status_code"], r["error_code"], r["attempts"]) for r in rows} == {
        ("error", 400, "invalid_value", 1)
    }


def test_an_answer_cut_off_mid_body_is_a_broken_answer_not_an_outage(tmp_path: Path) -> None:
    """Every answer breaks off after its headers: the server is up (it answered), so the run
    never waits for an outage; each attempt is an ``invalid_response`` carrying its status."""
    src = write_input(tmp_path / "in.jsonl", 12)
    log = io.StringIO()
    config = SimConfig(error_rate=1.0, error_kinds=("reset_body",), seed=7)
    with running_sim(config) as sim:
        job = job_from_dict(
            {
                "job": {"input": str(src), "output": str(tmp_path / "o.jsonl"), "progress": False},
                "endpoint": {"base_url": sim.base_url},
                "request": {"model": "gpt-4o-mini"},
                "limits": {"concurrency": 4},
                "retry": {"max_attempts": 2, "backoff_initial_s": 0.01, "backoff_max_s": 0.02,
                          "outage_patience_s": 60},
            }
        )  # fmt: skip
        report = run_job(job, stream=log)
    rows = list(read_results(report.output))
    assert "unreachable" not in log.getvalue()
    assert len(rows) == 12 and {r["status"] for r in rows} == {"error"}
    assert {r["error_code"] for r in rows} == {"invalid_response"}
    assert {r["status_code"] for r in rows} == {200}
    assert report.stats.attempts == 24  # both attempts of each, none held back as an outage
