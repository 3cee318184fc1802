"""Provenance in the Parquet metadata: job without secrets, version, input hash; in the report."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import httpx
import pytest

import batcher
from batcher.job_file import job_from_dict
from batcher.output.provenance import REDACTED, read_provenance
from batcher.output.report import build_report
from batcher.output.report_text import format_report
from batcher.runner.run import run_job
from batcher.sim.app import Simulator
from tests.helpers import write_input


def test_parquet_output_records_how_it_was_made(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 5)
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / "o.parquet"), "progress": False},
            "endpoint": {
                "base_url": "http://sim.test/v1",
                "headers": {"api-key": "gateway-secret-3e9a"},
            },
            "request": {"model": "gpt-4o-mini", "temperature": 0.3},
        }
    )
    run_job(job, transport=httpx.ASGITransport(app=Simulator()), stream=io.StringIO())
    made = read_provenance(tmp_path / "o.parquet")
    assert made["version"] == batcher.__version__
    assert made["input_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    recorded = json.loads(made["job"])
    assert recorded["request"] == {"model": "gpt-4o-mini", "temperature": 0.3}
    assert recorded["endpoint"]["headers"] == {"api-key": REDACTED}
    assert b"gateway-secret-3e9a" not in (tmp_path / "o.parquet").read_bytes()
    report, _ = build_report(tmp_path / "o.parquet")
    assert f"made by   batcher {batcher.__version__}" in format_report(report)


def test_jsonl_output_has_no_provenance(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl"
    path.write_text("")
    assert read_provenance(path) == {}


def test_credentials_in_the_base_url_are_not_recorded() -> None:
    from batcher.output.provenance import job_record

    job = job_from_dict({"endpoint": {"base_url": "https://user:s3cr3t@gw.example/v1?api-key=k9"}})
    url = job_record(job)["endpoint"]["base_url"]
    assert "s3cr3t" not in url and "k9" not in url
    assert url.startswith("https://") and "gw.example/v1" in url


@pytest.mark.slow
def test_report_on_a_broken_parquet_file_is_a_clear_error(tmp_path: Path) -> None:
    from tests.helpers import run_batcher

    bad = tmp_path / "o.parquet"
    bad.write_bytes(b"PAR")
    proc = run_batcher("report", str(bad))
    assert proc.returncode == 2 and "cannot read" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_headers_and_urls_of_several_endpoints_are_not_recorded() -> None:
    from batcher.output.provenance import job_record

    job = job_from_dict(
        {
            "endpoints": [
                {"name": "a", "base_url": "sim", "headers": {"api-key": "s3cr3t-a"}},
                {
                    "name": "b",
                    "base_url": "https://u:s3cr3t-b@gw.example/v1",
                    "headers": {"x": "y"},
                },
            ]
        }
    )
    text = json.dumps(job_record(job))
    assert "s3cr3t" not in text and '"y"' not in text
    assert [e["headers"] for e in job_record(job)["endpoints"]] == [
        {"api-key": REDACTED},
        {"x": REDACTED},
    ]


def _run_with_429s(tmp_path: Path, output: str, n: int) -> tuple[int, Path]:
    """A run against the simulator over loopback with 429s injected; its exit code and output."""
    from batcher.sim.config import SimConfig
    from batcher.sim.serve import running_sim

    src = write_input(tmp_path / "in.jsonl", n)
    config = SimConfig(error_rate=0.2, error_kinds=("429",), seed=5, fault_retry_after_s=0.05)
    with running_sim(config) as sim:
        job = job_from_dict(
            {
                "job": {"name": "night", "input": str(src), "output": str(tmp_path / output),
                        "progress": False},
                "endpoint": {"base_url": sim.base_url},
                "request": {"model": "gpt-4o-mini"},
                "retry": {"max_attempts": 12, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
            }
        )  # fmt: skip
        report = run_job(job, stream=io.StringIO())
        assert sim.simulator.stats.faults_injected > 0
    assert report.stats.rate_limited > 0
    made = read_provenance(report.output)
    bins = json.loads(made["rate_limited"])
    # every 429 the run met, by the second it came, and nothing else
    assert sum(count for _, count in bins["counts"]) == report.stats.rate_limited
    assert made["state"] == "finished" and made["exit_code"] == str(report.exit_code)
    return report.exit_code, report.output


@pytest.mark.parametrize("output", ["o.parquet", "big.parquet"])
def test_output_records_how_its_run_ended(
    tmp_path: Path, output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways an output is written (as the run goes, and from the journal at the end, as
    for a resumed run) record the end of the run in the file's metadata."""
    from datetime import datetime

    from tests.helpers import output_from_journal

    if output == "big.parquet":
        output_from_journal(monkeypatch)
    code, path = _run_with_429s(tmp_path, output, 30)
    made = read_provenance(path)
    started = datetime.fromisoformat(made["started_at"])
    ended = datetime.fromisoformat(made["ended_at"])
    assert code == 0 and started <= ended and started.utcoffset() is not None
    report, _ = build_report(path)
    assert (report.job_name, report.state, report.exit_code) == ("night", "finished", 0)
    assert report.rate_limited == sum(n for _, n in json.loads(made["rate_limited"])["counts"])


def test_429_bins_merge_past_the_limit() -> None:
    from batcher.output.provenance import MAX_429_BINS, rate_limited_bins

    seconds = {1_000_000 + i: 1 for i in range(3 * MAX_429_BINS)}
    bins = rate_limited_bins(seconds)
    assert bins["bin_s"] == 4 and len(bins["counts"]) <= MAX_429_BINS
    assert sum(n for _, n in bins["counts"]) == 3 * MAX_429_BINS
    assert rate_limited_bins({5: 2, 9: 1}) == {"bin_s": 1, "counts": [[5, 2], [9, 1]]}


def test_a_run_stopped_early_says_so_in_its_output(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 40)
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / "o.parquet"), "progress": False},
            "endpoint": {"base_url": "http://sim.test/v1"},
            "request": {"model": "gpt-4o-mini", "max_tokens": 16},
            "limits": {"max_cost_usd": 0.00005, "concurrency": 1},
        }
    )
    report = run_job(job, transport=httpx.ASGITransport(app=Simulator()), stream=io.StringIO())
    assert report.exit_code == 3
    made = read_provenance(report.output)
    assert made["exit_code"] == "3" and made["state"].startswith("stopped early: ")
    assert "--max-cost" in made["state"]
