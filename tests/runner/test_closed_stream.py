"""A reader that goes away from stderr (``| head -1``, a dead ``tee``) does not stop a run."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from batcher.runner.progress import Progress
from batcher.runner.quiet_stream import QuietStream
from batcher.runner.stats import RunStats
from tests.helpers import ROOT, batcher_cmd, jsonl, write_input


class DeadPipe(io.StringIO):
    """A stream whose reader is gone after ``alive`` writes; counts the writes tried after."""

    def __init__(self, alive: int, *, tty: bool = False) -> None:
        super().__init__()
        self.alive = alive
        self.tried_after = 0
        self.tty = tty

    def write(self, text: str) -> int:
        if self.alive <= 0:
            self.tried_after += 1
            raise BrokenPipeError(32, "Broken pipe")
        self.alive -= 1
        return super().write(text)

    def isatty(self) -> bool:
        return self.tty


def test_notes_and_log_lines_stop_quietly_after_the_first_failed_write() -> None:
    dead = DeadPipe(alive=2)
    progress = Progress(RunStats(), total=10, enabled=False, stream=dead)
    progress.note("first")  # written (the text, then its newline)
    progress.note("second")  # fails: the stream goes quiet
    for _ in range(10):
        progress.note("more")
        progress.advance()
    progress.close()
    assert dead.getvalue() == "first\n"
    assert dead.tried_after == 1  # one failed write, then none tried


def test_the_bar_survives_a_terminal_that_closes() -> None:
    dead = DeadPipe(alive=3, tty=True)
    progress = Progress(RunStats(), total=1000, enabled=True, stream=dead)
    for _ in range(1000):
        progress.advance()
        progress.note("a note")
    progress.set_status("WAITING")
    progress.close()
    assert dead.tried_after == 1


def test_quiet_stream_passes_writes_through_while_the_reader_is_there() -> None:
    target = io.StringIO()
    stream = QuietStream(target)
    stream.write("a\n")
    stream.flush()
    assert target.getvalue() == "a\n" and not stream.broken


@pytest.mark.slow
def test_a_run_whose_stderr_reader_has_gone_finishes_with_its_output(tmp_path: Path) -> None:
    """A real process, its stderr a pipe closed by the reader before the first message: the
    run's warnings and summary fail to be written; the run ends normally, every answer in the
    output, exit 0."""
    src = write_input(tmp_path / "in.jsonl", 600)
    out = tmp_path / "o.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    proc = subprocess.Popen(
        # model "m" has no price: a warning is written to stderr before the output is
        batcher_cmd("run", "--input", str(src), "--output", str(out), "--base-url", "sim",
                    "--model", "m", "--no-progress"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    proc.stderr.close()  # the reader goes away (as `| head -0` would)
    assert proc.wait(timeout=120) == 0
    rows = jsonl(out)
    assert len(rows) == 600 and {r["batcher"]["status"] for r in rows} == {"ok"}


@pytest.mark.slow
def test_estimate_piped_into_a_reader_that_stops_ends_quietly(tmp_path: Path) -> None:
    """``batcher estimate ... | head -0``: stdout's reader is gone before the estimate is
    printed; no traceback, exit 0."""
    src = write_input(tmp_path / "in.jsonl", 20)
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    proc = subprocess.Popen(
        batcher_cmd("estimate", "--input", str(src), "--model", "gpt-4o-mini", "--json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    errors = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 0, errors
    assert "Traceback" not in errors and "BrokenPipe" not in errors
