"""Several endpoints in one job: spread by weight and headroom, failover, the endpoint recorded.

Over real loopback sockets: two simulators with different RPM limits, and an endpoint that is
down (nothing listening on its port).
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from batcher.engine.endpoints import Endpoint, Router
from batcher.engine.outage import Outage
from batcher.errors import ConfigError
from batcher.job_file import job_from_dict
from batcher.limits.endpoint import Limits
from batcher.output.writers import read_results
from batcher.runner.run import run_job
from batcher.sim.config import SimConfig
from batcher.sim.serve import running_sim
from tests.helpers import free_port, write_input


def job_over(tmp_path: Path, n: int, endpoints: list[dict[str, Any]], **limits: Any) -> Any:
    src = write_input(tmp_path / "in.jsonl", n)
    return job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / "o.parquet"), "progress": False},
            "endpoints": endpoints,
            "request": {"model": "gpt-4o-mini"},
            "limits": {"concurrency": 16, **limits},
            "retry": {"max_attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
        }
    )


@pytest.mark.slow
def test_two_endpoints_give_the_sum_of_their_limits(tmp_path: Path) -> None:
    """1,200 + 2,400 RPM: about 60 requests a second together, shared about 1:2, none lost."""
    slow_cfg = SimConfig(rpm=1200, burst_s=0.25, latency_ms=20)
    fast_cfg = SimConfig(rpm=2400, burst_s=0.25, latency_ms=20)
    with running_sim(slow_cfg) as slow, running_sim(fast_cfg) as fast:
        job = job_over(tmp_path, 360, [
            {"name": "slow", "base_url": slow.base_url, "rpm": 1200},
            {"name": "fast", "base_url": fast.base_url, "rpm": 2400},
        ])  # fmt: skip
        report = run_job(job, stream=io.StringIO())
        rejected_429 = slow.simulator.stats.rejected_429 + fast.simulator.stats.rejected_429
    rows = list(read_results(report.output))
    assert report.exit_code == 0, report.summary
    assert sorted(r["custom_id"] for r in rows) == [f"r{i:05d}" for i in range(360)]
    by_endpoint = Counter(r["endpoint"] for r in rows)
    assert by_endpoint["slow"] + by_endpoint["fast"] == 360
    assert 0.25 <= by_endpoint["slow"] / 360 <= 0.42  # a third, by their limits
    span = max(r["finished_at"] for r in rows) - min(r["started_at"] for r in rows)
    assert 360 / span.total_seconds() >= 0.8 * (1200 + 2400) / 60  # the sum of the limits
    assert rejected_429 <= 5
    assert f"endpoints fast {by_endpoint['fast']}, slow {by_endpoint['slow']}" in report.summary


def test_a_dead_endpoint_sends_its_share_to_the_living_one(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with running_sim(SimConfig(latency_ms=5)) as alive:
        job = job_over(tmp_path, 60, [
            {"name": "dead", "base_url": dead, "weight": 3},
            {"name": "alive", "base_url": alive.base_url},
        ])  # fmt: skip
        report = run_job(job, stream=io.StringIO())
    rows = list(read_results(report.output))
    assert report.exit_code == 0, report.summary
    assert len(rows) == 60 and {(r["status"], r["endpoint"]) for r in rows} == {("ok", "alive")}


def test_router_prefers_room_then_weight() -> None:
    def endpoint(name: str, weight: float, rpm: float | None = None) -> Endpoint:
        limits = Limits(rpm=rpm, concurrency=10)
        limits.probing = False
        limits.concurrency.total_tokens = 10
        # no client: the router reads only the limits, weights and counts
        return Endpoint(name=name, client=None, limits=limits,  # type: ignore[arg-type]
                        outage=Outage(patience_s=1), weight=weight)  # fmt: skip

    a, b = endpoint("a", 1.0), endpoint("b", 3.0)
    router = Router([a, b])
    picks: Counter[str] = Counter()
    for _ in range(8):  # in flight: the router spreads 1:3
        chosen = router.choose()
        assert chosen is not None
        chosen.assigned += 1
        picks[chosen.name] += 1
    assert picks == {"a": 2, "b": 6}
    b.limits.on_rate_limited(30.0)  # b paused by a 429: a takes the next ones
    assert router.choose() is a
    a.outage.consecutive_failures = 5
    a.outage.failed()  # a down too: b (only waiting) comes before a (down)
    assert router.choose() is b


def test_endpoints_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="not both"):
        job_from_dict({"endpoint": {"base_url": "sim"}, "endpoints": [{"base_url": "sim"}]})
    with pytest.raises(ConfigError, match=r"endpoints\[1\]\.rpm"):
        job_from_dict({"endpoints": [{"base_url": "sim"}, {"base_url": "sim", "rpm": 0}]})
    with pytest.raises(ConfigError, match="name of its own"):
        job_from_dict({"endpoints": [{"name": "x", "base_url": "sim"}] * 2})
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.colour"):
        job_from_dict({"endpoints": [{"base_url": "sim", "colour": "red"}]})


def test_a_router_is_steady_while_one_endpoint_fails_only_sporadically() -> None:
    def endpoint(name: str) -> Endpoint:
        return Endpoint(name=name, client=None, limits=Limits(concurrency=4),  # type: ignore[arg-type]
                        outage=Outage(patience_s=1))  # fmt: skip

    a, b = endpoint("a"), endpoint("b")
    router = Router([a, b])
    for i in range(400):  # a tenth of the attempts fail, spread out: steady
        a.record(i % 10 != 0)
        b.record(i % 10 != 0)
    assert router.steady()
    for _ in range(3):  # a few failures in a row do not swing it
        a.record(False)
    assert router.steady()
    for _ in range(30):  # b fails everything: a still answers, so the lane is steady
        b.record(False)
    assert router.steady() and b.failure_share > 0.25
    for _ in range(30):  # both fail everything: no longer
        a.record(False)
    assert not router.steady()
    for _ in range(200):  # a recovers
        a.record(True)
    assert router.steady()


def test_an_endpoint_that_is_down_does_not_keep_a_router_steady() -> None:
    # b went down with a low share (it gets no attempts now, so its share stays); a takes
    # every request and fails them: the lane is not steady
    a = Endpoint(name="a", client=None, limits=Limits(concurrency=4),  # type: ignore[arg-type]
                 outage=Outage(patience_s=60))  # fmt: skip
    b = Endpoint(name="b", client=None, limits=Limits(concurrency=4),  # type: ignore[arg-type]
                 outage=Outage(patience_s=60))  # fmt: skip
    router = Router([a, b])
    for _ in range(5):
        b.record(False)
        b.outage.failed()
    assert b.outage.active and b.failure_share < 0.25
    for _ in range(50):
        a.record(False)
    assert router.choose() is a
    assert not router.steady()
