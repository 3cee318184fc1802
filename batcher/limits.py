"""Client-side limits: RPM/TPM meters, an adaptive concurrency limit, and 429 cooldowns.

Three separate objects, all waited on before a request is sent:

- **Meters** (``RateMeter``): GCRA ("virtual scheduling", a token bucket): a request reserves
  its cost and sleeps exactly until its slot, so waiters queue in order with no polling and
  capacity is spread evenly instead of spent in per-minute bursts. Their rate is the job's
  ``rpm``/``tpm``, lowered to the server's ``x-ratelimit-limit-*`` when that is smaller (a job
  that sets no limit learns the server's from its first answer).
- **Concurrency** (an ``anyio.CapacityLimiter``): at most ``concurrency`` requests in flight;
  just one until the first answer is back (a probe: it brings the server's limits).
- **Cooldown and back-off**: a 429 pauses every new request for its ``retry-after`` (1 s
  without one) and cuts the meters' rates and the concurrency limit by ``BACKOFF``; they climb
  back linearly to full over ``RECOVERY_S`` seconds without a 429.

Server headers also steer: ``x-ratelimit-remaining-*`` caps how far ahead of the server the
meters may run: the dispatch credit (what could be sent at once) is cut to what the server says
remains, less what is in flight, and then refills at the limit's rate. With no limit header,
``remaining`` at 0 pauses the pool until ``x-ratelimit-reset-*``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio

from batcher.known_limits import Announced
from batcher.limit_checks import LimitChecks

Clock = Callable[[], float]

#: Burst a meter allows after an idle period, in seconds of its rate. Zero: requests go out
#: evenly spaced, which is what a server enforcing "per minute" over short windows accepts.
DEFAULT_BURST_S = 0.0
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

    def set_rate(self, per_minute: float) -> None:
        """Change the rate for every later reservation."""
        if per_minute <= 0:
            raise ValueError("per_minute must be > 0")
        self.per_minute = per_minute
        self._interval = 60.0 / per_minute

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


@dataclass(frozen=True, slots=True)
class RateHeaders:
    """The ``x-ratelimit-*`` figures of one answer, for one kind (requests or tokens)."""

    limit: float | None
    remaining: float | None
    reset_s: float | None


def parse_rate_headers(headers: Mapping[str, str], kind: str) -> RateHeaders | None:
    """Read ``x-ratelimit-{limit,remaining,reset}-{kind}``; ``None`` if none is present."""
    limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
    remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
    reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
    if limit is None and remaining is None and reset is None:
        return None
    return RateHeaders(limit, remaining, reset)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """Seconds in an OpenAI reset duration (``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``)."""
    if not text:
        return None
    text = text.strip()
    number = _number(text)
    if number is not None:
        return number
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(value + unit for value, unit in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(value) * scale[unit] for value, unit in parts)


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
        wait = 0.0
        if self.rpm:
            wait = max(wait, self.rpm.reserve(1))
        charged = self.tpm is not None  # now: a meter learned while this sleeps was not charged
        if self.tpm:
            wait = max(wait, self.tpm.reserve(tokens))
        if wait > 0:
            await self._sleep(wait)
        self.in_flight_requests += 1
        self.in_flight_tokens += tokens
        return charged

    async def _sleep(self, wait: float) -> None:
        """Sleep until a meter's slot; cut short if the pace came from limits remembered from
        an earlier run and they are dropped meanwhile (``forget_unconfirmed``)."""
        if not self.checks.unconfirmed:
            await anyio.sleep(wait)
            return
        if self._repaced is None:
            self._repaced = anyio.Event()
        with anyio.move_on_after(wait):
            await self._repaced.wait()

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
        if self._repaced is not None:
            self._repaced.set()
            self._repaced = None

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

    def observe(self, headers: Mapping[str, str]) -> None:
        """Let an answer's ``x-ratelimit-*`` headers steer the meters."""
        for kind in ("requests", "tokens"):
            figures = parse_rate_headers(headers, kind)
            if figures is not None:
                self._steer(kind, figures)

    def on_rate_limited(self, retry_after: float | None) -> None:
        """A 429: pause the whole pool, and slow it down until 429s stop."""
        self.rate_limited += 1
        now = self._clock()
        fresh = now >= self._paused_until  # several 429s of one burst back off once
        wait = min(retry_after or DEFAULT_COOLDOWN_S, MAX_SERVER_WAIT_S)
        self._paused_until = max(self._paused_until, now + wait)
        if fresh:
            self._recover()
            self._set_factor(max(MIN_FACTOR, self.factor * BACKOFF))

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
                else:
                    meter.set_rate(base * self.factor)
        meter = self.rpm if requests else self.tpm
        if figures.remaining is None:
            return
        if meter is not None:
            in_flight = self.in_flight_requests if requests else self.in_flight_tokens
            meter.cap_credit(figures.remaining - in_flight)
        elif figures.remaining <= 0 and figures.reset_s:
            self.cool_down(figures.reset_s)

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
                meter.set_rate(base * factor)
        if not self.probing and not self.outage:
            self.concurrency.total_tokens = max(1, round(self.max_concurrency * factor))


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
