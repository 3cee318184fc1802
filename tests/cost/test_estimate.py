"""``batcher estimate``: exact prompt tokens, output and cost bounds, ETA; nothing sent."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from batcher.config import JobConfig
from batcher.cost.estimate import estimate
from batcher.cost.pricing import Pricer
from batcher.job_file import job_from_dict
from batcher.runner.run import run_job
from batcher.sim.app import Simulator
from batcher.sim.config import SimConfig
from tests.helpers import ROOT, requests_of, run_batcher, write_input


def job_for(src: Path, out: Path, **limits: object):  # type: ignore[no-untyped-def]
    return job_from_dict(
        {
            "job": {"input": str(src), "output": str(out), "progress": False},
            "endpoint": {"base_url": "http://sim.test/v1"},
            "request": {"model": "gpt-4o-mini", "max_tokens": 30},
            "limits": {"concurrency": 10, **limits},
        }
    )


def endpoints_job(src: Path, endpoints: list[dict[str, Any]], **tables: Any) -> JobConfig:
    """A job over ``src`` with these ``[[endpoints]]`` (and ``variants``, ``limits``...)."""
    return job_from_dict(
        {
            "job": {"input": str(src)},
            "endpoints": endpoints,
            "request": {"model": "gpt-4o-mini", "max_tokens": 30},
            **tables,
        }
    )


def test_estimate_brackets_what_the_run_then_uses(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 60)
    with src.open("a") as f:
        f.write("not json\n")
    est = estimate(job_for(src, tmp_path / "o.parquet", rpm=60))
    sim = Simulator(SimConfig(max_completion_tokens=30))
    job = job_for(src, tmp_path / "o.parquet")
    report = run_job(job, transport=httpx.ASGITransport(app=sim), stream=io.StringIO())
    assert est.requests == 60 and est.rejected == 1
    assert est.prompt_tokens == report.stats.prompt_tokens  # tiktoken, as the server counts
    assert est.output_tokens_low <= report.stats.completion_tokens <= est.output_tokens_high
    spent = report.stats.cost_usd
    assert est.cost_low_usd is not None and est.cost_high_usd is not None and spent is not None
    assert est.cost_low_usd <= spent <= est.cost_high_usd
    price = Pricer().price("gpt-4o-mini")
    assert price is not None
    high = (est.prompt_tokens * price.input + est.output_tokens_high * price.output) / 1e6
    assert est.cost_high_usd == pytest.approx(high)
    assert est.eta_s == pytest.approx(60.0) and est.eta_bound == "60 RPM"  # not 10 × 2 s


def test_sample_of_an_earlier_output_sets_the_low_bound(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 20)
    job = job_for(src, tmp_path / "o.jsonl")
    sim = Simulator(SimConfig(max_completion_tokens=30))
    report = run_job(job, transport=httpx.ASGITransport(app=sim), stream=io.StringIO())
    est = estimate(job, sample=report.output)
    # the same prompts again: the sample's average length, within each request's budget
    average = report.stats.completion_tokens / 20
    budgets = [r.completion_budget for r in requests_of(src, job.request).values()]
    assert est.output_tokens_low == sum(min(b, int(average)) for b in budgets)
    assert "measured in" in est.low_basis


def test_unknown_model_has_no_cost_and_is_named(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 3)
    job = job_from_dict(
        {"job": {"input": str(src)}, "request": {"model": "house-7b"}, "limits": {"tpm": 600}}
    )
    est = estimate(job)
    assert est.unpriced_models == ["house-7b"]
    assert est.by_model["house-7b"].cost_high_usd is None
    assert est.cost_low_usd is None and est.cost_high_usd is None  # not a silent 0
    assert est.eta_bound == "600 TPM"


@pytest.mark.slow
def test_cli_estimate_sends_nothing_and_prints_json(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 5)
    proc = run_batcher(
        "estimate", "--input", str(src), "--model", "gpt-4o", "--base-url",
        "http://127.0.0.1:9/v1", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["requests"] == 5 and data["cost_high_usd"] > data["cost_low_usd"] > 0
    text = run_batcher("estimate", str(ROOT / "jobs" / "demo.toml"))
    assert "batcher estimate: demo (nothing was sent)" in text.stdout
    assert "prompts/s" in text.stdout


def test_eta_adds_up_every_endpoint_at_its_own_limits(tmp_path: Path) -> None:
    # a: 60 RPM (1 a second); b: 2 in flight × 2 s an answer (1 a second); the run sends to
    # both at once, so 60 requests take 30 s, not the 60 s either alone would.
    src = write_input(tmp_path / "in.jsonl", 60)
    endpoints = [
        {"name": "a", "base_url": "http://a.test/v1", "rpm": 60},
        {"name": "b", "base_url": "http://b.test/v1", "concurrency": 2},
    ]
    est = estimate(endpoints_job(src, endpoints, limits={"concurrency": 100}))
    assert est.eta_s == pytest.approx(30.0)
    assert est.eta_bound == "2 endpoints: a 60 RPM + b concurrency 2 × 2 s an answer"


def test_eta_of_a_variant_bound_to_a_slow_endpoint(tmp_path: Path) -> None:
    # Each variant sends all 30 lines; "small" may only use the 6 RPM endpoint: 300 s, however
    # fast the other endpoint takes the rest.
    src = write_input(tmp_path / "in.jsonl", 30)
    endpoints = [
        {"name": "gpu", "base_url": "http://gpu.test/v1", "rpm": 6},
        {"name": "api", "base_url": "http://api.test/v1", "rpm": 6000},
    ]
    variants = [{"name": "big"}, {"name": "small", "endpoint": "gpu"}]
    est = estimate(endpoints_job(src, endpoints, variants=variants))
    assert est.eta_s == pytest.approx(300.0)
    assert est.eta_bound == "variant small: gpu 6 RPM"


def test_eta_uses_the_endpoints_own_token_limit(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 10)
    only = [{"name": "only", "base_url": "http://sim.test/v1", "tpm": 1200}]
    est = estimate(endpoints_job(src, only, limits={"rpm": 6000}))
    charged = est.prompt_tokens + est.output_tokens_high  # every budget, as TPM is charged
    assert est.eta_s == pytest.approx(charged / 1200 * 60)
    assert est.eta_bound == "1,200 TPM"


def test_eta_of_variants_sharing_an_endpoint(tmp_path: Path) -> None:
    # Both variants may only use gpu (named twice for one of them): 2 × 30 requests at 6 RPM,
    # 600 s, not the 300 s each alone would take, nor the api endpoint's share of the input.
    src = write_input(tmp_path / "in.jsonl", 30)
    endpoints = [
        {"name": "gpu", "base_url": "http://gpu.test/v1", "rpm": 6},
        {"name": "api", "base_url": "http://api.test/v1", "tpm": 2_000_000},
    ]
    variants = [
        {"name": "a", "endpoint": "gpu"},
        {"name": "b", "endpoint": ["gpu", "gpu"]},
        {"name": "c", "endpoint": "api"},
    ]
    est = estimate(endpoints_job(src, endpoints, variants=variants))
    assert est.eta_s == pytest.approx(600.0)
    assert est.eta_bound == "variants a, b: gpu 6 RPM"


def test_eta_gives_each_endpoint_the_jobs_limits_it_does_not_set(tmp_path: Path) -> None:
    # [limits] rpm applies to each endpoint, as the run applies it: two endpoints at 60 RPM
    # take 60 requests in 30 s; b's own 600 RPM wins over the job's.
    src = write_input(tmp_path / "in.jsonl", 60)
    endpoints: list[dict[str, Any]] = [
        {"name": "a", "base_url": "http://a.test/v1"},
        {"name": "b", "base_url": "http://b.test/v1"},
    ]
    est = estimate(endpoints_job(src, endpoints, limits={"rpm": 60}))
    assert est.eta_s == pytest.approx(30.0)
    assert est.eta_bound == "2 endpoints: a 60 RPM + b 60 RPM"
    endpoints[1]["rpm"] = 600
    est = estimate(endpoints_job(src, endpoints, limits={"rpm": 60}))
    assert est.eta_s == pytest.approx(60 / (1 + 10))
    assert est.eta_bound == "2 endpoints: a 60 RPM + b 600 RPM"


def test_eta_of_no_requests(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("not json\n")
    est = estimate(job_for(src, tmp_path / "o.parquet", rpm=60))
    assert est.requests == 0 and est.rejected == 1
    assert (est.eta_s, est.eta_bound) == (0.0, "no requests")
    with pytest.raises(ValueError, match="latency_s must be > 0"):
        estimate(job_for(src, tmp_path / "o.parquet"), latency_s=0)


def test_eta_is_never_shorter_than_one_answer(tmp_path: Path) -> None:
    """20 requests at concurrency 64: all in flight at once, and each takes 2 s."""
    src = write_input(tmp_path / "in.jsonl", 20)
    est = estimate(job_for(src, tmp_path / "o.parquet", concurrency=64), latency_s=2.0)
    assert (est.eta_s, est.eta_bound) == (2.0, "one answer: 2 s")
