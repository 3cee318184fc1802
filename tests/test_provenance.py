"""Provenance in the Parquet metadata: job without secrets, version, input hash; in the report."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import httpx

import batcher
from batcher.config import job_from_dict
from batcher.provenance import REDACTED, read_provenance
from batcher.report import build_report, format_report
from batcher.runner import run_job
from batcher.sim import Simulator

from .helpers import write_input


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
