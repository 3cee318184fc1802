"""The end-of-run summary, the log-line progress mode and the exit codes."""

from __future__ import annotations

import io
import itertools
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from batcher.engine.outage import Outage
from batcher.limits.endpoint import Limits
from batcher.records import Result, Usage
from batcher.runner import progress
from batcher.runner.progress import Progress, format_summary
from batcher.runner.stats import RunStats
from tests.helpers import free_port, write_input


def result(status: str, code: str | None = None, attempts: int = 1) -> Result:
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    return Result(
        custom_id="x",
        line=1,
        status="ok" if status == "ok" else "error",
        model="m",
        attempts=attempts,
        latency_s=0.1,
        started_at=0.0,
        finished_at=0.1,
        error_code=code,
        usage=usage if status == "ok" else None,
    )


def test_summary_counts_statuses_tokens_and_error_classes() -> None:
    stats = RunStats()
    for r in [result("ok", attempts=3), result("ok"), result("error", "http_400")]:
        stats.add(r)
    stats.rejected = 2
    stats.wall_s = 2.0
    text = format_summary(stats, name="t", output="o.parquet", rejects="o.parquet.rejects.jsonl")
    assert "t finished in 2.0 s" in text
    assert "3 done: 2 ok, 1 error; 2 lines rejected" in text
    assert "6 prompt + 4 completion = 10" in text
    assert "1.5 requests/s; 5 attempts (2 retries)" in text
    assert "http_400 ×1" in text
    assert "rejects   o.parquet.rejects.jsonl" in text


@pytest.mark.parametrize(
    ("reason", "tail"),
    [
        ("--max-cost $1 reached: $0.9990 spent", "again with a higher --max-cost to continue"),
        ("interrupted by SIGINT", "run the same command again to continue"),
        ("the endpoint refused the API key (401)", "run the same command again to continue"),
        ("detached: 2 batch(es) submitted; ...", "again without --detach to continue"),
        ("cancelled 2 batch(es); run again to ...", "again without --cancel to continue"),
        (
            "cannot read the input after line 1480: Compressed file ended before the "
            "end-of-stream marker was reached",
            "again once the input can be read past that line to continue",
        ),
        (
            "--max-cost: needs max_tokens (or max_completion_tokens) on every request, ...",
            "again once every request has max_tokens to continue",
        ),
        (
            "--max-cost: no price known for model 'x', so its cost cannot be capped; ...",
            "again once every model has a price to continue",
        ),
    ],
)
def test_a_stopped_run_says_how_to_go_on(reason: str, tail: str) -> None:
    stats = RunStats()
    stats.stopped_early, stats.stop_reason = True, reason
    text = format_summary(stats, name="t", output="o.parquet", rejects=None)
    assert text.splitlines()[-1].endswith(tail)


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_a_split_errors_summary_says_where_the_failed_requests_went(
    tmp_path: Path, mode: str
) -> None:
    """The output holds only the successes: the summary names the file the errors went to."""
    from batcher.api import run

    src = write_input(tmp_path / "in.jsonl", 6)
    out = tmp_path / "o.parquet"
    job: dict[str, Any] = {
        "job": {"input": str(src), "output": str(out), "split_errors": True, "mode": mode},
        "endpoint": {"base_url": "sim"},
        "request": {"model": "m"},
        "batch": {"poll_s": 0.05},
        "sim": {"error_rate": 0.5, "error_kinds": ["400"], "seed": 3,
                "batch": {"validating_s": 0.05, "in_progress_s": 0.05, "finalizing_s": 0.05,
                          "error_rate": 0.5, "error_kinds": ["400"]}},
    }  # fmt: skip
    failed = run(job, load=False).report
    assert 0 < failed.stats.error < 6, failed.summary
    assert f"  failed    {out}.errors.jsonl" in failed.summary.splitlines()
    job["sim"] = {}
    job["job"]["output"] = str(tmp_path / "clean.parquet")
    clean = run(job, load=False).report
    assert clean.stats.error == 0 and "failed" not in clean.summary


