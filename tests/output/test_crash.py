"""Crash safety with real processes: SIGKILL at random points, then resume; a full disk."""

from __future__ import annotations

import random
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from batcher.output.writers import read_results
from tests.helpers import ROOT, batcher_cmd, run_batcher, sim_process, sim_stats, write_input

pytestmark = pytest.mark.slow

N = 300
CONCURRENCY = 8


def run_args(src: Path, out: Path, url: str) -> list[str]:
    return [
        "run", "--input", str(src), "--output", str(out), "--model", "m", "--base-url", url,
        "--concurrency", str(CONCURRENCY), "--no-progress",
    ]  # fmt: skip


def comparable(path: Path) -> dict[str, tuple[object, ...]]:
    rows = list(read_results(path))
    ids = [r["custom_id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id appears more than once"
    keys = ("status", "content", "finish_reason", "prompt_tokens", "completion_tokens", "line")
    return {r["custom_id"]: tuple(r[k] for k in keys) for r in rows}


def test_sigkill_at_random_points_then_resume_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    src = write_input(tmp_path / "in.jsonl", N)
    out = tmp_path / "out.parquet"
    rng = random.Random(20261129)
    kills = 0
    recorded: list[int] = []  # requests in the journal after each kill
    with sim_process("--latency-ms", "40", "--latency-jitter-ms", "30") as url:
        for _ in range(4):
            proc = subprocess.Popen(
                batcher_cmd(*run_args(src, out, url)),
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            # wait until this run has recorded something, then kill it at a random moment
            journal = out.with_name(out.name + ".journal")
            before = recorded[-1] if recorded else 0
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                if journal.exists() and journal.read_bytes().count(b"\n") - 1 > before:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.6))
            if proc.poll() is None:
                proc.kill()  # SIGKILL: no handler runs, no flush, no output file
                kills += 1
            proc.wait(timeout=30)
            recorded.append(journal.read_bytes().count(b"\n") - 1 if journal.exists() else 0)
        final = run_batcher(*run_args(src, out, url))
        received = sim_stats(url)["requests_received"]
        reference = run_batcher(*run_args(src, tmp_path / "ref.parquet", url))
    assert kills >= 2, "the runs ended before they could be killed: make them longer"
    mid_run = [n for n in recorded if 0 < n < N]
    assert len(mid_run) >= 2, f"kills did not land mid-run: {recorded}"
    assert recorded == sorted(recorded)  # each resumed run added to the last
    assert final.returncode == 0, final.stderr
    assert reference.returncode == 0, reference.stderr
    resumed, uninterrupted = comparable(out), comparable(tmp_path / "ref.parquet")
    assert sorted(resumed) == [f"r{i:05d}" for i in range(N)]
    assert resumed == uninterrupted
    assert received <= N + CONCURRENCY * kills
    assert "skipped (done before)" in final.stderr


def test_disk_full_mid_run_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.jsonl"

    def small_files() -> None:  # a file may not grow past 30 kB: writes then fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    with sim_process() as url:
        full = subprocess.run(
            batcher_cmd(*run_args(src, out, url)),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=small_files,
            check=False,
        )
        after = run_batcher(*run_args(src, out, url))
    assert full.returncode == 3, full.stderr
    assert "cannot write" in full.stderr and "File too large" in full.stderr
    assert "Traceback" not in full.stderr
    assert after.returncode == 0, after.stderr
    ids = [r["custom_id"] for r in read_results(out)]
    assert sorted(ids) == [f"r{i:05d}" for i in range(200)]
