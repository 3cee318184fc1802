"""Notices (``--notify``, ``[notify]``): delivered to a loopback receiver with the run's counts;
an unreachable URL changes neither the exit code nor the run time; its token appears nowhere."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batcher.config import NotifyConfig
from batcher.cost.budget import Budget
from batcher.errors import ConfigError
from batcher.job_file import job_from_dict, with_overrides
from batcher.output.journal import journal_path
from batcher.runner import notify
from batcher.runner.notify import Notice, Notices, resume_command
from batcher.runner.stats import RunStats
from batcher.sim import sim_server
from tests.helpers import ROOT, batcher_cmd, free_port, run_batcher, write_input, write_job


class Receiver:
    """A webhook on 127.0.0.1 that keeps every JSON notice posted to it (Apprise's ``json://``
    sends ``{"title", "message", "type", ...}``), with its path and Authorization header."""

    def __init__(self) -> None:
        self.notices: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    receiver.notices.append(
                        {"path": self.path, "auth": self.headers.get("authorization")}
                        | json.loads(body)
                    )
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def url(self, path: str = "hook", userinfo: str = "") -> str:
        return f"json://{userinfo}{'@' if userinfo else ''}127.0.0.1:{self.port}/{path}"

    def titles(self) -> list[str]:
        with self._lock:
            return [n["title"] for n in self.notices]

    def of(self, word: str) -> list[dict[str, Any]]:
        """The notices whose title holds ``word`` (finished, stopped, stalled, spent)."""
        with self._lock:
            return [n for n in self.notices if word in n["title"]]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def fields(notice: dict[str, Any]) -> dict[str, str]:
    """A notice's ``key  value`` lines as a dict."""
    found = {}
    for line in notice["message"].splitlines():
        key, _, value = line.partition(" ")
        found[key] = value.strip()
    return found


def sim_job(tmp_path: Path, n: int, **tables: Any) -> dict[str, Any]:
    src = write_input(tmp_path / "in.jsonl", n)
    job: dict[str, Any] = {
        "job": {"input": str(src), "output": str(tmp_path / "o.parquet"), "progress": False},
        "endpoint": {"base_url": "sim"},
        "request": {"model": "m", "max_tokens": 4},
        "retry": {"max_attempts": 1},
    }
    return job | tables


# -- the job's model -------------------------------------------------------------------------


def test_notify_table_and_flag_build_the_job() -> None:
    job = job_from_dict({"notify": {"urls": ["json://127.0.0.1:9/a"], "stall_s": 60}})
    assert job.notify == NotifyConfig(urls=("json://127.0.0.1:9/a",), stall_s=60)
    flagged = with_overrides(job, notify=["form://127.0.0.1:9/b", "json://127.0.0.1:9/c"])
    assert flagged.notify.urls == ("form://127.0.0.1:9/b", "json://127.0.0.1:9/c")
    assert flagged.notify.stall_s == 60
    assert job_from_dict({}).notify == NotifyConfig(urls=(), stall_s=900.0)


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"urls": ["json://127.0.0.1:9/a", "nonsense://SECRET-TOKEN-1/x"]}, "notify.urls[1]"),
        ({"urls": ["not a url SECRET-TOKEN-1"]}, "notify.urls[0]"),
        ({"urls": "json://SECRET-TOKEN-1@127.0.0.1/"}, "notify.urls"),
        ({"urls": [3]}, "notify.urls[0]"),
        ({"stall_s": 0}, "notify.stall_s"),
        ({"stall_s": float("inf")}, "notify.stall_s"),
        ({"stall": 10}, "notify.stall"),
    ],
)
def test_a_bad_notify_setting_names_its_field_and_never_its_url(
    table: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        job_from_dict({"notify": table})
    assert caught.value.field == field and caught.value.exit_code == 2
    assert "SECRET-TOKEN-1" not in str(caught.value)


def test_a_bad_notify_flag_is_named_as_the_flag() -> None:
    with pytest.raises(ConfigError) as caught:
        with_overrides(job_from_dict({}), notify=["json://127.0.0.1:9/a", "bogus://SECRET-2"])
    assert caught.value.field == "--notify[1]" and "SECRET-2" not in str(caught.value)


def test_the_resume_command_leaves_out_notify_urls_and_base_url_credentials() -> None:
    argv = ["run", "job.toml", "--notify", "slack://T0/B0/SECRET-3", "--notify=json://u:SECRET-4@h/",
            "--base-url", "https://u:SECRET-5@gw/v1", "--max-cost", "2"]  # fmt: skip
    command = resume_command(argv)
    assert command == (
        "batcher run job.toml --notify 'slack://***' '--notify=json://***' "
        "--base-url 'https://***@gw/v1' --max-cost 2"
    )
    argv = ["run", "-i", "s3://AK:SECRET-6@b/in.jsonl", "--output=s3://b/o.parquet?secret_key=SECRET-7",
            "-o", "local/out.parquet"]  # fmt: skip
    assert resume_command(argv) == (
        "batcher run -i 's3://***@b/in.jsonl' '--output=s3://b/o.parquet?secret_key=***' "
        "-o local/out.parquet"
    )


# -- when notices are due (an injected clock) -----------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def watched(
    monkeypatch: pytest.MonkeyPatch, stall_s: float, budget: Budget | None = None
) -> tuple[Notices, RunStats, Clock, list[Notice]]:
    sent: list[Notice] = []
    monkeypatch.setattr(Notices, "_send", lambda self, notice: sent.append(notice))
    clock = Clock()
    config = NotifyConfig(urls=("json://127.0.0.1:9/x",), stall_s=stall_s)
    notices = Notices(config, name="night", stream=io.StringIO(), clock=clock)
    stats = RunStats()
    notices.follow(stats, budget, None)
    return notices, stats, clock, sent