def test_the_summary_lays_out_a_sweeps_variants_in_rows_that_fit_80_columns() -> None:
    stats = RunStats()
    names = ["temperature-0.0", "temperature-0.7", "gpt-4o-mini-with-a-longer-system-prompt-v2"]
    for i, name in enumerate(names):
        stats.variant_ok[name] = 1_000_000 + i
        stats.variant_error[name] = 12_345
    text = format_summary(stats, name="sweep", output="o.parquet", rejects=None)
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  variants  "))
    rows = lines[at + 1 : at + 4]
    assert rows[0] == "    gpt-4o-mini-with-a-longer-system-prompt…  1,000,002 ok, 12,345 error"
    assert rows[1] == "    temperature-0.0                           1,000,000 ok, 12,345 error"
    assert rows[2].startswith("    temperature-0.7 ") and "1,000,001 ok" in rows[2]
    assert all(len(line) <= 80 for line in lines[at : at + 4]), lines


@pytest.mark.parametrize(
    ("ok", "error", "rejected", "stopped", "code"),
    [(5, 0, 0, False, 0), (5, 1, 0, False, 1), (5, 0, 1, False, 1), (5, 1, 1, True, 3)],
)
def test_exit_codes(ok: int, error: int, rejected: int, stopped: bool, code: int) -> None:
    stats = RunStats(ok=ok, error=error, rejected=rejected, stopped_early=stopped)
    assert stats.exit_code == code


def test_log_lines_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    stats = RunStats(ok=4, total_tokens=20)
    out = io.StringIO()  # not a terminal: log lines, no bar
    bar = Progress(stats, total=10, stream=out)
    bar.advance()
    bar.close()
    assert "batcher: 4/10 done" in out.getvalue()
    assert "20 tokens, 0 errors, 0 rejected" in out.getvalue()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen_of(written: str) -> list[str]:
    """The lines a terminal shows after ``written``: ``\\r`` back to the line's start,
    ``\\n`` down one line, ESC[A up one, other text written over what is there."""
    lines = [""]
    row = col = 0
    for part in re.split(r"(\r|\n|\x1b\[A)", written):
        if part == "\r":
            col = 0
        elif part == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif part == "\x1b[A":
            row = max(0, row - 1)
        elif part:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + part + line[col + len(part) :]
            col += len(part)
    return [line.rstrip() for line in lines if line.strip()]


def test_bar_shows_a_waiting_status_until_cleared() -> None:
    screen = Terminal()
    bar = Progress(RunStats(), total=3, stream=screen)
    bar.set_status("WAITING: endpoint unreachable")
    assert "WAITING: endpoint unreachable" in screen.getvalue()
    bar.set_status("")
    bar.advance()
    bar.close()
    shown = screen_of(screen.getvalue())
    assert shown[-1].endswith("retry=0")
    assert not any("WAITING" in line for line in shown)


