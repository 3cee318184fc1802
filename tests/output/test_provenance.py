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
