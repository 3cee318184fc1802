"""``[job] mode``, the ``[batch]`` table, the run flags, and the estimate's batch price."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batcher.config import BatchConfig
from batcher.cost.estimate import estimate, format_estimate
from batcher.errors import ConfigError
from batcher.job_file import job_from_dict, with_overrides
from batcher.sim import sim_server
from batcher.sim.config import SimConfig


def job(**tables: Any) -> Any:
    return job_from_dict({"job": {"input": "in.jsonl", "output": "out.parquet"}} | tables)


def test_defaults_online_and_the_batch_table() -> None:
    plain = job()
    assert plain.mode == "online" and plain.batch == BatchConfig()
    assert plain.batch.max_requests == 50_000 and plain.batch.max_bytes == 190_000_000
    assert plain.batch.completion_window == "24h" and plain.batch.unanswered == "resubmit"
    batch = job(job={"mode": "batch"}, batch={"max_requests": 10, "poll_s": 0.5})
    assert batch.mode == "batch" and batch.batch.max_requests == 10 and batch.batch.poll_s == 0.5


@pytest.mark.parametrize(
    ("tables", "field"),
    [
        ({"job": {"mode": "offline"}}, "job.mode"),
        ({"batch": {"max_requests": 0}}, "batch.max_requests"),
        ({"batch": {"max_bytes": "big"}}, "batch.max_bytes"),
        ({"batch": {"completion_window": "1 day"}}, "batch.completion_window"),
        ({"batch": {"poll_s": -1}}, "batch.poll_s"),
        ({"batch": {"unanswered": "drop"}}, "batch.unanswered"),
        ({"batch": {"max_request": 5}}, "batch.max_request"),
        ({"job": {"mode": "batch", "engine": "ray"}}, "job.mode"),
    ],
)
def test_bad_values_name_the_field(tables: dict[str, Any], field: str) -> None:
    tables = {"job": {}} | tables
    tables["job"] = {"input": "in.jsonl", "output": "out.parquet"} | tables["job"]
    with pytest.raises(ConfigError) as raised:
        job_from_dict(tables)
    assert raised.value.field == field


def test_unanswered_online_is_accepted_in_batch_mode() -> None:
    tables: dict[str, Any] = {
        "job": {"input": "in.jsonl", "output": "out.parquet", "mode": "batch"},
        "batch": {"unanswered": "online"},
    }
    assert job_from_dict(tables).batch.unanswered == "online"


def test_overrides_mode_detach_cancel() -> None:
    plain = job()
    assert with_overrides(plain, mode="batch").mode == "batch"
    assert with_overrides(plain, mode="batch", detach=True).mode == "batch"
    with pytest.raises(ConfigError, match="--detach: only with --mode batch"):
        with_overrides(plain, detach=True)
    with pytest.raises(ConfigError, match="--cancel"):
        with_overrides(plain, mode="batch", detach=True, cancel=True)
    with pytest.raises(ConfigError, match=r"job\.mode"):
        with_overrides(plain, mode="batch", engine="ray")


def test_sim_batch_timings() -> None:
    config = SimConfig(batch={"validating_s": 0.1, "in_progress_s": 0.3}).batch_config()
    assert config.validating_s == 0.1 and config.in_progress_s == 0.3
    # checked as the simulator starts, before anything is sent
    with (
        pytest.raises(ConfigError, match=r"sim\.batch\.validating: unknown key"),
        sim_server({"batch": {"validating": 1}}),
    ):
        pass


def test_estimate_shows_the_batch_price_beside_the_online_one(tmp_path: Path) -> None:
    lines = [
        {"id": str(i), "model": "m", "prompt": "hello there", "max_tokens": 10} for i in range(4)
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    raw = {"job": {"input": str(source), "output": str(tmp_path / "o.parquet")},
           "pricing": {"m": {"input": 2.0, "output": 4.0}}}  # fmt: skip
    est = estimate(job_from_dict(raw))
    assert est.cost_high_usd is not None and est.cost_high_usd > 0
    assert est.batch_cost_high_usd == pytest.approx(est.cost_high_usd / 2)
    assert est.batch_cost_low_usd == pytest.approx((est.cost_low_usd or 0) / 2)
    assert "batch cost" in format_estimate(est, name="x")
    raw["pricing"] = {"m": {"input": 2.0, "output": 4.0}, "batch_discount": True}
    discounted = estimate(job_from_dict(raw))
    assert discounted.batch_cost_high_usd == pytest.approx(est.cost_high_usd / 2)
