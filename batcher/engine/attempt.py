"""One request sent, with its retries: routed to an endpoint, posted within that endpoint's
limits, its answer steering those limits.

While an endpoint is down (``outage.py``) failed connections are not attempts: the request
goes to another endpoint, or waits for the next probe, instead of using up its retries. A
429 is told apart (a rate limit pauses the endpoint's pool; a busy server is retried alone),
and a TPM meter charged for an attempt is corrected by what the server counted. The first
attempt is made outside tenacity (entering ``AsyncRetrying`` costs ~8 % of a run); a failed
one hands over to the same retry policy.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import anyio

from batcher.config import RetryConfig
from batcher.cost.budget import Budget
from batcher.cost.money import usd
from batcher.engine.control import RunControl
from batcher.engine.endpoints import NEGLIGIBLE_WAIT_S, Endpoint, Router
from batcher.engine.outcomes import UNREACHABLE
from batcher.engine.recording import Recorder
from batcher.engine.retry import RetryableAttempt, Sleep, retry_policy
from batcher.engine.setup_check import waiting_note
from batcher.http.answers import Attempt
from batcher.input.requests import LateCounter
from batcher.limits.overload import classify_429
from batcher.records import Request

#: A pause the rate-limit headers ask for that is long enough to say so.
LONG_PAUSE_S = 30.0
#: With several endpoints and none with room, how often a waiting request looks again.
REROUTE_S = 0.1


class Sent(NamedTuple):
    """What ``Sender.send`` returns: the last attempt, the sends, the endpoint that made the
    last attempt, the dollars charged for unusable 2xx answers retried, and whether the
    request's reservation is still held (to settle). A tuple: one is made per request."""

    last: Attempt
    attempts: int
    where: str | None
    charged: float = 0.0
    reserved: bool = True


def maybe_billed(attempt: Attempt) -> bool:
    """A 2xx that could not be used: the server answered, and may have billed it."""
    status = attempt.status_code
    return not attempt.ok and status is not None and 200 <= status < 300


