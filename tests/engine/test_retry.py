"""The retry policy with an injected sleep: which outcomes are retried and how long it waits."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from batcher.config import RetryConfig
from batcher.engine.retry import RetryableAttempt, retry_policy
from batcher.http.answers import Attempt


class Recorder:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def failing(retry_after: float | None = None) -> Attempt:
    return Attempt(ok=False, retryable=True, latency_s=0.0, error_code="x", retry_after=retry_after)


async def run(outcomes: list[Attempt], config: RetryConfig, sleep: Recorder) -> tuple[int, Attempt]:
    calls = 0
    last = outcomes[0]
    try:
        async for attempt in retry_policy(config, sleep=sleep):
            with attempt:
                last = outcomes[min(calls, len(outcomes) - 1)]
                calls += 1
                if last.retryable:
                    raise RetryableAttempt(last)
    except RetryableAttempt:
        pass
    return calls, last


@pytest.mark.anyio
async def test_backoff_is_jittered_and_bounded() -> None:
    sleep = Recorder()
    config = RetryConfig(max_attempts=6, backoff_initial_s=1.0, backoff_max_s=8.0)
    calls, last = await run([failing()], config, sleep)
    assert calls == 6 and not last.ok
    assert len(sleep.waits) == 5
    caps = [1 * 2**i for i in range(5)]  # full jitter: uniform(0, min(max, initial × 2^n))
    assert all(0 <= w <= min(8.0, cap * 2) for w, cap in zip(sleep.waits, caps, strict=True))
    assert max(sleep.waits) <= 8.0


@pytest.mark.anyio
async def test_server_retry_after_is_honoured() -> None:
    sleep = Recorder()
    ok = Attempt(ok=True, retryable=False, latency_s=0.0)
    calls, last = await run(
        [failing(retry_after=5.0), failing(retry_after=0.25), ok], RetryConfig(), sleep
    )
    assert calls == 3 and last.ok
    assert sleep.waits == [5.0, 0.25]


@pytest.mark.anyio
async def test_final_outcome_is_not_retried() -> None:
    sleep = Recorder()
    final = Attempt(ok=False, retryable=False, latency_s=0.0, status_code=400)
    calls, last = await run([final], RetryConfig(), sleep)
    assert calls == 1 and last.status_code == 400
    assert sleep.waits == []


@pytest.mark.anyio
@pytest.mark.parametrize("max_attempts", [2, 6])
async def test_policy_after_a_first_attempt_made_outside_it_is_the_same_policy(
    max_attempts: int,
) -> None:
    """The engine makes the first attempt itself; the policy then does the rest, unchanged."""
    config = RetryConfig(max_attempts=max_attempts, backoff_initial_s=1.0, backoff_max_s=8.0)
    sleep = Recorder()
    calls = 0
    try:
        async for attempt in retry_policy(config, sleep=sleep, first=failing(retry_after=5.0)):
            with attempt:
                calls += 1
                raise RetryableAttempt(failing())
    except RetryableAttempt:
        pass
    assert calls == max_attempts - 1  # with the first: max_attempts in all
    assert sleep.waits[0] == 5.0 and len(sleep.waits) == max_attempts - 1
    # the backoff continues from the second attempt: caps 2, 4, 8, 8 (not 1, 2, 4, 8)
    caps = [min(8.0, 2.0**i) for i in range(1, max_attempts - 1)]
    assert all(0 <= w <= cap for w, cap in zip(sleep.waits[1:], caps, strict=True))


async def _waits(config: RetryConfig, steady: Callable[[], bool]) -> list[float]:
    """The waits of a request that fails every attempt, after a first attempt outside the
    policy (as the engine makes it)."""
    sleep = Recorder()
    try:
        async for attempt in retry_policy(config, sleep=sleep, first=failing(), steady=steady):
            with attempt:
                raise RetryableAttempt(failing())
    except RetryableAttempt:
        pass
    return sleep.waits


@pytest.mark.anyio
async def test_while_failures_are_sporadic_the_backoff_stays_at_its_first_step() -> None:
    random.seed(3)
    config = RetryConfig(max_attempts=12, backoff_initial_s=1.0, backoff_max_s=60.0)
    steady = await _waits(config, lambda: True)
    assert len(steady) == 11 and all(0 <= w <= 1.0 for w in steady)
    random.seed(3)
    failing_server = await _waits(config, lambda: False)
    assert len(failing_server) == 11
    assert max(failing_server) > 8.0  # caps 2, 4, 8, ... 60: the backoff grows as before


@pytest.mark.anyio
async def test_by_default_a_sporadic_failure_is_retried_within_half_a_second() -> None:
    # The openai SDK's first retry comes after at most 0.5 s; so does batcher's by default,
    # however often the request failed while the endpoint is steady.
    random.seed(7)
    waits = await _waits(RetryConfig(max_attempts=12), lambda: True)
    assert len(waits) == 11 and all(0 <= w <= 0.5 for w in waits)
    assert max(waits) > 0.25  # full jitter over the whole first step


@pytest.mark.anyio
async def test_the_backoff_grows_again_once_the_endpoint_is_no_longer_steady() -> None:
    random.seed(5)
    config = RetryConfig(max_attempts=12, backoff_initial_s=1.0, backoff_max_s=60.0)
    asked = 0

    def steady() -> bool:
        nonlocal asked
        asked += 1
        return asked <= 5  # steady for the first five waits

    waits = await _waits(config, steady)
    assert all(w <= 1.0 for w in waits[:5])
    assert max(waits[5:]) > 8.0


@pytest.mark.anyio
async def test_a_server_retry_after_is_honoured_when_steady_too() -> None:
    sleep = Recorder()
    calls = 0
    try:
        async for attempt in retry_policy(
            RetryConfig(max_attempts=3), sleep=sleep, first=failing(retry_after=5.0),
            steady=lambda: True,
        ):  # fmt: skip
            with attempt:
                calls += 1
                raise RetryableAttempt(failing(retry_after=7.0))
    except RetryableAttempt:
        pass
    assert sleep.waits == [5.0, 7.0]
