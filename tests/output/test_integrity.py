"""Integrity under careless use and odd data: one bad line never stops a run, an answer too
deep to keep is an error and not a crash, two runs never share an output, a stop never turns
requests into errors."""

from __future__ import annotations

import fcntl
import io
import json
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher.errors import ConfigError
from batcher.input.reader import parse_line
from batcher.job_file import job_from_dict
from batcher.jsonfast import MAX_DEPTH
from batcher.output import live_output
from batcher.output.journal import Journal, encode, journal_path
from batcher.output.live_output import LiveOutput
from batcher.output.writers import open_writer, read_results
from batcher.records import Reject, Request, Result
from batcher.runner.run import run_job
from batcher.sim import sim_server
from tests.helpers import (
    ROOT,
    batcher_cmd,
    free_port,
    ids_of,
    jsonl,
    run_batcher,
    sim_process,
    sim_stats,
    write_input,
)


def nested_text(depth: int) -> str:
    """JSON text of a value ``depth`` levels deep (a JSON schema, say), built as text: the
    standard library's encoder cannot write the deepest ones."""
    opens = ['{"type":"array","items":' if i % 2 == 0 else "[" for i in range(depth - 1)]
    closes = ["}" if i % 2 == 0 else "]" for i in reversed(range(depth - 1))]
    return "".join(opens) + '{"type":"string"}' + "".join(closes)


def nested(depth: int) -> Any:
    return json.loads(nested_text(depth))


def deep_line(custom_id: str, depth: int) -> str:
    """An input line ``depth`` levels deep: its metadata nests ``depth - 1`` levels."""
    return f'{{"custom_id":"{custom_id}","prompt":"hi","metadata":{nested_text(depth - 1)}}}'


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


def test_deep_line_helper_nests_as_told() -> None:
    assert depth_of(json.loads(deep_line("x", 7))) == 7
    assert depth_of(json.loads(deep_line("x", MAX_DEPTH))) == MAX_DEPTH


def test_a_line_too_deep_is_rejected_with_its_line_and_the_run_goes_on(tmp_path: Path) -> None:
    """980 levels (a big JSON schema) stopped every run; now that line is rejected, with its
    number and why, and the lines at the limit are sent, journaled and written."""
    src = tmp_path / "in.jsonl"
    schema = nested(MAX_DEPTH - 3)  # in response_format: sent to the server as it is
    at_limit = {
        "custom_id": "schema",
        "prompt": "hi",
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    assert depth_of(at_limit) == MAX_DEPTH
    lines = [
        deep_line("deep-980", 980),
        deep_line("over", MAX_DEPTH + 1),
        deep_line("at-limit", MAX_DEPTH),
        json.dumps(at_limit),
        json.dumps({"custom_id": "plain", "prompt": "hi"}),
    ]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.parquet"
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(out), "progress": False},
            "endpoint": {"base_url": "sim"},
            "request": {"model": "m"},
        }
    )
    report = run_job(job, stream=io.StringIO(), sim=sim_server)
    assert report.exit_code == 1  # lines were rejected; every request was answered
    rejects = jsonl(tmp_path / "out.parquet.rejects.jsonl")
    assert [(r["line"], r["custom_id"], r["reason"]) for r in rejects] == [
        (1, "deep-980", f"nested deeper than {MAX_DEPTH} levels"),
        (2, "over", f"nested deeper than {MAX_DEPTH} levels"),
    ]
    rows = {r["custom_id"]: r for r in read_results(out)}
    assert sorted(rows) == ["at-limit", "plain", "schema"]
    assert all(r["status"] == "ok" for r in rows.values())
    assert depth_of(json.loads(rows["at-limit"]["metadata"])) == MAX_DEPTH - 1  # kept whole

    # and a second run resumes the journal (read back, written again from it) alike
    again = run_job(job, stream=io.StringIO(), sim=sim_server)
    assert again.stats.skipped == 3 and again.stats.submitted == 0
    assert {r["custom_id"] for r in read_results(out)} == set(rows)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=1, max_value=2 * MAX_DEPTH))
def test_every_line_the_reader_accepts_can_be_journaled_and_written(depth: int) -> None:
    """Accepted exactly up to the limit; whatever is accepted goes through every later stage."""
    item = parse_line(deep_line("x", depth).encode(), 1, {"model": "m"})
    if depth > MAX_DEPTH:
        assert isinstance(item, Reject) and item.reason == f"nested deeper than {MAX_DEPTH} levels"
        return
    assert isinstance(item, Request)
    result = Result(
        custom_id=item.custom_id, line=1, status="ok", model="m", attempts=1, latency_s=0.0,
        started_at=0.0, finished_at=0.0, metadata=item.metadata,
        body={"choices": [{"message": {"content": "x"}}], "extra": item.metadata},
    )  # fmt: skip
    assert json.loads(encode(result, item.body_hash))["metadata"] == item.metadata
    with tempfile.TemporaryDirectory() as folder:
        for name in ("o.parquet", "o.jsonl"):
            with open_writer(Path(folder) / name) as writer:
                writer.write(result)
            (row,) = read_results(Path(folder) / name)
            kept = row["metadata"]
            assert (json.loads(kept) if isinstance(kept, str) else kept) == item.metadata


