"""Rate meters with an injected clock: spacing, bursts, refunds and the 429 cooldown."""

from __future__ import annotations

import pytest

from batcher.limits import Limits, RateMeter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_meter_spreads_requests_evenly_after_the_burst() -> None:
    clock = Clock()
    meter = RateMeter(60, burst_s=1.0, clock=clock)  # one a second
    waits = [meter.reserve(1) for _ in range(5)]
    # the first two fit the 1 s burst tolerance; then one a second, queued in order
    assert waits == pytest.approx([0.0, 0.0, 1.0, 2.0, 3.0])


def test_meter_recovers_after_idle_time_but_keeps_no_more_than_the_burst() -> None:
    clock = Clock()
    meter = RateMeter(600, burst_s=1.0, clock=clock)  # 10 a second
    for _ in range(20):
        meter.reserve(1)
    clock.now += 3600
    waits = [meter.reserve(1) for _ in range(12)]
    assert waits[:11] == pytest.approx([0.0] * 11, abs=1e-9)  # 1 s of burst: 10 units + 1
    assert waits[11] == pytest.approx(0.1)


def test_token_meter_weights_and_refunds() -> None:
    clock = Clock()
    meter = RateMeter(6000, burst_s=0.0, clock=clock)  # 100 tokens a second
    assert meter.reserve(500) == 0.0
    assert meter.reserve(100) == pytest.approx(5.0)
    meter.refund(400)  # the first request used 100 tokens, not 500
    assert meter.reserve(100) == pytest.approx(2.0)


def test_meter_rejects_non_positive_rates() -> None:
    with pytest.raises(ValueError):
        RateMeter(0)


@pytest.mark.anyio
async def test_cooldown_pauses_acquire() -> None:
    clock = Clock()
    limits = Limits(rpm=None, tpm=None, clock=clock)
    limits.cool_down(5.0)
    limits.cool_down(1.0)  # a shorter cooldown does not shorten the pause
    assert limits._paused_until == 1005.0
    clock.now += 6
    await limits.acquire(10)  # returns at once: the pause is over


def test_settle_refunds_only_when_usage_is_lower() -> None:
    clock = Clock()
    limits = Limits(tpm=6000, clock=clock)
    assert limits.tpm is not None
    limits.tpm._tolerance = 0.0
    limits.tpm.reserve(600)
    limits.settle(600, 100)
    limits.settle(600, None)
    limits.settle(600, 900)
    assert limits.tpm.reserve(1) == pytest.approx(1.0)
