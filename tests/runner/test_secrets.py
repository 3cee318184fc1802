"""The API key appears nowhere: not in any file a run writes, nor in anything it prints."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, batcher_cmd, sim_process, write_input

CANARY = "canary-7Qx2-not-a-real-key-5d1f"

pytestmark = pytest.mark.slow


def run(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        batcher_cmd(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    return proc.stdout + proc.stderr


def test_canary_key_never_leaks(tmp_path: Path) -> None:
    env = {**os.environ, "OPENAI_API_KEY": CANARY}
    src = write_input(tmp_path / "in.jsonl", 60)
    with src.open("a") as f:
        f.write("not json\n")
    printed: list[str] = []
    with sim_process("--latency-ms", "20") as ok_url:
        base = ["--input", str(src), "--model", "gpt-4o-mini", "--no-progress"]
        printed.append(
            run(["run", *base, "--output", str(tmp_path / "ok.parquet"), "--base-url", ok_url], env)
        )
        # a crash: SIGKILL mid-run, then the resume
        crash = subprocess.Popen(
            batcher_cmd(
                "run",
                *base,
                "--output",
                str(tmp_path / "crash.jsonl"),
                "--base-url",
                ok_url,
                "--concurrency",
                "2",
            ),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(1.5)
        crash.send_signal(signal.SIGKILL)
        printed.append(crash.communicate()[0])
        printed.append(
            run(
                ["run", *base, "--output", str(tmp_path / "crash.jsonl"), "--base-url", ok_url], env
            )
        )
        printed.append(
            run(
                [
                    "report",
                    str(tmp_path / "ok.parquet"),
                    "--json",
                    "--html",
                    str(tmp_path / "report.html"),
                ],
                env,
            )
        )
        printed.append(run(["estimate", *base, "--base-url", ok_url], env))
    with sim_process("--error-rate", "1", "--error-kinds", "401") as refused_url:
        printed.append(
            run(
                [
                    "run",
                    *base,
                    "--output",
                    str(tmp_path / "refused.jsonl"),
                    "--base-url",
                    refused_url,
                ],
                env,
            )
        )
    with sim_process("--error-rate", "0.5", "--error-kinds", "500,reset_body,400") as bad_url:
        printed.append(
            run(
                [
                    "run",
                    *base,
                    "--output",
                    str(tmp_path / "faulty.jsonl"),
                    "--base-url",
                    bad_url,
                    "--max-attempts",
                    "2",
                ],
                env,
            )
        )
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 8  # outputs, journals, rejects, report
    for path in written:
        assert CANARY.encode() not in path.read_bytes(), path
    for text in printed:
        assert CANARY not in text
    assert any("refused the API key" in text for text in printed)  # the 401 run did stop
