"""429s that say a limit was reached versus 429s of a busy server (``classify_429``), and the
pool's answer to each: a pause and a back-off for a limit; for overload, only the request waits
unless overload answers become frequent (``OverloadRatio``)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from batcher.limits.endpoint import BACKOFF, Limits
from batcher.limits.overload import OVERLOAD_ALPHA, OverloadRatio, classify_429
from batcher.sim.config import SimConfig
from tests.helpers import run_batcher, sim_process, write_input
from tests.limits.test_limits import Clock


@pytest.mark.parametrize(
    ("headers", "error", "tokens", "verdict"),
    [
        # headers showing capacity: a busy server, whatever the body says
        ({"x-ratelimit-remaining-requests": "4999"}, "rate_limit_exceeded", 0, "overload"),
        (
            {"x-ratelimit-remaining-requests": "12", "x-ratelimit-remaining-tokens": "90000"},
            "rate_limit_exceeded",
            500,
            "overload",
        ),
        # nothing left of one of them: a limit
        ({"x-ratelimit-remaining-requests": "0"}, "server_error overloaded", 0, "limit"),
        (
            {"x-ratelimit-remaining-requests": "40", "x-ratelimit-remaining-tokens": "0"},
            None,
            10,
            "limit",
        ),
        # tokens left, but fewer than twice this request's estimate: the token limit, likely
        (
            {"x-ratelimit-remaining-requests": "40", "x-ratelimit-remaining-tokens": "1500"},
            None,
            800,
            "limit",
        ),
        # a limit the per-minute headers do not describe: a limit whatever they show
        (
            {"x-ratelimit-remaining-requests": "4999"},
            "rate_limit_exceeded Rate limit reached on requests per day (RPD): Limit 10000",
            0,
            "limit",
        ),
        (
            {"x-ratelimit-remaining-requests": "99"},
            "http_429 Too many concurrent requests",
            0,
            "limit",
        ),
        ({"x-ratelimit-remaining-requests": "99"}, "insufficient_quota You exceeded", 0, "limit"),
        # tokens left, but fewer than this request needs: the token limit refused it
        (
            {"x-ratelimit-remaining-requests": "40", "x-ratelimit-remaining-tokens": "300"},
            None,
            800,
            "limit",
        ),
        # no headers: the body decides
        ({}, "overloaded The server is currently overloaded with other requests.", 0, "overload"),
        (None, "server_error That model is at capacity", 0, "overload"),
        ({}, "rate_limit_exceeded Rate limit reached for requests", 0, "limit"),
        ({}, "http_429 HTTP 429: Too Many Requests (server busy)", 0, "limit"),
        # nothing to go by: a limit, the safe reading
        ({}, "http_429 HTTP 429: (empty body)", 0, "limit"),
        ({"x-ratelimit-remaining-requests": "lots"}, None, 0, "limit"),
    ],
)
def test_classify_429(
    headers: dict[str, str] | None, error: str | None, tokens: int, verdict: str
) -> None:
    assert classify_429(headers, error, tokens) == verdict


def test_an_overload_429_neither_pauses_nor_slows_the_pool() -> None:
    clock = Clock()
    limits = Limits(rpm=600, concurrency=100, clock=clock)
    limits.release(0)  # the probe's answer: the pool opens
    limits.in_flight_requests = 1
    limits.on_rate_limited(0.5, "overload")
    assert limits.paused_s == 0.0
    assert limits.factor == 1.0
    assert limits.concurrency.total_tokens == 100
    assert limits.rpm is not None and limits.rpm.per_minute == 600
    assert (limits.rate_limited, limits.overloaded) == (1, 1)
    limits.on_rate_limited(0.5, "limit")  # a limit still pauses and backs off
    assert limits.paused_s == pytest.approx(0.5)
    assert limits.factor == pytest.approx(BACKOFF)
    assert (limits.rate_limited, limits.overloaded) == (2, 1)


@pytest.mark.parametrize("share", [0.02, 0.05, 0.1])
def test_sporadic_overload_never_narrows_the_pool(share: float) -> None:
    """Overload 429s spread evenly at up to 10 % of answers: the pool keeps its full width."""
    limits = Limits(concurrency=128)
    limits.release(0)
    every = round(1 / share)
    for i in range(20_000):
        if i % every == 0:
            limits.on_rate_limited(0.5, "overload")
        else:
            limits.answered()
    assert limits.factor == 1.0
    assert limits.concurrency.total_tokens == 128


@pytest.mark.anyio
async def test_frequent_overload_narrows_the_pool_once_per_window_and_it_recovers() -> None:
    clock = Clock()
    limits = Limits(concurrency=100, clock=clock)
    limits.release(0)
    window = round(1 / OVERLOAD_ALPHA)
    cuts = []
    for i in range(4 * window):  # half the answers are 429s: the server is swamped
        if i % 2:
            limits.on_rate_limited(0.5, "overload")
        else:
            limits.answered()
        cuts.append(limits.factor)
    narrowed = sorted(set(cuts), reverse=True)
    assert narrowed[0] == 1.0 and len(narrowed) >= 3  # several cuts...
    assert len(narrowed) <= 5  # ...but never more than one per window of answers
    assert limits.concurrency.total_tokens == round(100 * limits.factor) < 100
    assert limits.paused_s == 0.0  # never a pool-wide pause
    clock.now += 60.0  # quiet again: the next request finds it back at full width
    await limits.acquire(0)
    assert limits.factor == 1.0
    assert limits.concurrency.total_tokens == 100


def test_the_ratio_waits_for_a_window_of_answers_before_deciding() -> None:
    ratio = OverloadRatio()
    # the first answers of a run all 429s: no decision on so few
    assert not any(ratio.add(True) for _ in range(round(1 / OVERLOAD_ALPHA) - 1))
    assert ratio.add(True)  # a window's worth, every one refused: narrow
    assert ratio.ratio == 0.0  # and the next decision starts from the answers after it


def test_the_simulators_overloaded_fault_is_a_busy_429() -> None:
    config = SimConfig(error_rate=1.0, error_kinds=("overloaded",), fault_retry_after_s=0.5)
    assert config.error_kinds == ("overloaded",)


@pytest.mark.slow
def test_a_busy_server_s_429s_cost_their_retries_not_the_pool(tmp_path: Path) -> None:
    """Over a real socket: 10 % of answers are 429s from a busy server (the simulator's
    ``overloaded`` fault, with its rate-limit headers showing capacity). Every request ends ok,
    the summary tells the busy 429s apart, and requests kept arriving while each 429's
    retry-after ran (a limit's 429 would have paused the pool: ``bench/limits.py`` d)."""
    src = write_input(tmp_path / "in.jsonl", 300)
    out = tmp_path / "out.parquet"
    with sim_process(
        "--latency-ms", "5", "--rpm", "1000000", "--error-rate", "0.1",
        "--error-kinds", "overloaded", "--fault-retry-after", "0.3", "--seed", "3",
    ) as base_url:  # fmt: skip
        proc = run_batcher(
            "run", "--input", str(src), "--output", str(out), "--model", "gpt-4o-mini",
            "--base-url", base_url, "--concurrency", "16", "--max-attempts", "10",
            "--no-progress",
        )  # fmt: skip
        log = httpx.get(base_url.removesuffix("/v1") + "/log").json()
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(out, columns=["custom_id", "status"]).to_pydict()
    assert len(set(table["custom_id"])) == 300 and set(table["status"]) == {"ok"}
    busy = len(log["rate_limited"])
    assert busy > 0
    assert f"429s      {busy:,}: 0 at a rate limit" in proc.stderr
    assert f"{busy:,} from a busy server" in proc.stderr
    arrivals = log["arrivals"]
    during = [sum(1 for a in arrivals if t + 0.02 < a < t + 0.3) for t in log["rate_limited"]]
    assert sum(during) > 0  # the pool went on while the refused requests waited
