"""The end-of-run summary, the log-line progress mode and the exit codes."""

from __future__ import annotations

import io

import pytest

from batcher.records import Result, Usage
from batcher.runner import progress
from batcher.runner.progress import Progress, format_summary
from batcher.runner.stats import RunStats


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


def test_bar_shows_a_waiting_status_until_cleared() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    bar = Progress(RunStats(), total=3, stream=screen)
    bar.set_status("WAITING: endpoint unreachable")
    assert "WAITING: endpoint unreachable" in screen.getvalue()
    bar.set_status("")
    bar.advance()
    bar.close()
    assert screen.getvalue().rstrip().endswith("retry=0]")