def test_the_bar_fits_80_columns_with_a_line_per_variant() -> None:
    stats = RunStats(
        attempts=1300, total_tokens=12_345_678, cost_by_model={"gpt-4o-mini": 123.4567}
    )
    screen = Terminal()
    names = ["baseline", "a-much-longer-variant-name"]
    bar = Progress(stats, total=2_000_000, stream=screen, variants=names, width=80)
    bar.set_status("WAITING: default unreachable")
    for i in range(1000):
        stats.ok += 1
        stats.variant_ok[names[i % 3 == 0]] += 1
        bar.advance()
    bar.close()
    shown = screen_of(screen.getvalue())
    assert len(shown) == 4, shown  # the run, each variant, the status line
    assert all(len(line) <= 80 for line in shown), [len(line) for line in shown]
    run, first, second, status = shown
    assert run.startswith("all ") and "1000/2000000" in run
    assert first.startswith("baseline ") and "666/1000000" in first
    assert second.startswith("a-much-long") and "334/1000000" in second
    for line in (run, first, second):
        assert len(line.split("|")[1]) >= 10  # the bar itself keeps room to move
    assert "tok=12.3M $123.4567 err=0 rej=0 retry=300" in status
    assert "WAITING: default unreachable" in status


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_without_a_terminal_a_line_comes_at_least_every_60_s_through_an_outage() -> None:
    clock = FakeClock()
    stats = RunStats(ok=40, error=2, attempts=50, total_tokens=900, cost_by_model={"m": 0.25})
    out = io.StringIO()
    started = 1_796_000_000.0  # 2026-11-29T...Z: the log's timestamps come from this clock
    log = Progress(
        stats, total=100, enabled=False, stream=out, clock=clock,
        wall=lambda: started + clock.now,
    )  # fmt: skip
    limits = Limits(concurrency=8, clock=clock)
    outage = Outage(patience_s=1800, clock=clock)
    log.watch_endpoints([SimpleNamespace(name="default", limits=limits, outage=outage)])  # type: ignore[list-item]
    outage.failed()  # never answered: down from the first failure
    limits.in_flight_requests = 1  # the probe
    for _ in range(150):  # two and a half minutes without an answer
        clock.now += 1.0
        log.tick()
    lines = out.getvalue().splitlines()
    stamps = [datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%SZ") for line in lines]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]
    assert len(lines) == 2 and gaps == [60.0]  # at 60 s and 120 s of silence
    assert (
        stamps[0] - datetime.fromtimestamp(started + 1000, UTC).replace(tzinfo=None)
    ).total_seconds() == 60
    first = lines[0]
    for part in (
        "batcher: 42/100 done", "0.7 req/s", "900 tokens", "2 errors", "0 rejected",
        "8 retries", "cost $0.2500", "1 in flight", "OUTAGE: default unreachable for 1m00s",
    ):  # fmt: skip
        assert part in first, (part, first)
    assert "0.0 req/s" in lines[1] and "unreachable for 2m00s" in lines[1]


def test_a_429_pause_is_shown_in_the_log_line() -> None:
    clock = FakeClock()
    out = io.StringIO()
    log = Progress(RunStats(), total=None, enabled=False, stream=out, clock=clock)
    limits = Limits(concurrency=8, clock=clock)
    outage = Outage(patience_s=1800, clock=clock)
    log.watch_endpoints([SimpleNamespace(name="east", limits=limits, outage=outage)])  # type: ignore[list-item]
    limits.on_rate_limited(120.0)
    clock.now += 60.0
    log.tick()
    assert "PAUSED: east for 60 s more (429)" in out.getvalue()
    assert "batcher: 0 done" in out.getvalue()


@pytest.mark.slow
def test_a_log_without_a_terminal_keeps_coming_through_a_real_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody listens on the endpoint's port: nothing finishes for the run's 1.5 s of outage
    patience, and lines come anyway (every 0.3 s here: ``SILENT_MAX_S`` is 60 s)."""
    from batcher.job_file import job_from_dict
    from batcher.runner.run import run_job

    monkeypatch.setattr(progress, "SILENT_MAX_S", 0.3)
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.05)
    src = write_input(tmp_path / "in.jsonl", 6)
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / "o.jsonl"), "progress": False},
            "endpoint": {"base_url": f"http://127.0.0.1:{free_port()}/v1"},  # nobody there
            "request": {"model": "m"},
            "limits": {"concurrency": 2},
            "retry": {"max_attempts": 20, "outage_patience_s": 1.5},
        }
    )
    printed = io.StringIO()
    report = run_job(job, stream=printed)
    assert report.exit_code == 3
    beats = [line for line in printed.getvalue().splitlines() if " batcher: 0/6 done, " in line]
    assert len(beats) >= 2, printed.getvalue()
    for line in beats:
        datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%SZ")  # a UTC timestamp first
        assert "0 errors, 0 rejected, 0 retries" in line and " in flight" in line
    assert any("OUTAGE: default unreachable for " in line for line in beats)


def test_the_bars_take_the_width_of_a_real_terminal() -> None:
    """A pseudo-terminal 80 columns wide: the width is read through batcher's stderr wrapper
    (``QuietStream``), and the bar takes the room the text leaves."""
    import fcntl
    import struct
    import termios

    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 80, 0, 0))
    written: list[bytes] = []
    with open(follower, "w", encoding="utf-8", closefd=True) as tty:
        bar = Progress(RunStats(), total=1000, stream=tty)
        for _ in range(1000):
            bar.advance()
        bar.close()
        tty.flush()
        while chunk := _read_ready(leader):
            written.append(chunk)
    os.close(leader)
    shown = screen_of(b"".join(written).decode().replace("\r\n", "\n"))
    assert len(shown) == 2 and all(len(line) <= 80 for line in shown), shown
    assert len(shown[0].split("|")[1]) >= 30  # not tqdm's 10 of an unknown width


def _read_ready(fd: int) -> bytes:
    import select

    ready, _, _ = select.select([fd], [], [], 0.2)
    return os.read(fd, 1 << 16) if ready else b""
