"""Client-side rate limits: continuous RPM/TPM meters and a pool-wide cooldown after 429s.

Each meter is a GCRA-style scheduler (the "virtual scheduling" form of a token bucket): a
request reserves its cost now and learns how long to wait, so waiters queue in order with no
polling, and capacity is spread evenly rather than spent in per-minute bursts. The concurrency
limit is separate: it is the number of worker tasks in the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

Clock = Callable[[], float]

#: How much of a burst a meter allows after an idle period, in seconds of its rate.
DEFAULT_BURST_S = 1.0


class RateMeter:
    """A continuous meter of ``per_minute`` units (requests or tokens) a minute."""

    def __init__(
        self, per_minute: float, *, burst_s: float = DEFAULT_BURST_S, clock: Clock = time.monotonic
    ) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be > 0")
        self.per_minute = per_minute
        self._interval = 60.0 / per_minute  # seconds per unit
        self._tolerance = burst_s
        self._clock = clock
        self._tat = clock()  # theoretical arrival time of the next unit

    def reserve(self, amount: float) -> float:
        """Reserve ``amount`` units; return the seconds to wait before using them."""
        now = self._clock()
        tat = max(self._tat, now)
        start = max(now, tat - self._tolerance)
        self._tat = tat + amount * self._interval
        return start - now

    def refund(self, amount: float) -> None:
        """Give back units reserved but not used (e.g. the estimate exceeded the real usage)."""
        self._tat -= amount * self._interval


class Limits:
    """Everything a request waits on before it is sent: cooldown, RPM meter, TPM meter."""

    def __init__(
        self,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.rpm = RateMeter(rpm, clock=clock) if rpm else None
        self.tpm = RateMeter(tpm, clock=clock) if tpm else None
        self._clock = clock
        self._paused_until = 0.0

    async def acquire(self, tokens: int) -> None:
        """Wait until a request of ``tokens`` estimated tokens may be sent."""
        while True:
            pause = self._paused_until - self._clock()
            if pause <= 0:
                break
            await anyio.sleep(pause)
        wait = 0.0
        if self.rpm:
            wait = max(wait, self.rpm.reserve(1))
        if self.tpm:
            wait = max(wait, self.tpm.reserve(tokens))
        if wait > 0:
            await anyio.sleep(wait)

    def settle(self, estimated: int, actual: int | None) -> None:
        """Correct the TPM meter once the real usage of a request is known."""
        if self.tpm and actual is not None and actual < estimated:
            self.tpm.refund(estimated - actual)

    def cool_down(self, seconds: float) -> None:
        """Pause every new request for ``seconds`` (after a 429): the whole pool slows down."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)
