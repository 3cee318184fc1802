"""The first line whose records may still come (``batcher.engine.watermark``)."""

from __future__ import annotations

import random

from batcher.engine.watermark import END, LaneMark, Watermark


def test_a_lane_is_settled_up_to_its_first_request_in_flight() -> None:
    mark = LaneMark()
    assert mark.low() == 1  # nothing read yet
    for line in (1, 2, 4, 5):
        mark.dispatch(line)
    mark.passed(3)  # rejected: never dispatched, never holds the mark (1 still does)
    mark.passed(6)  # done by an earlier run
    assert mark.low() == 1
    mark.settle(2)
    mark.settle(4)
    assert mark.low() == 1  # settled out of order: line 1 is still in flight
    mark.settle(1)
    assert mark.low() == 5  # 2 and 4 went with it; 3 never came
    mark.settle(5)
    assert mark.low() == 7  # nothing in flight: the next line to read
    mark.dispatch(7)
    mark.read_all()
    assert mark.low() == 7
    mark.settle(7)
    assert mark.low() == END


def test_the_mark_is_the_first_unsettled_line_whatever_the_order_of_settling() -> None:
    rng = random.Random(3)
    mark = LaneMark()
    lines = [line for line in range(1, 2_001) if line % 7]  # every 7th line rejected
    for line in range(1, 2_001):
        if line % 7:
            mark.dispatch(line)
        else:
            mark.passed(line)
    unsettled = set(lines)
    for line in rng.sample(lines, len(lines)):
        mark.settle(line)
        unsettled.discard(line)
        assert mark.low() == min(unsettled, default=2_001)
    assert not mark._settled  # nothing kept once the lane is settled


def test_the_runs_mark_is_its_lowest_lanes() -> None:
    watermark = Watermark()
    assert watermark.low() == 0  # no lane yet: nothing is known
    a, b = watermark.lane(), watermark.lane()
    a.dispatch(1)
    a.dispatch(2)
    b.dispatch(1)
    b.settle(1)
    assert watermark.low() == 1  # lane a still has line 1 in flight
    a.settle(1)
    assert watermark.low() == 2
    b.read_all()  # lane b has read its input, settled all
    a.settle(2)
    assert watermark.low() == 3  # lane a may still read line 3
    a.read_all()
    assert watermark.low() == END