def test_a_stall_is_told_once_then_again_after_progress_resumes_and_stalls_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    notices, stats, clock, sent = watched(monkeypatch, stall_s=900)

    def run_for(seconds: int) -> None:
        for _ in range(seconds):
            clock.now += 1
            notices.check()

    run_for(899)
    assert sent == []
    run_for(1)
    run_for(2000)  # one stall, however long
    assert [n.event for n in sent] == ["stalled"]
    assert "no request finished for 15m00s" in sent[0].body
    stats.ok += 1  # progress, seen at the next look
    run_for(900)
    assert len(sent) == 1
    run_for(1)  # stalled again: 900 s after the look that saw the progress
    assert [n.event for n in sent] == ["stalled", "stalled"]
    assert "1 done: 1 ok" in sent[1].body


def test_the_budget_is_told_once_at_80_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = Budget(10.0)
    notices, _, _, sent = watched(monkeypatch, stall_s=900, budget=budget)
    budget.spent = 7.99
    notices.check()
    assert sent == []
    budget.spent = 8.0
    notices.check()
    budget.spent = 9.5
    notices.check()
    assert [n.event for n in sent] == ["budget"]
    assert "spent 80% of --max-cost" in sent[0].title and "$8.0000 of $10" in sent[0].body


@pytest.mark.parametrize(
    ("reason", "added"),
    [
        ("--max-cost $1 reached: $0.9990 spent", "  (with a higher --max-cost)"),
        ("detached: 2 batch(es) submitted; run ...", "  (without --detach)"),
        ("cancelled 2 batch(es); run again to ...", "  (without --cancel)"),
        # a cap that cannot work is no spent cap: a higher one would not help, max_tokens would
        (
            "--max-cost: needs max_tokens (or max_completion_tokens) ...",
            "  (once every request has max_tokens)",
        ),
        ("interrupted by SIGINT", ""),
    ],
)
def test_the_resume_command_says_what_the_same_command_lacks(reason: str, added: str) -> None:
    command = "batcher run job.toml --mode batch"
    notices = Notices(NotifyConfig(), name="n", stream=io.StringIO(), command=command)
    assert notices._resume(reason) == command + added


def test_without_urls_nothing_is_started() -> None:
    notices = Notices(NotifyConfig(), name="n", stream=io.StringIO())
    notices.follow(RunStats(), Budget(1.0), None)
    notices.ended(RunStats(), Path("o.parquet"))
    notices.close()
    assert not notices.enabled
    assert notices._sender is None  # no thread, and Apprise not needed


