"""Outage patience: an endpoint that goes away mid-run is waited for, not failed on."""

from __future__ import annotations

import itertools
import subprocess
import time
from pathlib import Path

import pytest

from batcher.engine.outage import MAX_PROBE_INTERVAL_S, NOTE_EVERY_S, OUTAGE_AFTER, Outage
from batcher.output.writers import read_results
from tests.helpers import ROOT, batcher_cmd, free_port, sim_stats, write_input


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_outage_starts_after_consecutive_failures_and_backs_off() -> None:
    clock = Clock()
    outage = Outage(patience_s=60, clock=clock)
    outage.answered()  # it answered before: failures must repeat before it counts as down
    assert [outage.failed() for _ in range(OUTAGE_AFTER - 1)] == [None] * (OUTAGE_AFTER - 1)
    assert outage.failed() == 1.0 and outage.active
    assert outage.failed() == 1.0  # failing together with the first: no extra step
    waits: list[float] = []
    for _ in range(8):
        clock.now += outage.probe_interval_s
        wait = outage.failed()
        assert wait is not None
        waits.append(wait)
    assert waits[:5] == [2.0, 4.0, 8.0, 16.0, 30.0] and max(waits) == MAX_PROBE_INTERVAL_S
    assert outage.exhausted  # more than 60 s have passed
    assert outage.answered() == pytest.approx(clock.now - 100.0)
    assert not outage.active and outage.consecutive_failures == 0


def test_an_answer_resets_the_count() -> None:
    outage = Outage(patience_s=60, clock=Clock())
    outage.answered()
    for _ in range(OUTAGE_AFTER - 1):
        outage.failed()
    assert outage.answered() is None
    assert outage.failed() is None


def test_an_endpoint_that_never_answered_is_down_from_its_first_failure() -> None:
    outage = Outage(patience_s=60, clock=Clock())
    assert outage.failed() == 1.0 and outage.active  # no retries used up waiting for a server


def test_while_down_a_note_comes_at_least_once_a_minute_and_not_at_every_probe() -> None:
    clock = Clock()
    outage = Outage(patience_s=3600, clock=clock)
    noted = []
    wait = outage.failed()
    for _ in range(40):  # the probes back off to one every MAX_PROBE_INTERVAL_S
        assert wait is not None
        if outage.note_due(wait):
            noted.append(clock.now)
        clock.now += wait
        wait = outage.failed()
    gaps = [b - a for a, b in itertools.pairwise(noted)]
    assert noted[0] == 100.0  # at once
    assert gaps and max(gaps) <= NOTE_EVERY_S
    assert len(noted) < 40 / 2  # not at every probe
    assert clock.now - noted[-1] <= NOTE_EVERY_S
    outage.answered()
    assert not outage.note_due(1.0)  # not down: nothing to say


def start_sim(port: int, *args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        batcher_cmd("sim", "--port", str(port), *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            sim_stats(f"http://127.0.0.1:{port}/v1")
            return proc
        except Exception:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)


@pytest.mark.slow
def test_an_outage_mid_run_loses_nothing_and_fails_nothing(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 300)
    out = tmp_path / "out.jsonl"
    port = free_port()
    sim = start_sim(port, "--latency-ms", "20")
    run = subprocess.Popen(
        batcher_cmd(
            "run",
            "--input",
            str(src),
            "--output",
            str(out),
            "--model",
            "m",
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            "--concurrency",
            "8",
            "--max-attempts",
            "3",
            "--no-progress",
        ),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = out.with_name(out.name + ".journal")
    try:
        deadline = time.monotonic() + 30
        while not (journal.exists() and journal.read_bytes().count(b"\n") > 30):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        sim.kill()  # the endpoint goes away...
        sim.wait()
        time.sleep(4)  # ...for 4 s: with 3 attempts and fast backoff, every request would fail
        sim = start_sim(port, "--latency-ms", "20")
        _, stderr = run.communicate(timeout=120)
    finally:
        sim.kill()
        sim.wait()
    assert run.returncode == 0, stderr
    assert "the endpoint is unreachable" in stderr and "the endpoint is back after" in stderr
    rows = list(read_results(out))
    assert sorted(r["custom_id"] for r in rows) == [f"r{i:05d}" for i in range(300)]
    assert {r["status"] for r in rows} == {"ok"}


@pytest.mark.slow
def test_patience_runs_out_the_run_stops_and_nothing_is_recorded_as_failed(
    tmp_path: Path,
) -> None:
    import io

    from batcher.job_file import job_from_dict
    from batcher.runner.run import run_job

    src = write_input(tmp_path / "in.jsonl", 6)
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / "o.jsonl"), "progress": False},
            "endpoint": {"base_url": f"http://127.0.0.1:{free_port()}/v1"},  # nobody there
            "request": {"model": "m"},
            "limits": {"concurrency": 2},
            "retry": {
                "max_attempts": 20,
                "backoff_initial_s": 0.01,
                "backoff_max_s": 0.02,
                "outage_patience_s": 1.5,
            },
        }
    )
    printed = io.StringIO()
    report = run_job(job, stream=printed)
    assert report.exit_code == 3
    assert "unreachable for 1.5 s" in report.summary
    assert list(read_results(report.output)) == []  # all still to do on the next run
