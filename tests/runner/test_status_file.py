"""The status file a run keeps beside its output, and how ``batcher status`` reads a run's
state from it: running, finished, stopped, or gone without a word."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from batcher.errors import ConfigError
from batcher.output.journal import Journal, journal_path
from batcher.runner.job_status import format_status, read_job_status
from batcher.runner.stats import RunStats
from batcher.runner.status_file import RunStatus, read_status_file, status_path


def endpoint(name: str, **limits: Any) -> Any:
    figures = {"in_flight_requests": 0, "rate_limited": 0, "overloaded": 0, "paused_s": 0.0,
               "outage": False} | limits  # fmt: skip
    return SimpleNamespace(name=name, limits=SimpleNamespace(**figures))


def wait_for(output: Path, key: str, value: object) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = read_status_file(output)
        if info is not None and info.get(key) == value:
            return info
        time.sleep(0.01)
    raise AssertionError(f"the status file never showed {key} = {value!r}")


def test_a_run_writes_running_then_how_it_finished(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    src = tmp_path / "in.jsonl"
    src.write_text("".join(f'{{"custom_id": "{i}", "prompt": "x"}}\n' for i in range(7)))
    stats = RunStats()
    busy = endpoint("main", in_flight_requests=3, rate_limited=5, overloaded=1, paused_s=2.25)
    down = endpoint("spare", outage=True)
    status = RunStatus(out, job="demo", mode="online", input_path=src, passes=2, every_s=0.01)
    with Journal(journal_path(out)), status.running():
        first = read_status_file(out)
        assert first is not None and first["state"] == "running"
        assert first["pid"] == os.getpid() and first["job"] == "demo"
        status.follow(stats, [busy, down])
        stats.rejected = 1
        info = wait_for(out, "in_flight", 3)
        assert info["total"] == 14 and info["rejected"] == 1  # 7 lines, two passes
        assert (info["rate_limited"], info["overloaded"], info["paused_s"]) == (5, 1, 2.2)
        assert info["outage"] == ["spare"]
        stats.ok, stats.error = 5, 1
    final = read_status_file(out)
    assert final is not None
    assert (final["state"], final["exit_code"], final["in_flight"]) == ("finished", 1, 0)
    assert final["ended_at"] >= final["started_at"]
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [(ConfigError("job.output", "bad"), 2, "job.output: bad"), (KeyboardInterrupt(), 3, None)],
)
def test_a_run_that_raised_is_stopped_with_its_exit_code(
    tmp_path: Path, error: BaseException, code: int, reason: str | None
) -> None:
    out = tmp_path / "o.jsonl"
    status = RunStatus(out, job="demo", mode="online")
    with pytest.raises(type(error)), Journal(journal_path(out)), status.running():
        raise error
    info = read_status_file(out)
    assert info is not None and (info["state"], info["exit_code"]) == ("stopped", code)
    assert reason is None or reason in info["stop_reason"]


def test_a_stopped_run_without_records_leaves_no_status_file(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    status = RunStatus(out, job="j", mode="online")
    with pytest.raises(ConfigError), Journal(journal_path(out)) as journal, status.running():
        journal.forget_if_empty()  # what a run stopped by its configuration does
        raise ConfigError("base_url", "no such host")
    assert not status_path(out).exists() and not list(tmp_path.iterdir())


def test_a_run_whose_process_died_is_not_running(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    journal_path(out).write_text('{"batcher_journal":1}\n')
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    info = {"batcher_status": 1, "state": "running", "pid": int(gone.stdout), "job": "j",
            "host": os.uname().nodename, "started_at": time.time() - 60, "total": 10,
            "in_flight": 4}  # fmt: skip
    status_path(out).write_text(json.dumps(info))
    status = read_job_status(out)
    assert status.state == "not running" and not status.running
    assert status.as_dict()["in_flight"] == 0 and status.eta_s is None
    assert "not running (stopped without a word: resume with" in format_status(status)
    # the same file while this process holds the journal: running
    info["pid"] = os.getpid()
    status_path(out).write_text(json.dumps(info))
    with Journal(journal_path(out)):
        assert read_job_status(out).state == "running"
