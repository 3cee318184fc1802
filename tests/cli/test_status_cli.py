"""`batcher status` from another process: a running job, a finished one, a killed one, and a
detached batch job, each against `batcher sim` over loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batcher.output.journal import journal_path
from batcher.runner.status_file import status_path
from tests.cli.test_e2e_cli import BATCH_ENV, batch_job
from tests.helpers import ROOT, batcher_cmd, run_batcher, sim_process, write_input

pytestmark = pytest.mark.slow

#: The keys ``batcher status --json`` prints (the README lists them).
KEYS = {
    "output", "job", "mode", "state", "running", "pid", "started_at", "updated_at", "ended_at",
    "exit_code", "stop_reason", "resume", "total", "done", "ok", "error", "rejected",
    "in_flight", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "unpriced",
    "rate_per_s", "rate_window_s", "eta_s", "rate_limited", "overloaded", "paused_s", "outage",
    "error_codes", "last_errors", "batches",
}  # fmt: skip


def status_json(output: Path) -> dict[str, Any]:
    proc = run_batcher("status", str(output), "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def start_run(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    return subprocess.Popen(
        batcher_cmd("run", *args, "--no-progress"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip


def watcher(output: Path, *args: str) -> subprocess.Popen[str]:
    """``batcher status OUTPUT --watch`` in a process of its own."""
    return subprocess.Popen(
        batcher_cmd("status", str(output), "--watch", *args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def wait_for_some_done(output: Path, proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Poll ``batcher status`` until it shows the running job with some requests done."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before status saw it running"
        if journal_path(output).exists() and status_path(output).exists():
            status = status_json(output)
            # the status file is rewritten every 2 s: total and in flight show up in time
            known = status["total"] is not None and status["in_flight"] > 0
            if status["running"] and status["done"] > 0 and known:
                return status
        time.sleep(0.2)
    raise AssertionError("status never showed requests done")


def summary_figures(stderr: str) -> tuple[int, int, int, int, str]:
    """done, ok, error, total tokens and cost text from the end-of-run summary."""
    m = re.search(r"requests\s+(\d+) done: (\d+) ok, (\d+) error", stderr)
    t = re.search(r"tokens\s+.* = ([\d,]+)", stderr)
    c = re.search(r"cost\s+(\$[\d.]+)", stderr)
    assert m and t and c, stderr
    done, ok, error = (int(g) for g in m.groups())
    return done, ok, error, int(t.group(1).replace(",", "")), c.group(1)


def test_status_of_a_running_job_then_of_the_finished_one(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 40)
    out = tmp_path / "out.parquet"
    with sim_process("--latency-ms", "250", "--error-rate", "0.2", "--error-kinds", "400") as url:
        proc = start_run(
            "--input", str(src), "--output", str(out), "--base-url", url,
            "--model", "gpt-4o-mini", "-c", "2",
        )  # fmt: skip
        running = wait_for_some_done(out, proc)
        text = run_batcher("status", str(out))
        watch = watcher(out, "--json")  # ends by itself when the job does
        quit_early = watcher(out)
        assert quit_early.stdout is not None and quit_early.stdout.readline()
        quit_early.send_signal(signal.SIGINT)  # Ctrl+C: quietly, exit 0
        _, said = quit_early.communicate(timeout=30)
        assert quit_early.returncode == 0 and said == ""
        _, stderr = proc.communicate(timeout=90)
        watched, _ = watch.communicate(timeout=30)
    assert proc.returncode in (0, 1), stderr
    assert set(running) == KEYS
    assert running["state"] == "running" and running["pid"] == proc.pid
    assert running["mode"] == "online" and running["total"] == 40
    assert 0 < running["done"] < 40 and running["done"] == running["ok"] + running["error"]
    assert 0 < running["in_flight"] <= 2
    assert running["rate_per_s"] > 0 and running["eta_s"] is not None
    assert text.returncode == 0 and "running (pid" in text.stdout and "/40 (" in text.stdout

    done, ok, error, tokens, cost = summary_figures(stderr)
    final = status_json(out)
    assert (final["state"], final["running"], final["exit_code"]) == (
        "finished", False, proc.returncode,
    )  # fmt: skip
    assert (final["done"], final["ok"], final["error"], final["total"]) == (done, ok, error, 40)
    assert final["total_tokens"] == tokens and f"${final['cost_usd']:.4f}" == cost
    assert running["done"] <= done and running["total_tokens"] <= tokens
    rows = pq.read_table(out).to_pylist()
    assert final["ok"] == sum(r["status"] == "ok" for r in rows)
    assert final["total_tokens"] == sum(r["total_tokens"] or 0 for r in rows)
    assert final["cost_usd"] == pytest.approx(sum(r["cost_usd"] or 0 for r in rows))
    assert final["error_codes"] == ({"invalid_value": error} if error else {})
    assert len(final["last_errors"]) == min(error, 5)
    assert all(e["message"] for e in final["last_errors"])
    refreshes = [json.loads(line) for line in watched.splitlines()]
    last = refreshes[-1]  # read as it went: the same figures (the cost summed in another order)
    assert watch.returncode == 0 and last["cost_usd"] == pytest.approx(final["cost_usd"])
    assert {k: v for k, v in last.items() if k != "cost_usd"} == {
        k: v for k, v in final.items() if k != "cost_usd"
    }
    assert refreshes[0]["running"] and [r["running"] for r in refreshes].count(False) == 1
    shown = run_batcher("status", str(out)).stdout
    assert f"{done}/40 (100%) done: {ok} ok, {error} error" in shown and cost in shown


def test_a_killed_run_is_shown_as_not_running_then_resumed(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 40)
    out = tmp_path / "out.jsonl"
    with sim_process("--latency-ms", "250") as url:
        args = ("--input", str(src), "--output", str(out), "--base-url", url, "--model", "m")
        proc = start_run(*args, "-c", "2")
        wait_for_some_done(out, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        dead = status_json(out)
        text = run_batcher("status", str(out)).stdout
        assert dead["state"] == "not running" and not dead["running"]
        assert 0 < dead["done"] < 40 and dead["in_flight"] == 0 and dead["eta_s"] is None
        assert "not running (stopped without a word: resume with" in text
        assert journal_path(out).name in dead["resume"]
        again = run_batcher("run", *args, "--no-progress")
        assert again.returncode == 0, again.stderr
    final = status_json(out)
    assert (final["state"], final["exit_code"], final["done"], final["ok"]) == (
        "finished", 0, 40, 40,
    )  # fmt: skip


def test_a_detached_batch_job_shows_each_batch(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    with sim_process() as url:
        job = batch_job(tmp_path, url, 30, out)
        first = run_batcher("run", str(job), "--detach", "--no-progress", env=BATCH_ENV)
        assert first.returncode == 3, first.stderr
        detached = status_json(out)
        text = run_batcher("status", str(out)).stdout
        second = run_batcher("run", str(job), "--no-progress", env=BATCH_ENV)
        assert second.returncode == 0, second.stderr
    assert (detached["mode"], detached["state"], detached["exit_code"]) == ("batch", "stopped", 3)
    assert "detached" in detached["stop_reason"] and detached["done"] == 0
    assert detached["total"] == 30
    batches = detached["batches"]
    assert len(batches) == 3 and all(b["batch_id"] and b["requests"] == 10 for b in batches)
    assert {b["status"] for b in batches} <= {"validating", "in_progress", "uploaded"}
    assert "batches   3 (as the run last saw them" in text
    assert all(b["batch_id"] in text for b in batches) and "\n  rate " not in text
    assert BATCH_ENV["OPENAI_API_KEY"] not in status_path(out).read_text()
    final = status_json(out)
    assert (final["state"], final["exit_code"], final["done"], final["ok"]) == (
        "finished", 0, 30, 30,
    )  # fmt: skip
    assert {b["status"] for b in final["batches"]} == {"collected"}
    assert {b["batch_id"] for b in final["batches"]} == {b["batch_id"] for b in batches}


def test_status_of_nothing_is_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "none.parquet"
    proc = run_batcher("status", str(missing))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