def test_an_answer_too_deep_to_keep_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """A server's answer ~1,000 levels deep is parsed, but could not be journaled: it is an
    invalid answer (retried, then recorded as an error), and the run finishes."""
    deep = "[" * 1000 + "]" * 1000
    answer = '{"choices":[{"message":{"role":"assistant","content":"x"}}],"extra":' + deep + "}"

    def handler(request: httpx.Request) -> httpx.Response:
        good = b'"good"' in request.content
        content = b'{"choices":[{"message":{"content":"fine"}}]}' if good else answer.encode()
        return httpx.Response(200, content=content, headers={"content-type": "application/json"})

    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"custom_id": "deep", "prompt": "x"})
        + "\n"
        + json.dumps({"custom_id": "fine", "prompt": "good"})
        + "\n",
        encoding="utf-8",
    )
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / "o.jsonl"), "progress": False},
            "endpoint": {"base_url": "http://mock.test/v1"},
            "request": {"model": "m"},
            "retry": {"max_attempts": 1},
        }
    )
    report = run_job(job, transport=httpx.MockTransport(handler), stream=io.StringIO())
    assert report.exit_code == 1
    rows = {r["custom_id"]: r for r in read_results(report.output)}
    assert rows["fine"]["status"] == "ok"
    assert rows["deep"]["status"] == "error"
    assert rows["deep"]["error_code"] == "invalid_response"


def run_args(src: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [
        "run", "--input", str(src), "--output", str(out), "--model", "m", "--base-url", url,
        "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_restart_is_refused_while_another_run_holds_the_output(tmp_path: Path) -> None:
    """``--restart`` beside a running run would delete its journal: both would send
    everything (paid twice) and leave the output unreadable. It is refused (exit 2, nothing
    sent, nothing deleted), naming the output and the other run's pid; that run ends whole."""
    n = 40
    src = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.parquet"
    journal = out.with_name(out.name + ".journal")
    with sim_process("--latency-ms", "200") as url:  # 4 s: time for the second to start
        first = subprocess.Popen(
            batcher_cmd(*run_args(src, out, url, "--concurrency", "2")),
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not (journal.exists() and journal.read_bytes().count(b"\n") > 2):
                assert first.poll() is None and time.monotonic() < deadline, "no record came"
                time.sleep(0.02)
            second = run_batcher(*run_args(src, out, url, "--restart"))
            _, first_err = first.communicate(timeout=60)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        received = sim_stats(url)["requests_received"]
    assert second.returncode == 2, second.stderr
    assert f"(pid {first.pid}) holds {out}" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, first_err
    assert received == n  # nothing was sent twice
    rows = list(read_results(out))
    assert sorted(r["custom_id"] for r in rows) == [f"r{i:05d}" for i in range(n)]
    assert journal.read_bytes().count(b"\n") == n + 1  # the header and every record
    assert not out.with_name(out.name + ".partial").exists()


def test_a_run_holds_its_journal_lock_until_its_output_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run (a plain one or ``--restart``) must not start between this run's last
    record and its output's rename: both would write the same ``OUTPUT.partial``."""
    src = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.parquet"
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(out), "progress": False},
            "endpoint": {"base_url": "sim"},
            "request": {"model": "m"},
        }
    )
    locked: list[bool] = []

    def journal_locked() -> bool:
        with journal_path(out).open("rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def checking(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            locked.append(journal_locked())
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(LiveOutput, "close", checking(LiveOutput.close))
    monkeypatch.setattr(live_output, "write_output", checking(live_output.write_output))
    assert run_job(job, stream=io.StringIO(), sim=sim_server).exit_code == 0  # as it goes
    src.write_text(src.read_text(encoding="utf-8") + '{"prompt": "one more"}\n')
    assert run_job(job, stream=io.StringIO(), sim=sim_server).exit_code == 0  # from the journal
    assert locked == [True, True]
    assert not journal_locked()  # and released at the end
    with Journal(journal_path(out)):  # a run in progress: both kinds of re-run are refused
        for restart in (False, True):
            with pytest.raises(ConfigError, match=f"another batcher run .*holds {out}"):
                run_job(job, restart=restart, stream=io.StringIO(), sim=sim_server)
    assert len(list(read_results(out))) == 4  # nothing was deleted


@pytest.mark.slow
def test_ctrl_c_during_an_outage_records_no_error_and_a_rerun_sends_everything(
    tmp_path: Path,
) -> None:
    """SIGINT while the endpoint refuses connections: the requests in flight are not recorded
    as connection errors (which a plain re-run would keep, exit 1) but left for the re-run."""
    n = 6
    src = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.jsonl"
    down = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: every connection is refused
    # Few attempts: once stopping, a request's failed connections use them up within the
    # grace period (before the stop, the outage holds it back: it never fails).
    args = run_args(src, out, down, "--concurrency", "4", "--max-attempts", "3", "--grace", "10")
    proc = subprocess.Popen(
        batcher_cmd(*args),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        seen = ""
        # the outage has begun (nothing ever answered: "nothing listens ... yet"), requests
        # are in flight
        while "nothing listens" not in seen and "unreachable" not in seen:
            line = proc.stderr.readline()
            assert line, f"the run ended before the outage: {seen}"
            seen += line
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 3, seen + rest
    assert "Traceback" not in rest
    assert jsonl(out) == []  # nothing recorded: no answer came
    with sim_process() as url:
        rerun = run_batcher(*run_args(src, out, url))
        received = sim_stats(url)["requests_received"]
    assert rerun.returncode == 0, rerun.stderr
    assert received == n
    rows = jsonl(out)
    assert sorted(ids_of(rows)) == [f"r{i:05d}" for i in range(n)]
    assert all(row["error"] is None for row in rows)
