"""``batcher report``: totals by model and status, percentiles, errors, JSON and HTML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batcher.output.formats import errors_path
from batcher.output.report import build_report
from batcher.output.report_text import format_report
from batcher.output.split import open_outputs
from batcher.output.writers import open_writer
from batcher.records import Result, Usage
from tests.helpers import run_batcher


def result(i: int, model: str, status: str, latency: float, cost: float | None) -> Result:
    ok = status == "ok"
    return Result(
        custom_id=f"r{i}",
        line=i,
        status="ok" if ok else "error",
        model=model,
        attempts=1 if ok else 3,
        latency_s=latency,
        started_at=1000.0 + i,
        finished_at=1000.0 + i + latency,
        status_code=200 if ok else 503,
        usage=Usage(
            prompt_tokens=10,
            completion_tokens=5,
            total_tokens=15,
            cached_tokens=2,
            reasoning_tokens=1,
        )
        if ok
        else None,
        error_code=None if ok else "http_503",
        cost_usd=cost,
        body={"choices": [{"message": {"content": "x"}}]} if ok else None,
    )


@pytest.fixture(params=["jsonl", "parquet"])
def output(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    path = tmp_path / f"o.{request.param}"
    with open_writer(path) as writer:
        for i in range(100):  # latencies 0.01 … 1.00 s for model a
            writer.write(result(i, "a", "ok", (i + 1) / 100, 0.001))
        for i in range(100, 110):
            writer.write(result(i, "b", "ok", 0.5, None))
        for i in range(110, 115):
            writer.write(result(i, "b", "error", 0.1, None))
    return path


def test_totals_percentiles_and_errors(output: Path) -> None:
    report, _ = build_report(output)
    assert (report.requests, report.ok, report.error) == (115, 110, 5)
    a = report.groups["a"]["ok"]
    assert (a.requests, a.prompt_tokens, a.cached_tokens, a.completion_tokens) == (
        100,
        1000,
        200,
        500,
    )
    assert a.reasoning_tokens == 100 and a.cost_usd == pytest.approx(0.1)
    assert report.groups["b"]["ok"].unpriced == 10
    assert report.groups["b"]["error"].requests == 5
    assert report.cost_usd == pytest.approx(0.1)
    # 110 ok latencies: 100 spread over 0.01..1.00 and ten of 0.5
    assert report.latency_p50_s == pytest.approx(0.5)
    assert report.latency_p99_s == pytest.approx(0.99)
    assert report.latency_p90_s == pytest.approx(0.89)  # rank 99 of 110: 0.89 (10 × 0.5 below)
    assert report.requests_per_s == pytest.approx(115 / (114 + 0.1))
    assert report.error_classes == {"http_503": 5}
    assert report.attempts == 100 + 10 + 15
    assert report.wall_s == pytest.approx(114 + 0.1)
    text = format_report(report)
    assert "115: 110 ok, 5 error" in text and "http_503 ×5" in text


@pytest.mark.slow
def test_cli_report_json(output: Path) -> None:
    proc = run_batcher("report", str(output), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["requests"] == 115 and data["error_classes"] == {"http_503": 5}
    missing = run_batcher("report", str(output) + ".nope")
    assert missing.returncode == 2 and "no such output" in missing.stderr


@pytest.mark.slow
def test_cli_refuses_bad_html_targets_and_fractions(output: Path, tmp_path: Path) -> None:
    proc = run_batcher("report", str(output), "--html", str(tmp_path / "no" / "r.html"))
    assert proc.returncode == 2 and "--html: cannot write" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""  # no report, then an error
    est = run_batcher("estimate", "--input", str(output), "--low-fraction", "3")
    assert est.returncode == 2 and "between 0 and 1" in est.stderr


def test_a_report_counts_the_lines_the_run_rejected(tmp_path: Path) -> None:
    """The summary said "8 lines rejected" and exit code 1; the report said 3 ok, 0 error
    and nothing of the rejects: "the same figures" as the summary."""
    out = tmp_path / "messy.parquet"
    run = run_batcher(
        "run", "-i", "sample_data/messy.jsonl", "-o", str(out), "-m", "m", "--base-url", "sim",
        "--no-progress",
    )  # fmt: skip
    assert run.returncode == 1 and "8 lines rejected" in run.stderr, run.stderr
    text = run_batcher("report", str(out)).stdout
    assert f"rejects   8 input lines rejected ({out}.rejects.jsonl" in text
    assert json.loads(run_batcher("report", str(out), "--json").stdout)["rejected"] == 8
    (tmp_path / "messy.parquet.rejects.jsonl").unlink()  # as a run that rejects nothing leaves
    assert "rejects" not in run_batcher("report", str(out)).stdout


def test_a_report_of_an_input_file_is_refused_naming_its_first_line(tmp_path: Path) -> None:
    """Input lines (prompts, request bodies) are not answers: ``batcher report`` on the input
    by mistake is one error line, not a report of every line as an ``ok`` answer."""
    given = tmp_path / "prompts.jsonl"
    given.write_text('{"custom_id": "a", "prompt": "hi"}\n', encoding="utf-8")
    proc = run_batcher("report", str(given))
    assert proc.returncode == 2, proc.stdout
    assert "prompts.jsonl:1: not a batch output line" in proc.stderr
    assert "'response'" in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_a_report_counts_the_failures_split_off_beside_the_output(
    tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"o.{suffix}"
    with open_outputs(path, split_errors=True) as writer:
        for i in range(10):
            writer.write(result(i, "a", "error" if i % 4 == 0 else "ok", 0.2, None))
    assert errors_path(path).is_file()
    report, _ = build_report(path)
    assert (report.requests, report.ok, report.error) == (10, 7, 3)
    assert report.error_classes == {"http_503": 3}
