"""Outage patience: when the endpoint is down, wait and probe instead of burning retries.

After ``OUTAGE_AFTER`` connection failures in a row (refused, reset: not timeouts, which a slow
but living server also gives), the endpoint counts as down: the pool narrows to a single
request, which probes again after 1 s, then 2, 4 … up to ``MAX_PROBE_INTERVAL_S``. Failed
attempts during an outage do not use up a request's retries. The first answer of any kind ends
the outage and the pool opens again. Past ``patience_s`` of outage the run stops (exit 3,
resumable) rather than wait all night.

An endpoint that has not answered yet is down from its first failed connection: a local
server still loading its model refuses connections for a while, and every request would fail
alike. (A host name that does not exist is no outage: see ``setup_check.py``.) While it waits
the run says so at least once a minute (``note_due``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

OUTAGE_AFTER = 5
FIRST_PROBE_INTERVAL_S = 1.0
MAX_PROBE_INTERVAL_S = 30.0
#: The longest time between two notes that the endpoint is still down.
NOTE_EVERY_S = 60.0


class Outage:
    """Tracks consecutive connection failures and the state of an outage."""

    def __init__(self, *, patience_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.patience_s = patience_s
        self._clock = clock
        self.consecutive_failures = 0
        self.since: float | None = None
        self.probe_interval_s = FIRST_PROBE_INTERVAL_S
        self._last_step = 0.0
        self.outages = 0
        self.ever_answered = False
        self._noted: float | None = None  # when the current outage was last told of

    @property
    def active(self) -> bool:
        return self.since is not None

    @property
    def down_for_s(self) -> float:
        """Seconds since the current outage began (0 when there is none)."""
        return 0.0 if self.since is None else self._clock() - self.since

    @property
    def exhausted(self) -> bool:
        """The outage has lasted longer than the run's patience."""
        return self.since is not None and self._clock() - self.since > self.patience_s

    def failed(self) -> float | None:
        """A connection failure; returns the seconds to wait before the next probe (if down)."""
        self.consecutive_failures += 1
        if self.since is None:
            if self.ever_answered and self.consecutive_failures < OUTAGE_AFTER:
                return None
            self.since = self._last_step = self._clock()
            self.outages += 1
            self.probe_interval_s = FIRST_PROBE_INTERVAL_S
            self._noted = None
            return self.probe_interval_s
        now = self._clock()
        # requests that were in flight when it went down fail together: one step for them all
        if now - self._last_step >= self.probe_interval_s / 2:
            self.probe_interval_s = min(MAX_PROBE_INTERVAL_S, self.probe_interval_s * 2)
            self._last_step = now
        return self.probe_interval_s

    def note_due(self, next_probe_in_s: float) -> bool:
        """Whether to tell the user now that the endpoint is still down: at the start of an
        outage, then whenever waiting for the next failed probe would leave more than
        ``NOTE_EVERY_S`` since the last note (probes come at most ``MAX_PROBE_INTERVAL_S``
        apart, so the notes come at least once a minute, and no more often than needed)."""
        if self.since is None:
            return False
        now = self._clock()
        if self._noted is None or now + next_probe_in_s - self._noted > NOTE_EVERY_S:
            self._noted = now
            return True
        return False

    def answered(self) -> float | None:
        """Any answer from the server; returns how long the outage lasted, if one just ended."""
        self.ever_answered = True
        self.consecutive_failures = 0
        if self.since is None:
            return None
        lasted = self._clock() - self.since
        self.since = None
        return lasted
