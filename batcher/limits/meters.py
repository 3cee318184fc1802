"""A rate meter: GCRA ("virtual scheduling", a token bucket) over requests or tokens a minute.

A request reserves its cost and sleeps exactly until its slot, so waiters queue in order with
no polling and capacity is spread evenly instead of spent in per-minute bursts. ``Limits``
(``batcher.limits.endpoint``) holds one meter for an endpoint's RPM and one for its TPM.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]

#: Burst a meter allows after an idle period, in seconds of its rate. Zero: requests go out
#: evenly spaced, which is what a server enforcing "per minute" over short windows accepts.
DEFAULT_BURST_S = 0.0


class RateMeter:
    """A continuous meter of ``per_minute`` units (requests or tokens) a minute."""

    def __init__(
        self, per_minute: float, *, burst_s: float = DEFAULT_BURST_S, clock: Clock = time.monotonic
    ) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be > 0")
        self._clock = clock
        self._tolerance = burst_s
        self._tat = clock()  # theoretical arrival time of the next unit
        self.per_minute = per_minute
        self._interval = 60.0 / per_minute
        self._booked_at = per_minute  # the slowest rate a slot now reserved may have been set at

    def set_rate(self, per_minute: float) -> bool:
        """Change the rate for every later reservation.

        Returns true when the rate has at least doubled since the slowest pace a reservation
        still waiting may have been made at: those waits are stale (a limit remembered low, a
        back-off recovered from), and the waiters must give their slots back (``refund``) and
        book again (``Limits.acquire``). What is booked ahead is then re-spaced at the new
        rate, so their refunds bring it back to now. A slower rate stretches it likewise, so
        the next reservation comes after the waiters at the new pace; a faster one that is
        not stale leaves it (the waiters keep their slots, the next one follows them).
        """
        if per_minute <= 0:
            raise ValueError("per_minute must be > 0")
        stale = per_minute >= 2 * self._booked_at
        if stale or per_minute < self.per_minute:
            now = self._clock()
            self._tat = now + (self._tat - now) * (self.per_minute / per_minute)
        self.per_minute = per_minute
        self._interval = 60.0 / per_minute
        self._booked_at = per_minute if stale else min(self._booked_at, per_minute)
        return stale

    def reserve(self, amount: float) -> float:
        """Reserve ``amount`` units; return the seconds to wait before using them."""
        now = self._clock()
        tat = max(self._tat, now)
        start = max(now, tat - self._tolerance)
        self._tat = tat + amount * self._interval
        return start - now

    def refund(self, amount: float) -> None:
        """Give back units reserved but not used (or take more, with a negative amount)."""
        self._tat -= amount * self._interval

    def cap_credit(self, units: float) -> None:
        """Allow at most ``units`` to be sent before the meter's own pace resumes."""
        self._tat = max(self._tat, self._clock() - units * self._interval)

    def delay(self) -> float:
        """Seconds until one more unit could go (0 if now)."""
        return max(0.0, self._tat - self._tolerance - self._clock())
