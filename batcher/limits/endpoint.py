"""Client-side limits: RPM/TPM meters, an adaptive concurrency limit, and 429 cooldowns.

Three separate objects, all waited on before a request is sent:

- **Meters** (``RateMeter``): GCRA ("virtual scheduling", a token bucket): a request reserves
  its cost and sleeps exactly until its slot, so waiters queue in order with no polling and
  capacity is spread evenly instead of spent in per-minute bursts. Their rate is the job's
  ``rpm``/``tpm``, lowered to the server's ``x-ratelimit-limit-*`` when that is smaller (a job
  that sets no limit learns the server's from its first answer).
- **Concurrency** (an ``anyio.CapacityLimiter``): at most ``concurrency`` requests in flight;
  just one until the first answer is back (a probe: it brings the server's limits).
- **Cooldown and back-off**: a 429 that says a limit was reached pauses every new request for
  its ``retry-after`` (1 s without one) and cuts the meters' rates and the concurrency limit by
  ``BACKOFF``; they climb back linearly to full over ``RECOVERY_S`` seconds without a 429.
- **Overload is not a limit**: a 429 whose ``x-ratelimit-remaining-*`` headers show capacity
  (or, without such headers, whose error says the server is overloaded) is a busy server, not a
  breached limit (``classify_429``). Only that request waits its ``retry-after``; the pool slows
  down only when such answers become frequent (``OverloadRatio``: AIMD on the rejection ratio,
  as the client-side throttling of Google's SRE book does), so a server that sheds 2 % of its
  requests costs their retries, not the run's speed.

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
from typing import Literal

import anyio
import anyio.lowlevel

from batcher.limits.known_limits import Announced
from batcher.limits.limit_checks import LimitChecks

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
#: Share of recent answers that were overload 429s above which the pool narrows, and how
#: quickly that share follows the answers (an exponentially weighted mean over about
#: ``1 / OVERLOAD_ALPHA`` answers). A server that sheds 5 % sits far below the threshold (the
#: mean's noise there is about 2 points); one that refuses a quarter of what it gets is
#: overwhelmed by this client, and narrowing is what helps it.
OVERLOAD_RATIO = 0.2
OVERLOAD_ALPHA = 0.02

Verdict429 = Literal["limit", "overload"]

# Words of an error that say the server is busy rather than that a quota was used up.
_OVERLOAD_WORDS = ("overload", "capacity", "busy", "server_error", "unavailable")
_LIMIT_WORDS = ("rate limit", "rate_limit", "ratelimit", "per min", "quota", "too many")
# Limits the per-minute x-ratelimit-* headers do not describe: a 429 naming one is a limit
# whatever those headers show (a day's quota spent, a cap on concurrent requests).
_UNSEEN_LIMIT_WORDS = ("per day", "rpd", "tpd", "daily", "concurren", "quota")
#: A 429's tokens left must cover this many times the request's estimate to show capacity:
#: the estimate can be short of what the server charges at admission (it may leave out the
#: prompt, and tokenizers differ), and a token limit must not pass for a busy server.
TOKEN_MARGIN = 2


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


def classify_429(
    headers: Mapping[str, str] | None, error: str | None, tokens: int = 0
) -> Verdict429:
    """Whether a 429 says a limit was reached (``"limit"``) or the server is busy
    (``"overload"``).

    The signals, strongest first:

    0. An error that names a limit those headers do not describe (a day's quota, concurrent
       requests) is a limit, whatever the headers show.
    1. The rate-limit headers of the 429 itself. When ``x-ratelimit-remaining-requests`` is at
       least 1 and ``x-ratelimit-remaining-tokens`` covers this request twice over
       (``TOKEN_MARGIN`` × ``tokens``, its estimate), whichever of them came, the key has
       capacity: the refusal is the server's load, not a limit. A remaining figure at 0 (or
       below that) is a limit.
    2. Without those headers, the error's code and message: "overloaded", "capacity", "busy"
       or ``server_error`` without any mention of a rate limit or quota is a busy server.
    3. Otherwise a limit: the safe reading, since treating a real limit as noise would send
       into it at full speed.
    """
    text = (error or "").lower()
    if any(word in text for word in _UNSEEN_LIMIT_WORDS):
        return "limit"
    if headers:
        requests = _number(headers.get("x-ratelimit-remaining-requests"))
        remaining_tokens = _number(headers.get("x-ratelimit-remaining-tokens"))
        if requests is not None or remaining_tokens is not None:
            room = (requests is None or requests >= 1) and (
                remaining_tokens is None or remaining_tokens >= max(TOKEN_MARGIN * tokens, 1)
            )
            return "overload" if room else "limit"
    if any(word in text for word in _OVERLOAD_WORDS) and not any(
        word in text for word in _LIMIT_WORDS
    ):
        return "overload"
    return "limit"


class OverloadRatio:
    """The share of recent answers that were overload 429s, and when it calls for slowing down.

    An exponentially weighted mean of 1 (an overload 429) and 0 (any other answer). When it
    passes ``OVERLOAD_RATIO`` the pool narrows once (multiplicative decrease) and the mean
    starts again from 0, so the next decision rests on the answers that came after it.
    """

    __slots__ = ("_answers", "ratio")

    def __init__(self) -> None:
        self.ratio = 0.0
        self._answers = 0

    def add(self, overloaded: bool) -> bool:
        """Count one answer; true when the pool should narrow now."""
        self.ratio += OVERLOAD_ALPHA * ((1.0 if overloaded else 0.0) - self.ratio)
        self._answers += 1
        # At least a window's worth of answers before a decision: a run whose first answers
        # happen to be 429s has not shown a rate yet.
        if self.ratio > OVERLOAD_RATIO and self._answers * OVERLOAD_ALPHA >= 1.0:
            self.ratio = 0.0
            self._answers = 0
            return True
        return False


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


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
