"""Work a run needs at its end, done in a thread once the event loop goes idle at the start.

The runner hands the engine such work (importing the output writer, pyarrow: ~50 ms of CPU).
Done on the event loop, it would hold up the first answers. Started in a thread as the first
request went out, it competed with the loop while the loop was still opening the pool: with
256 in flight the first wave took ~85 ms to go out instead of ~50, its answers came back ~40 ms
later, and so did every later wave's.

So ``WarmUp.run``, a task of the engine's, waits for the first request and then for the loop
to go idle (the pool is out, the first answers are awaited): a short sleep wakes on time only
when the loop has nothing else to do. After ``ON_TIME`` wake-ups on time in a row, or
``LATEST_S`` at the latest, the work starts in a thread. If the first answer comes first (an
endpoint faster than the pool takes to open), the output starts the work in a thread itself,
and its records wait for it (``LiveOutput``); the work is done once either way. A thread
cannot tell an idle loop from a busy one by itself: the loop lets go of the GIL at
every system call (its 1 ms sleeps woke on time while the loop was busiest).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio

#: The task's short sleep.
PROBE_S = 0.001
#: How late a wake-up may be and still count as on time.
LATE_S = 0.0005
#: Wake-ups on time in a row that make the loop idle.
ON_TIME = 3
#: Seconds after the first request by which the work starts, idle loop or not.
LATEST_S = 0.5


class WarmUp:
    """Runs ``work`` once, in a daemon thread, when the loop goes idle after ``start()`` (or
    ``latest_s`` after it, by default ``LATEST_S``, read when the wait begins)."""

    def __init__(self, work: Callable[[], object] | None, *, latest_s: float | None = None) -> None:
        self._work = work
        self._latest_s = latest_s
        self._first: anyio.Event | None = None  # made in run(): it needs the event loop
        self._scope = anyio.CancelScope()
        #: Whether the first request has gone out (``start()`` was called).
        self.started = False

    def start(self) -> None:
        """The first request is going out (later calls do nothing). On the event loop."""
        if not self.started:
            self.started = True
            if self._first is not None:
                self._first.set()

    def cancel(self) -> None:
        """The run has ended: work not started yet is not needed."""
        self._scope.cancel()

    async def run(self) -> None:
        """The engine's task: wait for ``start()``, then for the loop to go idle; start the
        work. Returns at once without work, and when cancelled."""
        if self._work is None:
            return
        with self._scope:
            if not self.started:
                self._first = anyio.Event()
                await self._first.wait()
            await _until_idle(LATEST_S if self._latest_s is None else self._latest_s)
            threading.Thread(target=self._work, daemon=True).start()


async def _until_idle(latest_s: float) -> None:
    """Return once ``ON_TIME`` short sleeps in a row woke on time, or after ``latest_s``."""
    deadline = anyio.current_time() + latest_s
    on_time = 0
    while on_time < ON_TIME and (before := anyio.current_time()) < deadline:
        await anyio.sleep(PROBE_S)
        on_time = on_time + 1 if anyio.current_time() - before < PROBE_S + LATE_S else 0