class Sender:
    """Sends requests to the run's endpoints (``router``: all of them), with retries."""

    def __init__(
        self,
        router: Router,
        retry: RetryConfig,
        recorder: Recorder,
        control: RunControl,
        budget: Budget | None,
        late_counter: LateCounter,
        sleep: Sleep,
    ) -> None:
        self._router = router
        self._retry = retry
        self._recorder = recorder
        self._control = control
        self._progress = control.progress
        self._stopping = control.stopping
        self._budget = budget
        self._late_counter = late_counter
        self._sleep = sleep

    async def send(self, request: Request, router: Router, reserved: float = 0.0) -> Sent:
        """The request's last attempt (after its retries), how many times it was sent, and
        the endpoint that made that attempt; ``router``: the endpoints it may use.

        Under ``--max-cost`` a 2xx that could not be used (broken, empty, an error object, too
        large) may have been billed: before it is retried it is charged at its worst case
        (``reserved``) and the retry reserves again; when the budget cannot take the retry,
        the run stops and the request ends with that attempt.
        """
        last, attempts, where = await self._attempt(request, router)
        charged, live = 0.0, True
        if last.retryable and self._retry.max_attempts > 1:
            try:
                policy = retry_policy(
                    self._retry, sleep=self._sleep, first=last, steady=router.steady
                )
                async for attempt in policy:
                    with attempt:
                        if self._budget is not None and maybe_billed(last):
                            charged += reserved
                            live = self._charge_and_reserve_again(reserved)
                            if not live:
                                break
                        last, sends, where = await self._attempt(request, router)
                        attempts += sends
                        if last.retryable:
                            raise RetryableAttempt(last)
            except RetryableAttempt:
                pass  # retries exhausted: ``last`` is the final failed attempt
        return Sent(last, attempts, where, charged, reserved=live)

    def _charge_and_reserve_again(self, reserved: float) -> bool:
        """Count an unusable 2xx at its worst case and reserve for its retry; false (the run
        stopping) when the budget cannot take the retry."""
        assert self._budget is not None
        self._budget.settle(reserved, reserved)
        if self._budget.try_reserve(reserved):
            return True
        self._control.stop(
            f"--max-cost ${self._budget.cap:g} reached: {usd(self._budget.spent)} spent, "
            "answers that could not be used counted at their worst case (they may have "
            "been billed)"
        )
        return False

    async def _attempt(self, request: Request, router: Router) -> tuple[Attempt, int, str | None]:
        """One attempt, at the endpoint the router picks, within its limits; the answer steers
        those limits. Returns the attempt, how many times the request was sent for it (a
        failed connection to an endpoint that is down is sent again), and the endpoint's name.
        """
        sends = 0
        while True:
            endpoint = await self._route(router)
            if endpoint is None:  # the run is stopping: do not knock on dead endpoints
                return UNREACHABLE, sends, None
            sends += 1
            endpoint.assigned += 1
            try:
                attempt, request, charged = await self._post(endpoint, request)
            finally:
                endpoint.assigned -= 1
            endpoint.record(attempt.ok or not attempt.retryable)
            if self._recorder.check_setup(endpoint, attempt):
                # neither retried nor recorded: the job is set up wrong
                return dataclasses.replace(attempt, retryable=False), sends, endpoint.name
            if attempt.status_code is not None:
                self._endpoint_answered(endpoint)  # any HTTP answer: the endpoint is up
                break
            if attempt.error_code != "connection_error":
                break  # a timeout: a slow server is not a down one; the outage state stays
            again = self._unreachable(endpoint, router, attempt)
            if again is None:
                break  # an ordinary failure: the retry policy handles it
            if not again:
                return attempt, sends, endpoint.name
        self._steer(endpoint, request, attempt, charged)
        return attempt, sends, endpoint.name

    def _unreachable(self, endpoint: Endpoint, router: Router, attempt: Attempt) -> bool | None:
        """A connection to ``endpoint`` failed: whether to send the request again (true: to
        another endpoint, or to this one after its next probe; false: the request ends with
        this attempt), or ``None`` (an ordinary failure, for the retry policy)."""
        outage = endpoint.outage
        wait = outage.failed()
        if wait is None:
            return True if router.another_is_up(endpoint) else None  # failover: not sent
        if outage.exhausted:
            if not router.all_exhausted:
                return True  # that one is given up on; the others take its requests
            if not self._router.all_exhausted:
                # This variant's endpoints are gone, others still work: the variant's
                # requests are left unrecorded for a re-run while the others go on.
                names = ", ".join(e.name for e in router.endpoints)
                self._control.give_up_on(names, outage.patience_s, attempt.error_message)
                return False
            self._control.stop(
                f"the endpoint{'s have' if len(self._router.endpoints) > 1 else ' has'} "
                f"been unreachable for {outage.patience_s:g} s ({attempt.error_message}); "
                "check, then run the same command again"
            )
            return False
        if outage.note_due(wait):  # at its start, then at least once a minute
            label = self._label(endpoint)
            self._progress.set_status(f"WAITING: {label} unreachable")
            self._progress.note(waiting_note(label, endpoint.client.url, attempt, outage))
        if self._stopping.is_set():
            return False  # stopping: no more probes
        endpoint.limits.enter_outage(wait)
        return True

    def _steer(
        self, endpoint: Endpoint, request: Request, attempt: Attempt, charged: int | None
    ) -> None:
        """What an attempt tells the endpoint's limits: announced limits, a 429, the tokens
        the server counted."""
        limits = endpoint.limits
        if attempt.headers and limits.observe(attempt.headers) >= LONG_PAUSE_S:
            self._progress.note(
                f"batcher: {self._label(endpoint)} says nothing remains of its rate limit for "
                f"{limits.paused_s:.0f} s (x-ratelimit-remaining-* 0 until its reset); waiting"
            )
        if attempt.ok and endpoint.remember is not None:
            endpoint.remember(limits)  # what it announced (or that it announced nothing)
            endpoint.remember = None
        if attempt.status_code == 429:
            error = f"{attempt.error_code} {attempt.error_message}"
            verdict = classify_429(attempt.headers, error, request.est_tokens)
            limits.on_rate_limited(attempt.retry_after, verdict)
        elif attempt.status_code is not None:
            limits.answered()
        if charged is None:
            pass  # no TPM meter was charged for this attempt: nothing to correct
        elif attempt.status_code is None or attempt.status_code == 429:
            limits.correct_tokens(charged, 0)  # not admitted: nothing was charged
        elif request.prompt_tokens is None:
            pass  # charged its completion budget alone (sent as the meter appeared): keep it
        elif attempt.usage is not None and attempt.usage.prompt_tokens is not None:
            # The server charges its own prompt count (plus the same completion budget).
            limits.correct_tokens(
                charged, charged - request.prompt_tokens + attempt.usage.prompt_tokens
            )

    async def _route(self, router: Router) -> Endpoint | None:
        """The endpoint for the next attempt. With several, a request waits for one with room
        rather than queue at one: a queue at an endpoint that goes down would be stuck there
        until it comes back, while the others could have taken it."""
        while True:
            endpoint = router.choose()
            if endpoint is None or len(router.endpoints) == 1:
                return endpoint
            wait = endpoint.wait_s()
            room = endpoint.assigned < endpoint.limits.concurrency.total_tokens
            if room and wait <= NEGLIGIBLE_WAIT_S:
                return endpoint
            await anyio.sleep(min(wait, REROUTE_S) if room else REROUTE_S)

    async def _post(
        self, endpoint: Endpoint, request: Request
    ) -> tuple[Attempt, Request, int | None]:
        """POST within the endpoint's concurrency, pause and rate limits.

        Returns the attempt, the request as sent (its prompt counted if it was read uncounted
        and the endpoint has a TPM meter by now: a server announced a token limit) and the
        tokens charged to that meter (``None`` if none was).
        """
        limits = endpoint.limits
        # acquire_nowait first: anyio's acquire() yields to the loop even when a slot is
        # free, an extra trip round the event loop for every request.
        limiter = limits.concurrency
        try:
            limiter.acquire_nowait()
        except anyio.WouldBlock:
            await limiter.acquire()
        try:
            if request.prompt_tokens is None and limits.tpm is not None:
                request = await self._late_counter.counted(request)
            tokens = request.est_tokens
            metered = await limits.acquire(tokens)
            try:
                attempt = await endpoint.client.post(request.body)
            finally:
                limits.release(tokens)
        finally:
            limiter.release()
        return attempt, request, tokens if metered else None

    def _label(self, endpoint: Endpoint) -> str:
        return "the endpoint" if len(self._router.endpoints) == 1 else f"endpoint {endpoint.name}"

    def _endpoint_answered(self, endpoint: Endpoint) -> None:
        lasted = endpoint.outage.answered()
        if lasted is not None:
            endpoint.limits.leave_outage()
            if not any(e.outage.active for e in self._router.endpoints):
                self._progress.set_status("")
            self._progress.note(f"batcher: {self._label(endpoint)} is back after {lasted:.0f} s")
