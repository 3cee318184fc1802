"""Where waiting cannot help the run stops at once with a configuration error (exit 2): a host
that does not resolve, a base URL that answers nothing but 404/405. Where it can (a local server
still starting), the run waits and says so."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from batcher.engine.setup_check import WRONG_PATH_AFTER, SetupCheck, is_wrong_path
from batcher.errors import ConfigError
from batcher.http.answers import Attempt
from batcher.http.client import ChatClient
from batcher.job_file import job_from_dict
from batcher.output.writers import read_results
from batcher.runner.run import RunReport, run_job
from tests.helpers import free_port, run_batcher, sim_process, sim_stats, write_input, write_job

#: The .invalid top-level domain never resolves (RFC 2606): no request leaves this machine.
NOWHERE = "http://does-not-exist.invalid/v1"
URL = "http://127.0.0.1:8080/v1/chat/completions"
OK = {
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def attempt(status: int | None, **fields: Any) -> Attempt:
    return Attempt(ok=status == 200, retryable=status is None, latency_s=0.0,
                   status_code=status, **fields)  # fmt: skip


def test_a_name_that_does_not_resolve_before_any_answer_is_a_configuration_error() -> None:
    check = SetupCheck("http://api.exmaple.com/v1/chat/completions")
    problem = check.check(attempt(None, error_code="connection_error", connect_failure="dns"))
    assert problem is not None and "'api.exmaple.com' does not resolve" in problem


def test_once_the_host_answered_a_dns_failure_is_an_outage_not_a_configuration_error() -> None:
    check = SetupCheck(URL)
    assert check.check(attempt(200)) is None
    assert check.check(attempt(None, connect_failure="dns")) is None
    assert check.check(attempt(None, connect_failure="refused")) is None


def test_only_404s_is_a_wrong_base_url_named_without_its_credentials() -> None:
    check = SetupCheck("http://user:pw@h:1/v1/chat/completions/chat/completions?key=canary-5x")
    answers = [check.check(attempt(404, error_message="HTTP 404: Not Found"))
               for _ in range(WRONG_PATH_AFTER)]  # fmt: skip
    assert answers[:-1] == [None] * (WRONG_PATH_AFTER - 1)
    problem = answers[-1]
    assert problem is not None
    assert "base_url should end before /chat/completions, usually in /v1" in problem
    assert "/v1/chat/completions/chat/completions" in problem
    assert "canary" not in problem and "pw" not in problem


def test_a_404_among_successes_or_about_a_model_is_the_requests_own_error() -> None:
    assert not is_wrong_path(404, "model_not_found", "The model `x` does not exist")
    assert not is_wrong_path(404, "http_404", "HTTP 404: The model `x` does not exist.")
    assert is_wrong_path(405, "http_405", "HTTP 405: Method Not Allowed")
    after_success = SetupCheck(URL)
    after_success.check(attempt(200))
    assert all(after_success.check(attempt(404)) is None for _ in range(3 * WRONG_PATH_AFTER))
    models = SetupCheck(URL)
    missing = attempt(404, error_code="model_not_found", error_message="no such model")
    assert all(models.check(missing) is None for _ in range(3 * WRONG_PATH_AFTER))


@pytest.mark.anyio
async def test_both_transports_tell_a_missing_host_and_a_refused_connection() -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for transport in (None, httpx.AsyncHTTPTransport()):
        async with ChatClient(NOWHERE, api_key=None, timeout_s=20, transport=transport) as c:
            missing = await c.post(body)
        async with ChatClient(closed, api_key=None, timeout_s=20, transport=transport) as c:
            refused = await c.post(body)
        assert (missing.error_code, missing.connect_failure) == ("connection_error", "dns")
        assert (refused.error_code, refused.connect_failure) == ("connection_error", "refused")


def mock_job(tmp_path: Path, n: int, **tables: Any) -> Any:
    src = write_input(tmp_path / "in.jsonl", n)
    raw: dict[str, Any] = {
        "job": {"input": str(src), "output": str(tmp_path / "o.jsonl"), "progress": False},
        "endpoint": {"base_url": "http://mock.test/v1"},
        "request": {"model": "m"},
        "limits": {"concurrency": 1},
        "retry": {"max_attempts": 6, "backoff_initial_s": 0.001, "backoff_max_s": 0.002},
    }
    return job_from_dict(raw | tables)


def unresolvable(request: httpx.Request) -> httpx.Response:
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    raise httpx.ConnectError(str(error), request=request) from error


def test_library_run_raises_config_error_and_writes_nothing(tmp_path: Path) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return unresolvable(request)

    job = mock_job(tmp_path, 5, limits={"concurrency": 4})
    with pytest.raises(ConfigError) as info:
        run_job(job, transport=httpx.MockTransport(handler), stream=io.StringIO())
    assert info.value.field == "endpoint.base_url"
    assert "'mock.test' does not resolve" in str(info.value)
    assert calls <= 4  # at once: no retries, no new requests
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no journal


def test_with_several_endpoints_the_one_that_does_not_resolve_is_named(tmp_path: Path) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "typo.test":
            return unresolvable(request)
        await anyio.sleep(0.01)  # busy: the next request goes to the other endpoint
        return httpx.Response(200, json=OK)

    job = mock_job(
        tmp_path, 20,
        endpoint={},
        limits={"concurrency": 2},
        endpoints=[{"name": "good", "base_url": "http://mock.test/v1"},
                   {"name": "bad", "base_url": "http://typo.test/v1"}],
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        run_job(job, transport=httpx.MockTransport(handler), stream=io.StringIO())
    assert info.value.field == "endpoints[1].base_url"
    assert "'typo.test'" in str(info.value)
    # what the good endpoint answered is kept: a re-run after the fix resumes from it
    journal = (tmp_path / "o.jsonl.journal").read_text().splitlines()[1:]
    assert journal and all(json.loads(line)["status"] == "ok" for line in journal)


def test_a_host_that_answered_then_stops_resolving_is_waited_for(tmp_path: Path) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls in (3, 4, 5):  # its resolver fails for a while, after two answers
            return unresolvable(request)
        return httpx.Response(200, json=OK)

    report = run_job(mock_job(tmp_path, 6), transport=httpx.MockTransport(handler),
                     stream=io.StringIO())  # fmt: skip
    assert report.exit_code == 0, report.summary
    assert {r["status"] for r in read_results(report.output)} == {"ok"}
    assert calls == 9


def answers_404(message: str = "Not Found", *, ok_first: int = 0) -> Any:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls <= ok_first:
            return httpx.Response(200, json=OK)
        return httpx.Response(404, json={"detail": message})

    return handler


def test_fewer_404s_than_it_takes_to_tell_are_recorded_as_errors(tmp_path: Path) -> None:
    job = mock_job(tmp_path, WRONG_PATH_AFTER - 1)
    report = run_job(job, transport=httpx.MockTransport(answers_404()), stream=io.StringIO())
    assert report.exit_code == 1
    rows = list(read_results(report.output))
    assert len(rows) == WRONG_PATH_AFTER - 1
    assert {(r["status"], r["status_code"]) for r in rows} == {("error", 404)}


def test_404s_after_a_success_stay_errors_of_their_requests(tmp_path: Path) -> None:
    job = mock_job(tmp_path, 3 * WRONG_PATH_AFTER)
    handler = answers_404(ok_first=1)
    report: RunReport = run_job(job, transport=httpx.MockTransport(handler), stream=io.StringIO())
    assert report.exit_code == 1
    rows = list(read_results(report.output))
    assert len(rows) == 3 * WRONG_PATH_AFTER
    assert sum(r["status"] == "error" for r in rows) == 3 * WRONG_PATH_AFTER - 1


def test_404s_before_a_success_are_held_then_recorded(tmp_path: Path) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls <= 2:  # say, two lines ask for a path-like model the gateway does not route
            return httpx.Response(404, text="Not Found")
        return httpx.Response(200, json=OK)

    job = mock_job(tmp_path, 8)
    report = run_job(job, transport=httpx.MockTransport(handler), stream=io.StringIO())
    assert report.exit_code == 1
    statuses = sorted(r["status"] for r in read_results(report.output))
    assert statuses == ["error"] * 2 + ["ok"] * 6


# --- the command line, over real loopback sockets ---------------------------------------------


@pytest.mark.slow
def test_cli_host_that_does_not_resolve_exits_2_at_once_and_writes_nothing(
    tmp_path: Path,
) -> None:
    src = write_input(tmp_path / "in.jsonl", 50)
    out = tmp_path / "out.jsonl"
    done = run_batcher("run", "-i", str(src), "-o", str(out), "-m", "m", "--base-url", NOWHERE,
                       "--no-progress")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "batcher: error: endpoint.base_url: host 'does-not-exist.invalid' does not resolve "
        f"({NOWHERE}); check the URL"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.slow
def test_cli_base_url_that_answers_only_404_exits_2_with_a_hint(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 200)
    out = tmp_path / "out.jsonl"
    with sim_process() as url:
        wrong = f"{url}/chat/completions?key=canary-7f3a"  # the whole path, a key in the query
        done = run_batcher("run", "-i", str(src), "-o", str(out), "-m", "m", "--base-url", wrong,
                           "-c", "2", "--no-progress")  # fmt: skip
        received = sim_stats(url)["requests_received"]
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("batcher: error: endpoint.base_url: http://127.0.0.1:")
    assert "/v1/chat/completions/chat/completions?key=*** answered 404" in line
    assert line.endswith("base_url should end before /chat/completions, usually in /v1")
    assert "canary" not in done.stderr
    assert WRONG_PATH_AFTER <= received <= WRONG_PATH_AFTER + 2  # not one per line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    # fixed, the run sends every line
    fixed = run_batcher("run", "-i", str(src), "-o", str(out), "--base-url", "sim", "-m", "m",
                        "--no-progress")  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    assert len(list(read_results(out))) == 200


@pytest.mark.slow
def test_cli_refused_before_the_first_answer_waits_for_the_server_and_says_so(
    tmp_path: Path,
) -> None:
    src = write_input(tmp_path / "in.jsonl", 4)
    port = free_port()  # nothing listens there
    job = write_job(
        tmp_path / "j.toml",
        f"""
[job]
input = "in.jsonl"
output = "out.jsonl"
progress = false
[endpoint]
base_url = "http://127.0.0.1:{port}/v1"
[request]
model = "m"
[retry]
max_attempts = 2  # fewer than the failures an outage once needed: none may be spent
outage_patience_s = 1.5
""",
    )
    done = run_batcher("run", str(job))
    assert done.returncode == 3, done.stderr  # waited its patience out: resumable
    assert (
        f"batcher: nothing listens at http://127.0.0.1:{port} yet (connection refused); "
        "waiting for the server to start (patience 1.5 s)"
    ) in done.stderr.splitlines()
    assert list(read_results(tmp_path / "out.jsonl")) == []  # nothing recorded as failed
    assert src.exists()
