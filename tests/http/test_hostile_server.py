"""batcher against a hostile server (``tests/hostile.py``) over real loopback sockets.

Each test asserts what batcher records and the run's exit code when a server redirects, lies
in its headers, answers too much, too slowly, half an answer, malformed JSON or an answer that
contradicts itself. Runs are in-process and small, with short timeouts and no real backoff:
the module takes a few seconds.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from batcher.errors import ConfigError
from batcher.job_file import job_from_dict
from batcher.output.writers import read_results
from batcher.runner.run import RunReport, run_job
from tests import hostile
from tests.helpers import run_batcher, write_input, write_job

CANARY = "canary-hostile-3f9d-not-a-real-key"
#: The attempts each request gets here: enough to see a retry, few enough to be quick.
ATTEMPTS = 3


def run_against(
    tmp_path: Path,
    base_url: str,
    *,
    n: int = 2,
    transport: httpx.AsyncBaseTransport | None = None,
    endpoint: dict[str, Any] | None = None,
    request: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
    over: str | None = None,
) -> tuple[RunReport, list[dict[str, Any]], str]:
    """Run ``n`` lines against ``base_url`` in this process (``over`` one of ``TRANSPORTS``);
    the report, the records and what the run printed."""
    if over in ("httptools", "aiohttp"):
        endpoint = {**(endpoint or {}), "http": over}
    elif over is not None:
        transport = transport_of(over)
    src = write_input(tmp_path / "in.jsonl", n)
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / "o.jsonl"), "progress": False},
            "endpoint": {"base_url": base_url, **(endpoint or {})},
            "request": {"model": "gpt-4o-mini", **(request or {})},
            "limits": {"concurrency": 2, **(limits or {})},
            "retry": {"max_attempts": ATTEMPTS, "timeout_s": 5, "backoff_initial_s": 0.001,
                      "backoff_max_s": 0.002, **(retry or {})},
            "pricing": {"gpt-4o-mini": {"input": 1.0, "output": 1.0}},
        }
    )  # fmt: skip
    printed = io.StringIO()
    report = run_job(job, transport=transport, stream=printed)
    rows = sorted(read_results(report.output), key=lambda r: r["custom_id"])
    return report, rows, printed.getvalue()


def transport_of(over: str) -> httpx.AsyncBaseTransport | None:
    """The httpx transport named: plain httpx, or httpx over aiohttp (``httpx-aiohttp``, as a
    library user may pass)."""
    if over == "httpx":
        return httpx.AsyncHTTPTransport()
    if over == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return AiohttpTransport()
    return None


#: batcher's own clients (``endpoint.http``: the default, and aiohttp), and httpx transports.
TRANSPORTS = ["httptools", "aiohttp", "httpx", "httpx-aiohttp"]


def outcomes(rows: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    return {(r["status"], r["status_code"], r["error_code"], r["attempts"]) for r in rows}


# --- redirects ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("over", TRANSPORTS)
def test_a_redirect_is_not_followed_and_carries_nothing_elsewhere(
    tmp_path: Path, status: int, over: str
) -> None:
    recorder = hostile.HostileServer(hostile.answer())
    with recorder.running():
        target = f"{recorder.origin}/v1/chat/completions?token=leak-me"
        server = hostile.HostileServer(hostile.redirect(status, target))
        with server.running():
            report, rows, _ = run_against(
                tmp_path, server.base_url, over=over, endpoint={"headers": {"api-key": CANARY}}
            )
    assert recorder.seen == []  # no request, no header, no key reached the other origin
    assert [s.method for s in server.seen] == ["POST", "POST"]  # one attempt each: not retried
    assert outcomes(rows) == {("error", status, "redirect", 1)}
    message = rows[0]["error_message"]
    assert f"HTTP {status}" in message and recorder.origin in message
    assert "leak-me" not in message
    assert report.exit_code == 1


def test_a_relative_redirect_is_not_followed_either(tmp_path: Path) -> None:
    server = hostile.HostileServer(hostile.redirect(307, "/v2/chat/completions"))
    with server.running():
        report, rows, _ = run_against(tmp_path, server.base_url, n=1)
    assert [s.target for s in server.seen] == ["/v1/chat/completions"]
    assert outcomes(rows) == {("error", 307, "redirect", 1)}
    assert "same server" in rows[0]["error_message"]
    assert report.exit_code == 1


# --- URLs with a query string ------------------------------------------------------------------


def test_the_query_string_stays_after_the_path(tmp_path: Path) -> None:
    server = hostile.HostileServer(hostile.answer())
    with server.running():
        url = f"{server.origin}/openai/deployments/x?api-version=2024-06-01&api-key={CANARY}"
        report, rows, _ = run_against(tmp_path, url, n=1)
    assert [s.target for s in server.seen] == [
        f"/openai/deployments/x/chat/completions?api-version=2024-06-01&api-key={CANARY}"
    ]
    assert report.exit_code == 0 and outcomes(rows) == {("ok", 200, None, 1)}


@pytest.mark.parametrize("http", ["httptools", "aiohttp"])
def test_a_key_in_the_query_is_in_no_record_journal_or_message(tmp_path: Path, http: str) -> None:
    # A status line that is not HTTP: aiohttp's error quotes the whole URL, query included.
    server = hostile.HostileServer(hostile.raw_bytes(b"HTTP/1.1 abc nonsense\r\n\r\n"))
    with server.running():
        url = f"{server.origin}/v1?api-version=2024-06-01&api-key={CANARY}"
        report, rows, printed = run_against(tmp_path, url, over=http)
    assert {s.target.endswith(f"api-key={CANARY}") for s in server.seen} == {True}
    assert {r["error_code"] for r in rows} == {"invalid_response"}
    if http == "aiohttp":
        assert "api-version=2024-06-01" in rows[0]["error_message"]  # the URL, redacted
    assert report.exit_code == 1
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "in.jsonl":
            assert CANARY not in path.read_text(encoding="utf-8", errors="replace"), path
    assert CANARY not in report.summary and CANARY not in printed


@pytest.mark.slow
def test_a_key_in_the_query_is_in_nothing_the_cli_prints_or_writes(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 4)
    # a rejected line, first (read before the run stops): the rejects file is written too
    src.write_text("not json\n" + src.read_text(encoding="utf-8"), encoding="utf-8")
    # The first answer is not HTTP (an error record whose message quotes the URL, over
    # aiohttp), the next refuses the key: the run stops early (exit 3) and keeps its journal.
    refused = {"error": {"code": "invalid_api_key", "message": "bad key"}}
    server = hostile.HostileServer(
        hostile.in_turn(hostile.raw_bytes(b"HTTP/1.1 abc\r\n\r\n"), hostile.answer(401, refused))
    )
    with server.running():
        url = f"{server.base_url}?api-version=2024-06-01&api-key={CANARY}"
        job = write_job(
            tmp_path / "job.toml",
            f'[job]\ninput = "in.jsonl"\noutput = "o.parquet"\n[endpoint]\nbase_url = "{url}"\n'
            'http = "aiohttp"\n[request]\nmodel = "gpt-4o-mini"\n[limits]\nconcurrency = 1\n'
            "[retry]\nmax_attempts = 1\n",
        )
        proc = run_batcher("run", str(job), "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert len(server.seen) == 2
    assert CANARY not in proc.stdout + proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".toml"]
    assert {p.name for p in written} >= {
        "in.jsonl",
        "o.parquet",
        "o.parquet.journal",
        "o.parquet.rejects.jsonl",
    }
    assert "api-version=2024-06-01&api-key=***" in (tmp_path / "o.parquet.journal").read_text()
    for path in written:
        if path.name != "in.jsonl":
            assert CANARY.encode() not in path.read_bytes(), path


# --- answers that contradict themselves --------------------------------------------------------

ERROR_200 = {"error": {"message": "the model is overloaded", "type": "server_error"}}
EMPTY_WITH_USAGE = {"choices": [], "usage": {"prompt_tokens": 5, "total_tokens": 5}}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (EMPTY_WITH_USAGE, "empty 'choices'"),
        ({"choices": [None], "usage": {"total_tokens": 1}}, "not an object"),
        (ERROR_200, "error object: the model is overloaded"),
        ({**hostile.GOOD_ANSWER, "error": {"message": "half failed"}}, "error object: half failed"),
        (b'{"choices": [{"message": {"content": "cut', "not JSON"),
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        ([hostile.GOOD_ANSWER], "not an object"),
    ],
)
def test_an_unusable_200_is_retried_then_an_error(tmp_path: Path, body: Any, says: str) -> None:
    server = hostile.HostileServer(hostile.answer(200, body))
    with server.running():
        report, rows, _ = run_against(tmp_path, server.base_url)
    assert len(server.seen) == 2 * ATTEMPTS
    assert outcomes(rows) == {("error", 200, "invalid_response", ATTEMPTS)}
    assert says in rows[0]["error_message"]
    assert report.exit_code == 1


def test_an_unusable_200_then_a_good_answer_is_kept(tmp_path: Path) -> None:
    server = hostile.HostileServer(
        hostile.in_turn(hostile.answer(200, ERROR_200), hostile.answer())
    )
    with server.running():
        report, rows, _ = run_against(tmp_path, server.base_url, n=1)
    assert outcomes(rows) == {("ok", 200, None, 2)}
    assert report.exit_code == 0


# --- lying headers, broken bodies --------------------------------------------------------------

GOOD = json.dumps(hostile.GOOD_ANSWER).encode()


@pytest.mark.parametrize("over", TRANSPORTS)
def test_a_body_that_is_not_the_gzip_it_claims_is_an_answer_error_not_an_outage(
    tmp_path: Path, over: str
) -> None:
    server = hostile.HostileServer(hostile.answer(200, GOOD, headers={"Content-Encoding": "gzip"}))
    with server.running():
        report, rows, printed = run_against(tmp_path, server.base_url, n=3, over=over)
    assert outcomes(rows) == {("error", 200, "invalid_response", ATTEMPTS)}
    assert "could not be read" in rows[0]["error_message"]
    assert "unreachable" not in printed  # an endpoint that answers is not down
    assert report.exit_code == 1


def test_a_body_shorter_than_its_content_length_is_an_answer_error(tmp_path: Path) -> None:
    server = hostile.HostileServer(hostile.truncated(GOOD, sent=len(GOOD) // 2))
    with server.running():
        report, rows, printed = run_against(tmp_path, server.base_url, n=3)
    assert outcomes(rows) == {("error", 200, "invalid_response", ATTEMPTS)}
    assert "unreachable" not in printed
    assert report.exit_code == 1


def test_a_content_length_shorter_than_the_body_is_an_answer_error(tmp_path: Path) -> None:
    # aiohttp refuses the bytes past the announced length outright (httpx would cut the body
    # there, and the cut JSON is no answer either): retried, then an error, never ok.
    server = hostile.HostileServer(hostile.answer(200, GOOD, content_length=len(GOOD) - 10))
    with server.running():
        report, rows, printed = run_against(tmp_path, server.base_url)
    assert {(r["status"], r["error_code"], r["attempts"]) for r in rows} == {
        ("error", "invalid_response", ATTEMPTS)
    }
    assert "unreachable" not in printed
    assert report.exit_code == 1


def test_a_body_that_trickles_past_the_timeout_is_a_timeout(tmp_path: Path) -> None:
    server = hostile.HostileServer(hostile.trickle(GOOD, every_s=0.05))
    with server.running():
        report, rows, _ = run_against(
            tmp_path, server.base_url, n=1, retry={"max_attempts": 1, "timeout_s": 0.3}
        )
    assert outcomes(rows) == {("error", None, "timeout", 1)}
    assert report.exit_code == 1


# --- answers too large -------------------------------------------------------------------------

SMALL_CAP = {"max_response_bytes": 1 << 20}


@pytest.mark.parametrize("over", TRANSPORTS)
def test_a_gzip_bomb_stops_at_the_size_cap(tmp_path: Path, over: str) -> None:
    server = hostile.HostileServer(hostile.gzip_bomb(50 << 20))
    with server.running():
        report, rows, _ = run_against(tmp_path, server.base_url, limits=SMALL_CAP, over=over)
    assert outcomes(rows) == {("error", 200, "response_too_large", 1)}  # not retried
    assert "limits.max_response_bytes" in rows[0]["error_message"]
    assert report.exit_code == 1
    assert (tmp_path / "o.jsonl").stat().st_size < 100_000


def test_a_plain_answer_over_the_cap_is_refused_as_it_comes(tmp_path: Path) -> None:
    big = json.dumps({**hostile.GOOD_ANSWER, "pad": "x" * (3 << 20)}).encode()
    server = hostile.HostileServer(hostile.answer(200, big))
    with server.running():
        report, rows, _ = run_against(tmp_path, server.base_url, n=1, limits=SMALL_CAP)
    assert outcomes(rows) == {("error", 200, "response_too_large", 1)}
    assert report.exit_code == 1


def test_an_endless_stream_stops_at_the_size_cap(tmp_path: Path) -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "y" * 1000}}]}
    piece = f"data: {json.dumps(chunk)}\n\n".encode() * 64
    server = hostile.HostileServer(hostile.endless_stream(piece))
    with server.running():
        report, rows, _ = run_against(
            tmp_path, server.base_url, n=1, limits=SMALL_CAP, request={"stream": True}
        )
    assert outcomes(rows) == {("error", 200, "response_too_large", 1)}
    assert report.exit_code == 1


def test_an_answer_within_the_cap_is_kept(tmp_path: Path) -> None:
    big = {**hostile.GOOD_ANSWER, "pad": "x" * 500_000}
    server = hostile.HostileServer(hostile.answer(200, big))
    with server.running():
        report, rows, _ = run_against(tmp_path, server.base_url, n=1, limits=SMALL_CAP)
    assert outcomes(rows) == {("ok", 200, None, 1)}
    assert report.exit_code == 0


@pytest.mark.parametrize("value", [0, 1000, -5, 2.5, "32MiB", True])
def test_a_size_cap_that_cannot_work_is_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(
        ConfigError, match=r"limits\.max_response_bytes: must be an integer >= 1024"
    ):
        job_from_dict({"limits": {"max_response_bytes": value}})


@pytest.mark.slow
def test_headers_that_pause_the_pool_for_long_are_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first answer says nothing remains until a reset (and names no limit to pace by):
    the pool pauses until then, and the run says so instead of going silent. (The threshold
    for saying it is lowered so the test waits 1 s, not 30.)"""
    monkeypatch.setattr("batcher.engine.attempt.LONG_PAUSE_S", 0.5)
    spent = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}
    server = hostile.HostileServer(hostile.in_turn(hostile.answer(headers=spent), hostile.answer()))
    with server.running():
        report, rows, printed = run_against(
            tmp_path, server.base_url, n=2, limits={"concurrency": 1}
        )
    assert report.exit_code == 0 and len(rows) == 2
    assert "says nothing remains of its rate limit for 1 s" in printed
