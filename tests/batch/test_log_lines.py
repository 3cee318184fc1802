"""Batch mode's log without a terminal: a timestamped, counted line at least every minute while
batches run, even when no poll sees anything change (a long validation), whatever ``poll_s``."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from batcher.batch.runner import run_batch_job
from batcher.sim.batches import BatchSimConfig
from tests.batch.batch_job import batch_job, clock_sleep, text
from tests.batch_sim import KEY, batch_sim

#: A validation long enough that a log printing only changes goes quiet for ten minutes.
SLOW = BatchSimConfig(validating_s=600, in_progress_s=120, finalizing_s=5)
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) batcher: ")


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def stamped(log: str) -> list[tuple[float, str]]:
    """The log's lines before the summary, each with its timestamp in seconds."""
    lines = []
    for line in log.splitlines():
        if " finished in " in line or " stopped early " in line:
            break
        found = STAMP.match(line)
        assert found, f"a line without a UTC timestamp: {line!r}"
        when = datetime.strptime(found.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        lines.append((when.timestamp(), line))
    return lines


@pytest.mark.parametrize("poll_s", [10.0, 300.0])
def test_a_counted_line_comes_at_least_every_minute_through_a_long_validation(
    tmp_path: Path, poll_s: float
) -> None:
    with batch_sim(SLOW) as sim:
        job = batch_job(sim, tmp_path, 6, models=("sim-a",), max_requests=3, poll_s=poll_s)
        started = sim.clock()
        out = text()
        report = run_batch_job(job, sleep=clock_sleep(sim), clock=sim.clock, stream=out)
        ended = sim.clock()
    assert report.exit_code == 0, out.getvalue()
    lines = stamped(out.getvalue())
    counted = [(when, line) for when, line in lines if " req/s, " in line]
    assert ended - started >= 725  # validation, progress, finalizing and the last poll's wait
    stamps = [started] + [when for when, _ in counted]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) <= 60, gaps
    validating = [line for _, line in counted if "validating 0/3" in line]
    assert len(validating) >= 10  # ten minutes of validation, told at least every minute
    first = validating[0]
    assert "0/6 done, 0.0 req/s, 0 tokens, 0 errors" in first and "cost $0;" in first
    # both batches named with their state and counts
    assert first.count(" validating 0/3") == 2 and "; 2 batches: batch_" in first
    assert first.endswith("; 0 of 6 ended")
    last_when, last = counted[-1]
    assert last_when == ended  # told at the poll that collected the last batch
    assert "6/6 done" in last and last.endswith("; every batch collected")
    cost = float(re.search(r"cost \$([0-9.]+)[,;]", last).group(1))  # type: ignore[union-attr]
    assert cost == pytest.approx(sum(report.stats.cost_by_model.values()), abs=1e-4) and cost > 0