# -- delivered to a loopback receiver --------------------------------------------------------


def test_a_finished_run_is_told_with_its_counts(tmp_path: Path, receiver: Receiver) -> None:
    from batcher.runner.run import run_job

    job = job_from_dict(
        sim_job(tmp_path, 30, sim={"error_rate": 0.3, "error_kinds": ["400"]},
                notify={"urls": [receiver.url("done", "user:pw123456")]})
    )  # fmt: skip
    report = run_job(job, stream=io.StringIO(), sim=sim_server)
    s = report.stats
    assert s.error > 0 and report.exit_code == 1
    assert receiver.titles() == ["batcher: batch finished with errors"]
    notice = receiver.notices[0]
    assert notice["path"] == "/done" and notice["type"] == "warning"
    got = fields(notice)
    assert got["requests"].startswith(f"30/30 done: {s.ok} ok, {s.error} error, 0 rejected")
    assert got["tokens"].endswith(f"= {s.total_tokens:,}")
    assert got["exit"] == "code 1"
    assert got["output"] == str(report.output.resolve())
    assert got["wall"].startswith("time ")


def test_a_run_stopped_by_max_cost_is_told_why_and_how_to_resume(
    tmp_path: Path, receiver: Receiver
) -> None:
    from batcher.cli.main import main

    src = write_input(tmp_path / "in.jsonl", 100)
    job = write_job(  # a request costs about 2% of the cap: 80% is passed before the stop
        tmp_path / "job.toml",
        '[endpoint]\nbase_url = "sim"\n[request]\nmodel = "m"\nmax_tokens = 1\n'
        "[limits]\nconcurrency = 1\n[pricing.m]\ninput = 1000.0\noutput = 1000.0\n",
    )
    out = tmp_path / "o.parquet"
    argv = ["run", str(job), "-i", str(src), "-o", str(out), "--max-cost", "1",
            "--no-progress", "--notify", receiver.url("cap", "u:CAPTOKEN99")]  # fmt: skip
    code = main(argv)
    assert code == 3
    spent, stopped_title = receiver.titles()
    assert spent.startswith("batcher: batch has spent ") and spent.endswith("% of --max-cost")
    assert 80 <= int(spent.split()[-3].rstrip("%")) <= 100  # seen within a second of 80%
    assert stopped_title.startswith("batcher: batch stopped early (--max-cost $1 reached")
    stopped = receiver.of("stopped early")[0]
    got = fields(stopped)
    assert "--max-cost $1 reached" in got["why"]
    assert got["exit"] == "code 3"
    assert got["resume"] == (
        f"batcher run {job} -i {src} -o {out} --max-cost 1 --no-progress --notify 'json://***'"
        "  (with a higher --max-cost)  (the --notify URLs are not shown: give them again)"
    )
    done = int(got["requests"].split("/")[0])
    assert 0 < done < 100
    assert "CAPTOKEN99" not in json.dumps([{**n, "auth": None} for n in receiver.notices])


