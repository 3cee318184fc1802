"""A lane's workers, and the place a worker lends while it waits out a retry's pause.

A lane runs up to ``size`` workers, each taking the next request and keeping it until it is
recorded. A request refused by a busy server (a 429 with ``retry-after``, a 503) waits before
its retry; were its worker to wait with it, a run where 5 % of the answers are such refusals,
each asking for 0.5 s, would spend about as much of its workers' time waiting as sending
(20,000 requests at 20 ms: 1.59× the clean run's time, against 1.23× for the longest chain of
waits one request met). So a worker that starts such a wait lends its place: another worker
starts and takes the next request, and once the wait is over the first worker to find the
lane over its size stops. In flight stays within the endpoint's own limits (its concurrency
limiter and meters, which a waiting request does not hold).

Places are lent only while the lane's endpoints are steady (``endpoints.STEADY_BELOW``: fewer
than a quarter of recent attempts failed), and at most ``LEND_FACTOR`` times the lane's size
at once. A server that fails much of what it gets (one refusing everything, or an overloaded
one) soon finds its refused requests keeping their places: the lane slows down with it, and
the limits' own answer to a wave of refusals (a pause at a rate limit, a narrower pool when
refusals pass ``limits.overload.OVERLOAD_RATIO``) holds as before.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

from batcher.engine.retry import Sleep

#: Places a steady lane may lend at once, in multiples of its size. A run where a tenth of the
#: attempts fail, each waiting about half a second before its retry, has about 1.6 times its
#: size waiting at 20 ms a request (4,000 requests a second, 128 in flight).
LEND_FACTOR = 4

#: Under ``--max-cost``: each waiting request keeps its worst-case reservation, so more of
#: them waiting at once would stop a run with a cap near its need sooner (its budget held,
#: not spent); there a lane lends at most its size.
BUDGET_LEND_FACTOR = 1

#: The pool of the worker the current task is (none outside a worker).
_CURRENT: ContextVar[WorkerPool | None] = ContextVar("batcher_worker_pool", default=None)


class WorkerPool:
    """A lane's workers: ``start`` starts one more (false once the lane reads no more);
    ``steady``: whether the lane's endpoints fail only sporadically (places are lent only
    then)."""

    __slots__ = ("_max_lent", "_start", "_steady", "running", "size", "waiting")

    def __init__(
        self,
        size: int,
        start: Callable[[], bool],
        steady: Callable[[], bool] = lambda: True,
        *,
        lend_factor: int = LEND_FACTOR,
    ) -> None:
        """``lend_factor``: places lent at most, in multiples of ``size``."""
        self.size = size
        self._start = start
        self._steady = steady
        self._max_lent = lend_factor * size
        self.running = 0
        self.waiting = 0  # workers waiting out a retry's pause, their places lent

    def may_lend(self) -> bool:
        """Whether a worker that starts a wait now lends its place."""
        return self.waiting < self._max_lent and self._steady()

    def grow(self) -> None:
        """One more worker, up to ``size`` working (the waiting ones not counted)."""
        if self.running - self.waiting < self.size and self._start():
            self.running += 1

    def join(self) -> None:
        """Called by each worker as it starts: its waits lend its place (``lending``)."""
        _CURRENT.set(self)

    def leave_if_surplus(self) -> bool:
        """Before a worker takes its next request: true (and it has left) when the lane has
        more working than ``size``, a place lent for a wait having come back."""
        if self.running - self.waiting > self.size:
            self.running -= 1
            return True
        return False

    def leave(self) -> None:
        """A worker stops for another reason (the input ended, the run stops)."""
        self.running -= 1


def lending(sleep: Sleep) -> Sleep:
    """``sleep``, with the place of the worker that waits lent to another for the wait."""

    async def wait(seconds: float) -> None:
        pool = _CURRENT.get()
        if pool is None or not pool.may_lend():
            await sleep(seconds)  # not a worker, or the lane may not lend another place
            return
        pool.waiting += 1
        pool.grow()
        try:
            await sleep(seconds)
        finally:
            pool.waiting -= 1

    return wait
