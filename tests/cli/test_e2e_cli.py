"""End to end: the `batcher` command over a real loopback socket against `batcher sim`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batcher.output.writers import read_results
from batcher.sim.answers import expected_content
from tests.helpers import (
    ROOT,
    batcher_cmd,
    ids_of,
    jsonl,
    requests_of,
    run_batcher,
    sim_process,
    sim_stats,
    write_input,
    write_job,
)

pytestmark = pytest.mark.slow

FAST_RETRY = "[retry]\nmax_attempts = 14\nbackoff_initial_s = 0.01\nbackoff_max_s = 0.05\n"


def test_faulty_server_every_id_exactly_once_answers_match_and_tokens_add_up(
    tmp_path: Path,
) -> None:
    n = 300
    src = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.parquet"
    kinds = "500,502,503,malformed,no_usage"
    with sim_process("--latency-ms", "5", "--error-rate", "0.3", "--error-kinds", kinds) as url:
        job = write_job(
            tmp_path / "job.toml",
            f'[job]\ninput = "in.jsonl"\noutput = "out.parquet"\n'
            f'[endpoint]\nbase_url = "{url}"\n[request]\nmodel = "sim-model"\n'
            f"[limits]\nconcurrency = 16\n{FAST_RETRY}",
        )
        proc = run_batcher("run", str(job), "--no-progress")
        stats = sim_stats(url)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    table = pq.read_table(out)
    rows = table.to_pylist()
    assert sorted(ids_of(rows)) == [f"r{i:05d}" for i in range(n)]  # each id exactly once
    assert {row["status"] for row in rows} == {"ok"}
    sent = requests_of(src, {"model": "sim-model"})
    for row in rows:
        assert row["content"] == expected_content(sent[row["custom_id"]].body)
    # the faults were really met and retried
    assert stats["faults_injected"] > 0
    assert sum(row["attempts"] for row in rows) == stats["requests_received"]
    assert sum(row["prompt_tokens"] or 0 for row in rows) == stats["prompt_tokens_served"]
    assert sum(row["completion_tokens"] or 0 for row in rows) == stats["completion_tokens_served"]
    assert sum(row["total_tokens"] or 0 for row in rows) == stats["total_tokens_served"]
    assert "300 ok, 0 error" in proc.stderr


def test_jsonl_output_rejects_and_exit_code_1(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with sim_process() as url:
        proc = run_batcher(
            "run",
            "--input",
            "sample_data/messy.jsonl",
            "--output",
            str(out),
            "--model",
            "m",
            "--base-url",
            url,
            "--no-progress",
        )
    assert proc.returncode == 1, proc.stderr
    lines = jsonl(out)
    assert sorted(ids_of(lines)) == ["42", "ok-1", "ok-2"]
    for line in lines:
        assert line["id"].startswith("batch_req_")
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"
    rejects = jsonl(tmp_path / "out.jsonl.rejects.jsonl")
    assert [r["line"] for r in rejects] == [3, 4, 5, 6, 7, 8, 11, 12]
    assert all(r["reason"] and "\n" not in r["reason"] for r in rejects)
    assert "8 lines rejected" in proc.stderr


def test_final_errors_become_error_records(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 20)
    out = tmp_path / "out.parquet"
    with sim_process("--error-rate", "1", "--error-kinds", "502") as url:
        proc = run_batcher(
            "run",
            "--input",
            str(src),
            "--output",
            str(out),
            "--model",
            "m",
            "--base-url",
            url,
            "--max-attempts",
            "2",
            "--no-progress",
        )
        stats = sim_stats(url)
    assert proc.returncode == 1, proc.stderr
    rows = list(read_results(out))
    assert len(rows) == 20
    assert {(r["status"], r["status_code"], r["error_code"], r["attempts"]) for r in rows} == {
        ("error", 502, "http_502", 2)
    }
    assert stats["requests_received"] == 40
    assert "http_502 ×20" in proc.stderr


def test_stdin_input(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 10)
    out = tmp_path / "out.jsonl"
    with sim_process() as url:
        proc = run_batcher(
            "run",
            "--input",
            "-",
            "--output",
            str(out),
            "--model",
            "m",
            "--base-url",
            url,
            "--no-progress",
            stdin=src.read_text(encoding="utf-8"),
        )
    assert proc.returncode == 0, proc.stderr
    assert sorted(ids_of(jsonl(out))) == [f"r{i:05d}" for i in range(10)]


def test_bad_configuration_sends_nothing(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 5)
    with sim_process() as url:
        base = ["run", "--input", str(src), "--model", "m", "--base-url", url, "--no-progress"]
        bad_flag = run_batcher(*base, "--output", str(tmp_path / "o.jsonl"), "--concurrency", "0")
        no_folder = run_batcher(*base, "--output", str(tmp_path / "missing" / "o.jsonl"))
        bad_suffix = run_batcher(*base, "--output", str(tmp_path / "o.csv"))
        job = write_job(tmp_path / "job.toml", "[limits]\nconcurency = 3\n")
        bad_job = run_batcher("run", str(job), *base[1:], "--output", str(tmp_path / "o.jsonl"))
        no_input = run_batcher(
            "run",
            "--input",
            str(tmp_path / "nope.jsonl"),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--model",
            "m",
            "--base-url",
            url,
        )
        stats = sim_stats(url)
    assert bad_flag.returncode == 2 and "--concurrency" in bad_flag.stderr
    assert no_folder.returncode == 2 and "job.output" in no_folder.stderr
    assert bad_suffix.returncode == 2 and "output" in bad_suffix.stderr
    assert bad_job.returncode == 2 and "limits.concurency" in bad_job.stderr
    assert no_input.returncode == 2 and "not found" in no_input.stderr
    for proc in (bad_flag, no_folder, bad_suffix, bad_job, no_input):
        assert "Traceback" not in proc.stderr
    assert stats["requests_received"] == 0


def test_missing_openai_key_fails_before_sending(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 1)
    proc = run_batcher(
        "run",
        "--input",
        str(src),
        "--output",
        str(tmp_path / "o.jsonl"),
        "--model",
        "m",
    )
    assert proc.returncode == 2
    assert "$OPENAI_API_KEY is not set" in proc.stderr


def test_demo_job_runs_on_the_in_process_simulator(tmp_path: Path) -> None:
    out = tmp_path / "demo.parquet"
    proc = run_batcher("run", "jobs/demo.toml", "--output", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(out)
    assert table.num_rows == 200
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert "demo finished" in proc.stderr
    assert "200 ok, 0 error" in proc.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_dispatch_flushes_exits_3_and_the_rerun_finishes(
    tmp_path: Path, signum: signal.Signals
) -> None:
    n = 400
    src = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.jsonl"
    with sim_process("--latency-ms", "100") as url:
        proc = subprocess.Popen(
            batcher_cmd(
                "run",
                "--input",
                str(src),
                "--output",
                str(out),
                "--model",
                "m",
                "--base-url",
                url,
                "--concurrency",
                "4",
                "--grace",
                "5",
                "--no-progress",
            ),
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        journal = out.with_name(out.name + ".journal")
        deadline = time.monotonic() + 30
        while not (journal.exists() and journal.read_bytes().count(b"\n") > 1):
            assert time.monotonic() < deadline, "no result was written in time"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
        stats = sim_stats(url)
        lines = jsonl(out)
        rerun = run_batcher(
            "run", "--input", str(src), "--output", str(out), "--model", "m", "--base-url", url,
            "--concurrency", "32", "--no-progress",
        )  # fmt: skip
    assert proc.returncode == 3, stderr
    assert "stopped early" in stderr and "Traceback" not in stderr
    ids = ids_of(lines)
    assert 0 < len(ids) < n
    assert len(set(ids)) == len(ids)
    assert all(json.dumps(line) for line in lines)
    # dispatch stopped at once, and the requests in flight finished within the grace period:
    # everything the simulator received is in the output
    assert stats["requests_received"] == len(ids)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(ids)} skipped (done before)" in rerun.stderr
    final = ids_of(jsonl(out))
    assert sorted(final) == [f"r{i:05d}" for i in range(n)]


def test_sim_port_in_use_is_a_clear_error() -> None:
    with sim_process() as url:
        port = url.removesuffix("/v1").rsplit(":", 1)[1]
        proc = run_batcher("sim", "--port", port, timeout=30)
    assert proc.returncode == 2
    assert "--port: cannot listen" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_loads_no_token_table_and_tunes_its_own_process(tmp_path: Path) -> None:
    # What a `batcher run` process keeps out (for memory and start-up), and what it tunes
    # (batcher.cli.tuning): printed by a hook at its exit; the Parquet it wrote is read back.
    src = write_input(tmp_path / "in.jsonl", 20)
    out = tmp_path / "out.parquet"
    watch = (
        "import atexit, gc, os, runpy, sys\n"
        "atexit.register(lambda: print('LOADED', sorted(m for m in ('numpy', 'pandas', "
        "'tiktoken', 'pyarrow') if m in sys.modules), file=sys.stderr))\n"
        "atexit.register(lambda: print('TUNED', gc.get_threshold(), "
        "os.environ.get('ARROW_DEFAULT_MEMORY_POOL'), file=sys.stderr))\n"
        "sys.argv = ['batcher', *sys.argv[1:]]\n"
        "runpy.run_module('batcher', run_name='__main__')\n"
    )
    with sim_process("--latency-ms", "5") as url:
        args = ["run", "--input", str(src), "--output", str(out), "--base-url", url]
        proc = subprocess.run(
            [sys.executable, "-c", watch, *args, "--model", "gpt-4o-mini", "--no-progress"],
            capture_output=True, text=True, timeout=90, cwd=ROOT, check=False,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stderr.split("LOADED ")[1].split("]")[0]
    assert "'pyarrow'" in loaded and "'tiktoken'" not in loaded  # no limit needs counts
    assert "TUNED (20000, 20, 20) system" in proc.stderr
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 20 and all(r["prompt_tokens"] and r["cost_usd"] for r in rows)


def test_the_batch_demo_job_costs_half_the_online_one(tmp_path: Path) -> None:
    online, batch = tmp_path / "online.parquet", tmp_path / "batch.parquet"
    for job, out in (("jobs/demo.toml", online), ("jobs/batch.toml", batch)):
        proc = run_batcher("run", job, "--output", str(out), "--no-progress")
        assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(batch).to_pylist()
    assert len(rows) == 200 and {row["status"] for row in rows} == {"ok"}
    assert all(row["batch_id"] for row in rows)  # every row names the batch that answered it
    assert len({row["custom_id"] for row in rows}) == 200
    online_cost = sum(row["cost_usd"] for row in pq.read_table(online).to_pylist())
    assert sum(row["cost_usd"] for row in rows) == pytest.approx(online_cost / 2)


def test_detach_with_the_in_process_simulator_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    proc = run_batcher("run", "jobs/demo.toml", "--mode", "batch", "--detach", "--output", str(out))
    assert proc.returncode == 2
    assert "--detach" in proc.stderr and "batcher sim" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_detach_then_collect_in_another_process(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    with sim_process() as url:
        job = batch_job(tmp_path, url, 30, out)
        first = run_batcher("run", str(job), "--detach", "--no-progress", env=BATCH_ENV)
        assert first.returncode == 3, first.stderr
        assert not out.exists()  # collected by the next run
        second = run_batcher("run", str(job), "--no-progress", env=BATCH_ENV)
        assert second.returncode == 0, second.stderr
        assert sim_stats(url)["batches"]["created"] == 3  # one per chunk, never twice
    rows = pq.read_table(out).to_pylist()
    assert sorted(row["custom_id"] for row in rows) == [f"r{i:05d}" for i in range(30)]
    assert {row["status"] for row in rows} == {"ok"} and all(row["batch_id"] for row in rows)


def test_restart_is_refused_while_batches_run_then_cancel_lets_it_go(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    with sim_process() as url:
        job = batch_job(tmp_path, url, 10, out)
        assert (
            run_batcher("run", str(job), "--detach", "--no-progress", env=BATCH_ENV).returncode == 3
        )
        for mode in ("batch", "online"):
            again = run_batcher("run", str(job), "--mode", mode, "--restart", env=BATCH_ENV)
            assert again.returncode == 2, again.stderr
            assert "--restart" in again.stderr and "--cancel" in again.stderr
            assert "Traceback" not in again.stderr
        cancel = run_batcher("run", str(job), "--cancel", "--no-progress", env=BATCH_ENV)
        assert cancel.returncode == 3, cancel.stderr
        restarted = run_batcher("run", str(job), "--restart", "--no-progress", env=BATCH_ENV)
        assert restarted.returncode == 0, restarted.stderr
        assert sim_stats(url)["batches"]["created"] == 2  # the cancelled one, then one anew
    assert sorted(row["custom_id"] for row in pq.read_table(out).to_pylist()) == [
        f"r{i:05d}" for i in range(10)
    ]


BATCH_ENV = {"OPENAI_API_KEY": "sk-test-detach"}


def batch_job(tmp_path: Path, url: str, n: int, out: Path) -> Path:
    """A batch-mode job of ``n`` prompts (10 a batch) against the simulator at ``url``."""
    src = write_input(tmp_path / "in.jsonl", n)
    return write_job(
        tmp_path / "job.toml",
        f'[job]\nmode = "batch"\ninput = "{src}"\noutput = "{out}"\n'
        f'[endpoint]\nbase_url = "{url}"\n[request]\nmodel = "gpt-4o-mini"\n'
        "[batch]\nmax_requests = 10\npoll_s = 0.2\n",
    )