def test_a_resumed_run_is_told_the_whole_jobs_counts_and_its_own(
    tmp_path: Path, receiver: Receiver
) -> None:
    from batcher.runner.run import run_job

    raw = sim_job(
        tmp_path, 40, limits={"concurrency": 1}, pricing={"m": {"input": 1000.0, "output": 1000.0}},
        notify={"urls": [receiver.url("resume")]},
    )  # fmt: skip
    first = run_job(with_overrides(job_from_dict(raw), max_cost_usd=0.5), stream=io.StringIO(),
                    sim=sim_server)  # fmt: skip
    assert first.exit_code == 3 and 0 < first.stats.done < 40
    second = run_job(job_from_dict(raw), stream=io.StringIO(), sim=sim_server)
    assert second.exit_code == 0
    s = second.stats
    assert s.skipped == first.stats.done and s.done == 40 - first.stats.done
    got = fields(receiver.of("finished")[0])
    assert got["requests"] == "40/40 done in all: 40 ok, 0 error, 0 rejected"
    assert got["this"] == (
        f"run  {s.done} done: {s.ok} ok, 0 error; {s.skipped} done before; 0 retries"
    )


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signalled_run_is_told_stopped_with_the_counts_it_recorded(
    tmp_path: Path, receiver: Receiver, signum: signal.Signals
) -> None:
    src = write_input(tmp_path / "in.jsonl", 200)
    out = tmp_path / "o.jsonl"
    job = write_job(
        tmp_path / "job.toml",
        f'[job]\ninput = "{src}"\noutput = "{out}"\n[endpoint]\nbase_url = "sim"\n'
        '[request]\nmodel = "m"\n[limits]\nconcurrency = 2\n[sim]\nlatency_ms = 100\n'
        f'[notify]\nurls = ["{receiver.url("sig")}"]\n',
    )
    proc = subprocess.Popen(
        batcher_cmd("run", str(job), "--no-progress"), cwd=ROOT, stderr=subprocess.PIPE,
        text=True, env={k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"},
    )  # fmt: skip
    journal = journal_path(out)
    deadline = time.monotonic() + 60
    while not (journal.exists() and journal.read_bytes().count(b"\n") > 2):
        assert time.monotonic() < deadline and proc.poll() is None, "no result in time"
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stderr
    recorded = len(out.read_text().splitlines())
    [stopped] = receiver.of("stopped early")
    got = fields(stopped)
    assert got["requests"].startswith(f"{recorded}/200 done: {recorded} ok, 0 error")
    assert signum.name in got["why"] or "interrupted" in got["why"], got["why"]
    assert got["resume"] == f"batcher run {job} --no-progress"


@pytest.mark.slow
def test_each_stall_is_told_once(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests, one at a time, each answered after 1.5 s: two stalls of 0.5 s, each told
    once although the watch looks every 0.05 s; then the finish."""
    from batcher.runner.run import run_job

    monkeypatch.setattr(notify, "WATCH_EVERY_S", 0.05)
    job = job_from_dict(
        sim_job(tmp_path, 2, limits={"concurrency": 1}, sim={"latency_ms": 1500},
                notify={"urls": [receiver.url("stall")], "stall_s": 0.5})
    )  # fmt: skip
    report = run_job(job, stream=io.StringIO(), sim=sim_server)
    assert report.exit_code == 0
    assert receiver.titles() == [
        "batcher: batch stalled", "batcher: batch stalled", "batcher: batch finished",
    ]  # fmt: skip
    first, second = receiver.of("stalled")
    assert fields(first)["requests"].startswith("0/2 done")
    assert fields(second)["requests"].startswith("1/2 done: 1 ok")
    assert fields(first)["now"].startswith("1 in flight")


# -- an unreachable receiver -----------------------------------------------------------------


@pytest.mark.slow
def test_an_unreachable_url_changes_neither_the_exit_code_nor_the_run_time(
    tmp_path: Path,
) -> None:
    """A closed port, and a port that never answers (Apprise would wait 30 s for it: ``rto``):
    the run ends with the same exit code, at most a little later (a generous bound: what is
    measured is in bench/notify.py's figures), one line on stderr for each."""
    src = write_input(tmp_path / "in.jsonl", 20)
    base = ["run", "-i", str(src), "--base-url", "sim", "-m", "m", "--no-progress"]

    def timed(name: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
        start = time.monotonic()
        proc = run_batcher(*base, "-o", str(tmp_path / f"{name}.parquet"), *extra)
        return proc, time.monotonic() - start

    with blackhole() as silent_port:
        plain, plain_s = timed("plain")
        closed, closed_s = timed("closed", "--notify", f"json://127.0.0.1:{free_port()}/x")
        silent, silent_s = timed("silent", "--notify", f"json://127.0.0.1:{silent_port}/x?rto=30")
    assert plain.returncode == closed.returncode == silent.returncode == 0
    assert (
        "batcher: notify: the finished notice was not delivered to notify URL 1 (json://***): "
        in closed.stderr
    )
    assert "batcher: notify: 1 notice(s) still being sent after 0.6 s" in silent.stderr
    assert closed_s < plain_s + 10 and silent_s < plain_s + 10  # not Apprise's 30 s


# -- the token of a notify URL appears nowhere ----------------------------------------------


@pytest.mark.slow
def test_a_canary_token_in_a_notify_url_appears_nowhere(tmp_path: Path, receiver: Receiver) -> None:
    canary = "CANARY123"
    src = write_input(tmp_path / "in.jsonl", 30)
    with src.open("a") as f:
        f.write("not json\n")  # a rejects file too
    out = tmp_path / "o.parquet"
    urls = [receiver.url("ok", f"user:{canary}"), f"json://user:{canary}@127.0.0.1:{free_port()}/"]
    job = write_job(
        tmp_path / "job.toml",
        f'[job]\ninput = "{src}"\noutput = "{out}"\n[endpoint]\nbase_url = "sim"\n'
        '[request]\nmodel = "m"\nmax_tokens = 1\n[pricing.m]\ninput = 10000.0\noutput = 10000.0\n'
        f"[notify]\nurls = {json.dumps(urls)}\n",
    )
    printed = []
    first = run_batcher("run", str(job), "--max-cost", "0.5")  # stops: a resume command
    second = run_batcher(
        "run", str(job), "--max-cost", "100", "--notify", receiver.url("flag", f"u:{canary}"),
        "--notify", f"json://{canary}@127.0.0.1:{free_port()}/{canary}",
    )  # fmt: skip
    bad = run_batcher("run", str(job), "--notify", f"nope://{canary}/x")
    report = run_batcher("report", str(out), "--html", str(tmp_path / "report.html"))
    as_json = run_batcher("report", str(out), "--json")
    for proc in (first, second, bad, report, as_json):
        printed += [proc.stdout, proc.stderr]
    assert (first.returncode, second.returncode, bad.returncode) == (3, 1, 2), printed
    assert "not delivered to notify URL 2 (json://***)" in first.stderr
    assert "notify.urls" not in bad.stderr and "--notify[0]" in bad.stderr
    titles = receiver.titles()
    assert any("stopped early" in t for t in titles) and any("finished" in t for t in titles)
    written = [p for p in tmp_path.iterdir() if p.is_file() and p.name != "job.toml"]
    names = {p.name for p in written}
    assert {"o.parquet", "o.parquet.journal", "o.parquet.rejects.jsonl"} <= names
    assert "report.html" in names
    for path in written:
        assert canary.encode() not in path.read_bytes(), path
    for text in printed:
        assert canary not in text
    for notice in receiver.notices:  # the token reached the receiver as its password alone
        assert canary not in json.dumps({k: v for k, v in notice.items() if k != "auth"})
    assert "json://***" in (first.stderr + json.dumps(receiver.notices))


@pytest.mark.slow
def test_a_batch_mode_run_is_told_finished(tmp_path: Path, receiver: Receiver) -> None:
    from batcher.runner.run import run_job

    job = job_from_dict(
        sim_job(
            tmp_path, 12, batch={"max_requests": 5, "poll_s": 0.1},
            sim={"batch": {"validating_s": 0.1, "in_progress_s": 0.3, "finalizing_s": 0.1}},
            notify={"urls": [receiver.url("batch")]},
        )
        | {"job": {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "o.parquet"),
                   "progress": False, "mode": "batch"}}
    )  # fmt: skip
    report = run_job(job, stream=io.StringIO(), sim=sim_server)
    assert report.exit_code == 0
    [finished] = receiver.of("finished")
    assert fields(finished)["requests"].startswith("12 done: 12 ok, 0 error")


@pytest.mark.slow
def test_a_run_without_notify_urls_never_imports_apprise(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 3)
    code = (
        "import sys; from batcher.cli.main import main; "
        f"rc = main(['run', '-i', {str(src)!r}, '-o', {str(tmp_path / 'o.jsonl')!r}, "
        "'--base-url', 'sim', '-m', 'm', '--no-progress']); "
        "print(rc, 'apprise' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.split() == ["0", "False"], proc.stderr
