"""``kill -9`` of a batch run at chosen and at random points, then a rerun: every id exactly
once, and the server created exactly one batch per chunk.

The run is a child process (``python -c``) calling ``run_batch_job`` against the simulator
served by the test on a loopback socket, on the real clock with fast batch timings. For the
chosen points the child wraps one client call so that it kills itself with SIGKILL right
after the call returned and before the run could journal its outcome.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batcher.batch.runner import run_batch_job
from batcher.batch.state import read_states, state_path
from batcher.sim.batches import BatchSimConfig
from tests.batch.batch_job import batch_job, rows, text
from tests.batch_sim import KEY, BatchSim, batch_sim

#: Each test runs child processes on the real clock: the slow tests.
pytestmark = pytest.mark.slow

REAL = BatchSimConfig(validating_s=0.2, in_progress_s=0.6, finalizing_s=0.2)
N = 12  # 6 + 6 requests, at most 4 a batch: 4 chunks
CHUNKS = 4

CHILD = """
import os, signal, sys
from batcher.batch import client
from batcher.batch.runner import run_batch_job
from batcher.job_file import job_from_dict
import json

point = sys.argv[1]
raw = json.loads(sys.argv[2])
method = {"upload": "upload", "create": "create", "poll": "retrieve",
          "download": "download_to"}.get(point)
if method is not None:
    real = getattr(client.BatchClient, method)
    calls = [0]

    async def dying(self, *args, **kwargs):
        got = await real(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] >= int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return got

    setattr(client.BatchClient, method, dying)
report = run_batch_job(
    job_from_dict(raw), handle_signals=point == "sigint", detach=point == "detach"
)
sys.exit(report.exit_code)
"""


def raw_job(sim: BatchSim, folder: Path) -> dict[str, object]:
    job = batch_job(sim, folder, N)
    return {
        "job": {"name": job.name, "mode": "batch", "input": str(job.input),
                "output": str(job.output), "progress": False},
        "endpoint": {"base_url": sim.base_url},
        "request": {"max_tokens": 16},
        "retry": {"max_attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.01},
        "batch": {"max_requests": 4, "poll_s": 0.05},
    }  # fmt: skip


def child(point: str, raw: dict[str, object], nth: int = 1) -> subprocess.Popen[bytes]:
    import json

    env = dict(os.environ, OPENAI_API_KEY=KEY, PYTHONPATH=os.getcwd())
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, point, json.dumps(raw), str(nth)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish_and_check(sim: BatchSim, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun in this process completes the job exactly once."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    job = batch_job(sim, folder, N, poll_s=0.05)
    report = run_batch_job(job, stream=text())
    assert report.exit_code == 0, report.summary
    got = [r["custom_id"] for r in rows(folder / "out.parquet")]
    assert sorted(got) == [f"r{i:03d}" for i in range(N)]  # each id exactly once
    assert sim.stats()["batches"]["created"] == CHUNKS
    assert len(read_states(state_path(folder / "out.parquet"))) == CHUNKS


@pytest.mark.parametrize(
    ("point", "nth"),
    [("upload", 2), ("create", 1), ("create", 3), ("poll", 3), ("download", 1), ("download", 3)],
)
def test_killed_at_a_point_then_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, nth: int
) -> None:
    with batch_sim(REAL) as sim:
        sim.handle.simulator.batches.clock = time.time
        proc = child(point, raw_job(sim, tmp_path), nth)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        finish_and_check(sim, tmp_path, monkeypatch)


def test_killed_at_random_moments_then_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(int(os.environ.get("BATCHER_KILL_SEED", "7")))
    with batch_sim(REAL) as sim:
        sim.handle.simulator.batches.clock = time.time
        raw = raw_job(sim, tmp_path)
        for _ in range(3):
            proc = child("none", raw)
            try:
                proc.communicate(timeout=rng.uniform(0.3, 2.0))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
        finish_and_check(sim, tmp_path, monkeypatch)


def test_ctrl_c_while_polling_leaves_the_batches_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = BatchSimConfig(validating_s=0.2, in_progress_s=60, finalizing_s=0.2)
    with batch_sim(slow) as sim:
        sim.handle.simulator.batches.clock = time.time
        proc = child("sigint", raw_job(sim, tmp_path))
        assert proc.stderr is not None
        created = 0
        while created < CHUNKS:  # every batch created: the run is polling
            line = proc.stderr.readline().decode()
            assert line, "the run ended before creating its batches"
            created += "created" in line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, err.decode()
        assert "interrupted: the batches keep running" in err.decode()
        with sim.http() as http:
            statuses = {b["status"] for b in http.get("/batches").json()["data"]}
        assert statuses <= {"validating", "in_progress"}  # none cancelled
        sim.handle.simulator.batches.clock = lambda: time.time() + 120  # they have all ended
        finish_and_check(sim, tmp_path, monkeypatch)


def test_detach_in_one_process_then_collect_in_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with batch_sim(REAL) as sim:
        sim.handle.simulator.batches.clock = time.time
        proc = child("detach", raw_job(sim, tmp_path))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, err.decode()
        assert "without --detach to collect" in err.decode()
        states = read_states(state_path(tmp_path / "out.parquet"))
        assert len(states) == CHUNKS and all(s.batch_id for s in states.values())
        assert sim.stats()["batches"]["created"] == CHUNKS
        finish_and_check(sim, tmp_path, monkeypatch)  # collects, creates nothing more
