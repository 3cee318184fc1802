"""An endpoint's limits: everything a request waits on before it is sent, and what answers teach.

Three separate things, all waited on before a request is sent:

- **Meters** (``batcher.limits.meters.RateMeter``): their rate is the job's ``rpm``/``tpm``,
  lowered to the server's ``x-ratelimit-limit-*`` when that is smaller (a job that sets no
  limit learns the server's from its first answer).
- **Concurrency** (an ``anyio.CapacityLimiter``): at most ``concurrency`` requests in flight;
  just one until the first answer is back (a probe: it brings the server's limits).
- **Cooldown and back-off**: a 429 that says a limit was reached pauses every new request for
  its ``retry-after`` (1 s without one) and cuts the meters' rates and the concurrency limit by
  ``BACKOFF``; they climb back linearly to full over ``RECOVERY_S`` seconds without a 429.
  A 429 of a busy server is not a limit (``batcher.limits.overload``): only that request waits,
  unless such answers become frequent.

Server headers also steer (``batcher.limits.headers``): ``x-ratelimit-remaining-*`` caps how
far ahead of the server the meters may run: the dispatch credit (what could be sent at once) is
cut to what the server says remains, less what is in flight, and then refills at the limit's
rate. With no limit header, ``remaining`` at 0 pauses the pool until ``x-ratelimit-reset-*``.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping

import anyio
import anyio.lowlevel

from batcher.limits.headers import RateHeaders, parse_rate_headers
from batcher.limits.known_limits import Announced
from batcher.limits.limit_checks import LimitChecks
from batcher.limits.meters import Clock, RateMeter
from batcher.limits.overload import OverloadRatio, Verdict429

#: Factor applied to the rates and the concurrency limit by each 429 (not more than once per
#: cooldown), and the floor it cannot go below.
BACKOFF = 0.7
MIN_FACTOR = 0.1
#: Seconds without a 429 to climb back from the floor to full speed.
RECOVERY_S = 30.0
#: Pool-wide pause after a 429 that carried no retry-after header.
DEFAULT_COOLDOWN_S = 1.0
#: The longest wait a server may ask for and be obeyed: a bogus ``retry-after`` (an HTTP date
#: years ahead, say) must not park the pool all night.
MAX_SERVER_WAIT_S = 600.0


class Limits:
    """Everything a request waits on before it is sent, and what answers teach it."""

    def __init__(
        self,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        concurrency: int = 64,
        share: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self._clock = clock
        # This pool's part of limits that several pools share (the Ray engine's workers each
        # take 1/K): the server's x-ratelimit-* figures are for the whole key, so they are
        # scaled by it too, or K pools that each learned the server's limit would send K times it.
        self.share = share
        self.configured_rpm = rpm
        self.configured_tpm = tpm
        self.server_rpm: float | None = None
        self.server_tpm: float | None = None
        self.rpm = RateMeter(rpm, clock=clock) if rpm else None
        self.tpm = RateMeter(tpm, clock=clock) if tpm else None
        self.max_concurrency = concurrency
        # Probe first: one request alone until the first answer is back, so a server's limits
        # (its x-ratelimit-* headers) are known before a whole pool's worth is sent at once.
        self.concurrency = anyio.CapacityLimiter(1)
        self.probing = True
        self.outage = False
        self.factor = 1.0  # the 429 back-off: 1.0 is full speed
        self._factor_at = clock()
        self._paused_until = 0.0
        self.in_flight_requests = 0
        self.in_flight_tokens = 0
        self.rate_limited = 0  # 429s seen
        # ... by the Unix second they came: the output's record of when the run met them
        self.rate_limited_at: Counter[int] = Counter()
        self.overloaded = 0  # of which the server was busy, not at a limit
        self._overload = OverloadRatio()
        self.checks = LimitChecks()  # announced limits that cannot be right are ignored
        self._repaced: anyio.Event | None = None  # set when remembered limits are dropped

    async def acquire(self, tokens: int) -> bool:
        """Wait until a request of ``tokens`` estimated tokens may be sent, and count it in flight.

        The caller holds ``concurrency`` around the attempt and calls ``release`` after it.
        Returns whether the tokens were charged to a TPM meter (to correct once answered).
        """
        self._recover()
        while True:
            pause = self._paused_until - self._clock()
            if pause <= 0:
                break
            await anyio.sleep(pause)
        while True:
            rpm, tpm, wait = self.rpm, self.tpm, 0.0
            if rpm:
                wait = max(wait, rpm.reserve(1))
            charged = tpm is not None  # now: a meter learned while this sleeps was not charged
            if tpm:
                wait = max(wait, tpm.reserve(tokens))
            if wait <= 0 or await self._slept(wait):
                break
            # The pace rose a lot while this waited (``_repace``): give the slots back, and
            # book again at the new pace rather than wait out the old one. Every waiter woken
            # gives its slot back before any books again (the checkpoint): otherwise each
            # would get the last slot back and all would go at once.
            if rpm:
                rpm.refund(1)
            if tpm:
                tpm.refund(tokens)
            await anyio.lowlevel.checkpoint()
        self.in_flight_requests += 1
        self.in_flight_tokens += tokens
        return charged

    async def _slept(self, wait: float) -> bool:
        """Sleep until a meter's slot; false if cut short because the pace rose meanwhile."""
        if self._repaced is None:
            self._repaced = anyio.Event()
        with anyio.move_on_after(wait):
            await self._repaced.wait()
            return False
        return True

    def _repace(self) -> None:
        """Wake the requests waiting for a meter's slot, to book again: the pace they booked
        at is stale (remembered limits dropped, a limit at least doubled)."""
        if self._repaced is not None:
            self._repaced.set()
            self._repaced = None

    def release(self, tokens: int) -> None:
        """The attempt of ``tokens`` estimated tokens is over (answered or failed)."""
        self.in_flight_requests -= 1
        self.in_flight_tokens -= tokens
        if self.probing:  # the first answer is in: open the pool
            self.probing = False
            if not self.outage:
                self.concurrency.total_tokens = max(1, round(self.max_concurrency * self.factor))

    def start_from(self, announced: Announced) -> None:
        """Start with the limits a server announced on an earlier run (``known_limits``): the
        meters at them, and the pool open at once instead of after a probe."""
        kinds = {"requests": announced.rpm, "tokens": announced.tpm}
        for kind, limit in kinds.items():
            if limit is not None:
                self._steer(kind, RateHeaders(limit, None, None))
        self.checks.remembered({kind for kind, limit in kinds.items() if limit is not None})
        self.probing = False
        if not self.outage:
            self.concurrency.total_tokens = max(1, round(self.max_concurrency * self.factor))

    def forget_unconfirmed(self) -> None:
        """Drop the remembered limits (``start_from``) this run's server has not announced
        (called at its first ok answer): the meters go back to the job's own limits, or none,
        and requests waiting on the old pace go at once."""
        kinds = self.checks.take_unconfirmed()
        if not kinds:
            return
        if "requests" in kinds:
            self.server_rpm = None
            self.rpm = self.rpm if self.configured_rpm else None
        if "tokens" in kinds:
            self.server_tpm = None
            self.tpm = self.tpm if self.configured_tpm else None
        self._set_factor(self.factor)  # the meters left, at the job's own rates
        self._repace()

    def announced(self) -> Announced:
        """The limits the server's headers announced so far (for the whole key: not scaled
        by ``share``)."""
        rpm, tpm = self.server_rpm, self.server_tpm
        return Announced(
            rpm=None if rpm is None else rpm / self.share,
            tpm=None if tpm is None else tpm / self.share,
        )

    def correct_tokens(self, estimated: int, charged: int) -> None:
        """Correct the TPM meter once the server's count of a request is known."""
        if self.tpm and charged != estimated:
            self.tpm.refund(estimated - charged)

    def observe(self, headers: Mapping[str, str]) -> float:
        """Let an answer's ``x-ratelimit-*`` headers steer the meters. Returns the seconds of a
        pool-wide pause they started (nothing remaining until a reset, with no limit to pace
        by), else 0: a long one is worth saying."""
        now = self._clock()
        paused = self._paused_until > now  # the answers in flight repeat it: said once
        for kind in ("requests", "tokens"):
            figures = parse_rate_headers(headers, kind)
            if figures is not None:
                self._steer(kind, figures)
        if not paused and self._paused_until > now:
            return self._paused_until - now
        return 0.0

    def answered(self) -> None:
        """Count an answer other than a 429 towards the overload ratio (``on_rate_limited``)."""
        if self._overload.ratio and self._overload.add(False):  # 0: no overload 429 came
            self._back_off()

    def on_rate_limited(self, retry_after: float | None, verdict: Verdict429 = "limit") -> None:
        """A 429. At a limit: pause the whole pool, and slow it down until 429s stop.

        An overloaded server (``classify_429``): the request that met it waits its own
        ``retry-after`` (the retry policy's part) and the pool goes on; it slows down only
        when such answers pass ``OVERLOAD_RATIO`` of the recent ones.
        """
        self.rate_limited += 1
        self.rate_limited_at[int(time.time())] += 1
        if verdict == "overload":
            self.overloaded += 1
            if self._overload.add(True):
                self._back_off()
            return
        now = self._clock()
        fresh = now >= self._paused_until  # several 429s of one burst back off once
        wait = min(retry_after or DEFAULT_COOLDOWN_S, MAX_SERVER_WAIT_S)
        self._paused_until = max(self._paused_until, now + wait)
        if fresh:
            self._back_off()

    def enter_outage(self, probe_in_s: float) -> None:
        """The endpoint is down: one request at a time, the next in ``probe_in_s``."""
        self.outage = True
        self.concurrency.total_tokens = 1
        self.cool_down(probe_in_s)

    def leave_outage(self) -> None:
        """The endpoint answers again: open the pool to its current width."""
        self.outage = False
        if not self.probing:
            self.concurrency.total_tokens = max(1, round(self.max_concurrency * self.factor))

    def cool_down(self, seconds: float) -> None:
        """Pause every new request for ``seconds`` (at most ``MAX_SERVER_WAIT_S``)."""
        seconds = min(seconds, MAX_SERVER_WAIT_S)
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    @property
    def paused_s(self) -> float:
        """Seconds the pool is still paused for."""
        return max(0.0, self._paused_until - self._clock())

    def _steer(self, kind: str, figures: RateHeaders) -> None:
        if figures.limit is not None and not self.checks.accept(kind, figures.limit):
            return  # cannot be right: this answer's figures of that kind are ignored
        if self.share < 1.0:
            figures = RateHeaders(
                None if figures.limit is None else figures.limit * self.share,
                None if figures.remaining is None else figures.remaining * self.share,
                figures.reset_s,
            )
        requests = kind == "requests"
        if figures.limit is not None and figures.limit > 0:
            configured = self.configured_rpm if requests else self.configured_tpm
            learned = self.server_rpm if requests else self.server_tpm
            if learned != figures.limit:
                if requests:
                    self.server_rpm = figures.limit
                else:
                    self.server_tpm = figures.limit
                base = min(configured or math.inf, figures.limit)
                meter = self.rpm if requests else self.tpm
                if meter is None:
                    meter = RateMeter(base * self.factor, clock=self._clock)
                    if requests:
                        self.rpm = meter
                    else:
                        self.tpm = meter
                elif meter.set_rate(base * self.factor):
                    self._repace()
        meter = self.rpm if requests else self.tpm
        if figures.remaining is None:
            return
        if meter is not None:
            in_flight = self.in_flight_requests if requests else self.in_flight_tokens
            meter.cap_credit(figures.remaining - in_flight)
        elif figures.remaining <= 0 and figures.reset_s:
            self.cool_down(figures.reset_s)

    def _back_off(self) -> None:
        """Multiplicative decrease of the rates and the concurrency (from where recovery had
        climbed back to)."""
        self._recover()
        self._set_factor(max(MIN_FACTOR, self.factor * BACKOFF))

    def _recover(self) -> None:
        """Climb back towards full speed, linearly over ``RECOVERY_S``."""
        if self.factor >= 1.0:
            return
        now = self._clock()
        if now < self._paused_until:
            return
        step = (now - max(self._factor_at, self._paused_until)) / RECOVERY_S
        if step > 0:
            self._set_factor(min(1.0, self.factor + step))

    def _set_factor(self, factor: float) -> None:
        self.factor = factor
        self._factor_at = self._clock()
        for meter, configured, learned in (
            (self.rpm, self.configured_rpm, self.server_rpm),
            (self.tpm, self.configured_tpm, self.server_tpm),
        ):
            if meter is not None:
                base = min(configured or math.inf, learned or math.inf)
                if meter.set_rate(base * factor):
                    self._repace()
        if not self.probing and not self.outage:
            self.concurrency.total_tokens = max(1, round(self.max_concurrency * factor))
