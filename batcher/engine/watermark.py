"""How far the run's input is settled: the first line whose records may still come.

Each lane reads the input's lines in increasing order and dispatches its requests in that
order; a worker settles a request once it is recorded or left unrecorded for a re-run. A
lane's low mark is its first request dispatched and not settled, else the
next line it will read; the run's (``Watermark.low``) is the lowest over its lanes. No record
of a line below it can come any more (but for results held back and released late:
``setup_check``), so the output may write those rows in input order as the run goes
(``output.live_output``). Rejected and skipped lines are never dispatched: they only move the
next line to read.

A request cut off in flight (a stop's grace ran out), or taken by a worker that then stops
(the run stopping, the budget spent), is never settled: the mark stays below it, which only
holds rows back until the end of the run.
"""

from __future__ import annotations

from collections import deque

#: Above every line: a lane that has read its whole input and settled everything.
END = 1 << 62


class LaneMark:
    """One lane's low mark: its requests in dispatch order, until settled."""

    __slots__ = ("_next", "_out", "_settled")

    def __init__(self) -> None:
        self._out: deque[int] = deque()  # dispatched lines, in dispatch (= line) order
        self._settled: set[int] = set()  # settled lines not at the left end yet
        self._next = 1  # the next line to read

    def dispatch(self, line: int) -> None:
        """A request of ``line`` is sent to the workers."""
        self._out.append(line)
        self._next = line + 1

    def passed(self, line: int) -> None:
        """``line`` was read and never dispatched (rejected, or done by an earlier run)."""
        self._next = line + 1

    def read_all(self) -> None:
        """The lane reads no more lines (its input ended, or dispatch stopped)."""
        self._next = END

    def settle(self, line: int) -> None:
        """The request of ``line`` is recorded, or dropped: amortised O(1)."""
        out = self._out
        if out and out[0] == line:
            out.popleft()
            settled = self._settled
            while out and out[0] in settled:
                settled.remove(out.popleft())
        else:
            self._settled.add(line)

    def low(self) -> int:
        """The lane's first line whose record may still come."""
        return self._out[0] if self._out else self._next


class Watermark:
    """The run's low mark over its lanes (see the module)."""

    def __init__(self) -> None:
        self._lanes: list[LaneMark] = []

    def lane(self) -> LaneMark:
        """A new lane's mark, counted from now."""
        mark = LaneMark()
        self._lanes.append(mark)
        return mark

    def low(self) -> int:
        """The first input line whose records may still come: every record of a line below
        it is in (``0`` before any lane started: nothing is known yet)."""
        lanes = self._lanes
        if len(lanes) == 1:
            return lanes[0].low()
        return min((lane.low() for lane in lanes), default=0)
