"""The retry policy as one tenacity object.

Retried: 408, 409, 429, 5xx, connection errors, timeouts and malformed 2xx bodies. Not retried:
every other 4xx and a 429 whose code is ``insufficient_quota`` (waiting will not clear it).
The wait is the server's ``retry-after-ms``/``retry-after`` when it sent one, else exponential
backoff with full jitter between ``backoff_initial_s`` and ``backoff_max_s``. While the
endpoints fail only sporadically (``steady``: ``endpoints.STEADY_BELOW``) the backoff stays at
its first step, whatever the request's count of failures: its worker is lent while it waits
(``pool``), so a longer wait would not lighten the server's load, only finish that request
later (and a run whose last requests met a few faults in a row, much later).
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from batcher.config import RetryConfig
from batcher.http.answers import Attempt
from batcher.limits.endpoint import MAX_SERVER_WAIT_S

Sleep = Callable[[float], Awaitable[None]]


class RetryableAttempt(Exception):
    """Raised inside a tenacity attempt to ask for another one; carries the failed ``Attempt``."""

    def __init__(self, attempt: Attempt) -> None:
        super().__init__(attempt.error_code)
        self.attempt = attempt


class wait_server_or_backoff(wait_base):
    """Wait what the server asked for (capped at ``cap_s``), else the fallback backoff.

    ``offset`` attempts were made before tenacity's first: the backoff continues from there.
    ``steady`` (called at each wait): true while failures are sporadic, when the backoff
    stays at its first step.
    """

    def __init__(
        self,
        fallback: wait_base,
        *,
        cap_s: float,
        offset: int = 0,
        steady: Callable[[], bool] | None = None,
    ) -> None:
        self.fallback = fallback
        self.cap_s = cap_s
        self.offset = offset
        self.steady = steady

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, RetryableAttempt) and exc.attempt.retry_after is not None:
            return min(exc.attempt.retry_after, self.cap_s)
        if self.steady is not None and self.steady():
            retry_state = copy.copy(retry_state)
            retry_state.attempt_number = 1  # the first step of the backoff
        elif self.offset:
            retry_state = copy.copy(retry_state)
            retry_state.attempt_number += self.offset
        return float(self.fallback(retry_state))


def retry_policy(
    config: RetryConfig,
    *,
    sleep: Sleep = anyio.sleep,
    first: Attempt | None = None,
    steady: Callable[[], bool] | None = None,
) -> AsyncRetrying:
    """A fresh ``AsyncRetrying`` for one request (``sleep`` injectable for tests; ``steady``:
    whether the endpoints fail only sporadically, see ``wait_server_or_backoff``).

    ``first`` is a failed first attempt made without tenacity (the engine does so: most
    requests need one attempt, and entering tenacity costs more CPU than the rest of the
    request's bookkeeping). The policy then starts with the wait that attempt calls for and
    allows the attempts that remain, so the whole is the same policy.
    """
    backoff = wait_random_exponential(multiplier=config.backoff_initial_s, max=config.backoff_max_s)
    cap_s = max(config.backoff_max_s, MAX_SERVER_WAIT_S)
    if first is None:
        return AsyncRetrying(
            stop=stop_after_attempt(config.max_attempts),
            wait=wait_server_or_backoff(backoff, cap_s=cap_s, steady=steady),
            retry=retry_if_exception_type(RetryableAttempt),
            sleep=sleep,
            reraise=True,
        )

    async def wait_after_first(state: RetryCallState) -> None:
        if state.attempt_number == 1:
            first_state = RetryCallState(state.retry_object, None, (), {})
            first_state.set_exception((RetryableAttempt, RetryableAttempt(first), None))
            await sleep(wait_server_or_backoff(backoff, cap_s=cap_s, steady=steady)(first_state))

    return AsyncRetrying(
        stop=stop_after_attempt(config.max_attempts - 1),
        wait=wait_server_or_backoff(backoff, cap_s=cap_s, offset=1, steady=steady),
        retry=retry_if_exception_type(RetryableAttempt),
        before=wait_after_first,
        sleep=sleep,
        reraise=True,
    )
