"""The pyreqwest transport (``batcher.http.native``) over real loopback sockets.

The same promises as aiohttp's transport: errors mapped to the transport's own (a refused port
and a name that does not exist told apart), no redirect followed, one timeout over the whole
attempt, a body that breaks off is a ``BodyError``, streams read as they come, headers looked
up in any case, gzip decoded, the size cap kept, and no key in any message.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from batcher.http.client import ChatClient
from batcher.http.transport import BodyError, InvalidResponse, TransportError, TransportTimeout
from batcher.sim.config import SimConfig
from batcher.sim.serve import running_sim
from tests import hostile
from tests.helpers import ROOT, free_port
from tests.loopback import read_body, serving

pytest.importorskip("pyreqwest")

from batcher.http.native import ReqwestTransport

pytestmark = pytest.mark.anyio

CANARY = "sk-canary-native-7c1e-not-a-real-key"
BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
#: The .invalid top-level domain never resolves (RFC 2606): no request leaves this machine.
NOWHERE = "http://does-not-exist.invalid/v1"


def native(base_url: str, **kw: Any) -> ChatClient:
    """A ChatClient over pyreqwest, with a key to look for in messages."""
    kw.setdefault("timeout_s", 10)
    return ChatClient(base_url, api_key=CANARY, http="pyreqwest", **kw)


def transport(timeout_s: float = 10) -> ReqwestTransport:
    headers = {"authorization": f"Bearer {CANARY}", "content-type": "application/json"}
    return ReqwestTransport(
        headers=headers, max_connections=4, timeout_s=timeout_s, connect_timeout_s=timeout_s
    )


async def post_to(behaviour: hostile.Behaviour, *, host: str = "127.0.0.1", **kw: Any) -> Any:
    """One ChatClient post to a hostile server; the attempt and what the server saw."""
    server = hostile.HostileServer(behaviour)
    with server.running():
        async with native(f"http://{host}:{server.port}/v1", **kw) as client:
            attempt = await client.post(BODY)
    return attempt, server.seen


def no_key_in(attempt: Any) -> None:
    text = f"{attempt.error_message} {attempt!r}"
    assert CANARY not in text and "Bearer" not in text


# --- connecting --------------------------------------------------------------------------------


async def test_a_refused_port_and_a_missing_host_are_told_apart() -> None:
    async with native(f"http://127.0.0.1:{free_port()}/v1") as client:
        refused = await client.post(BODY)
    async with native(NOWHERE) as client:
        missing = await client.post(BODY)
    assert (refused.error_code, refused.connect_failure) == ("connection_error", "refused")
    assert (missing.error_code, missing.connect_failure) == ("connection_error", "dns")
    assert refused.retryable and refused.status_code is None
    assert "Connection refused" in (refused.error_message or "")
    no_key_in(refused)
    no_key_in(missing)


@contextlib.contextmanager
def not_tls() -> Iterator[int]:
    """A port that answers a TLS handshake with a plain HTTP status line; yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def answer() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(timeout=5)
        listener.close()


async def test_a_tls_error_carries_no_key() -> None:
    with not_tls() as port:
        async with native(f"https://127.0.0.1:{port}/v1") as client:
            attempt = await client.post(BODY)
    assert attempt.error_code == "connection_error" and attempt.status_code is None
    assert attempt.connect_failure is None
    assert "corrupt message" in (attempt.error_message or "")  # rustls: not a TLS record
    no_key_in(attempt)


async def test_a_header_it_cannot_send_is_not_quoted() -> None:
    # pyreqwest's own message quotes the value; ChatClient refuses such a header before this
    bad = ReqwestTransport(
        headers={"authorization": f"Bearer {CANARY}\n"},
        max_connections=1,
        timeout_s=5,
        connect_timeout_s=5,
    )
    with pytest.raises(ValueError) as caught:
        bad.open()
    assert CANARY not in str(caught.value) and "Bearer" not in str(caught.value)


async def test_the_key_is_sent_once_as_a_header() -> None:
    attempt, seen = await post_to(hostile.answer())
    assert attempt.ok and attempt.usage.total_tokens == 6
    (request,) = seen
    assert request.headers["authorization"] == f"Bearer {CANARY}"
    assert request.method == "POST" and request.target == "/v1/chat/completions"
    assert json.loads(request.body) == BODY
    assert "cookie" not in request.headers


async def test_no_proxy_is_taken_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = hostile.HostileServer(hostile.answer())
    with proxy.running():
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.origin)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        # localhost, not 127.0.0.1: some clients never proxy a literal loopback address
        attempt, seen = await post_to(hostile.answer(), host="localhost")
    assert proxy.seen == []  # the key went to the endpoint only
    assert attempt.ok and len(seen) == 1


# --- answers -----------------------------------------------------------------------------------


async def test_a_redirect_is_an_answer_and_is_not_followed() -> None:
    recorder = hostile.HostileServer(hostile.answer())
    with recorder.running():
        target = f"{recorder.origin}/v1/chat/completions"
        attempt, seen = await post_to(hostile.redirect(307, target))
    assert recorder.seen == []  # nothing, the key least of all, reached the other origin
    assert len(seen) == 1
    assert (attempt.status_code, attempt.error_code) == (307, "redirect")
    assert recorder.origin in (attempt.error_message or "")


async def test_headers_are_found_in_any_case() -> None:
    headers = {"X-Request-ID": "req-7", "Retry-After": "3", "X-RateLimit-Limit-Requests": "60"}
    attempt, _ = await post_to(hostile.answer(429, {"error": {"message": "slow"}}, headers=headers))
    assert attempt.status_code == 429 and attempt.retryable
    assert attempt.request_id == "req-7" and attempt.retry_after == 3.0
    assert attempt.headers["x-ratelimit-limit-requests"] == "60"
    assert attempt.headers["X-RATELIMIT-LIMIT-REQUESTS"] == "60"


async def test_a_gzip_body_is_decoded() -> None:
    packed = gzip.compress(json.dumps(hostile.GOOD_ANSWER).encode())
    attempt, _ = await post_to(hostile.answer(200, packed, headers={"Content-Encoding": "gzip"}))
    assert attempt.ok and attempt.body == hostile.GOOD_ANSWER


async def test_a_body_that_is_not_its_encoding_is_a_broken_answer() -> None:
    behaviour = hostile.answer(200, b"not gzip", headers={"Content-Encoding": "gzip"})
    attempt, _ = await post_to(behaviour)
    assert (attempt.status_code, attempt.error_code) == (200, "invalid_response")
    assert attempt.retryable


async def test_a_status_line_that_is_not_http_is_an_invalid_response() -> None:
    server = hostile.HostileServer(hostile.raw_bytes(b"HTTP/1.1 abc nonsense\r\n\r\n"))
    with server.running():
        async with native(f"{server.base_url}?api-version=1&api-key={CANARY}") as client:
            attempt = await client.post(BODY)
    assert attempt.error_code == "invalid_response" and attempt.status_code is None
    no_key_in(attempt)


async def test_invalid_response_is_raised_by_the_transport() -> None:
    server = hostile.HostileServer(hostile.raw_bytes(b"HTTP/1.1 abc nonsense\r\n\r\n"))
    with server.running(), pytest.raises(InvalidResponse) as caught:
        async with transport().post(f"{server.base_url}/chat/completions", b"{}"):
            pass
    assert "invalid HTTP status-code" in str(caught.value)


# --- bodies: cut off, too slow, too large, streamed --------------------------------------------


async def test_a_body_that_breaks_off_is_a_body_error() -> None:
    raw = json.dumps(hostile.GOOD_ANSWER).encode()
    server = hostile.HostileServer(hostile.truncated(raw, sent=20))
    with server.running():
        t = transport()
        async with t.post(f"{server.base_url}/chat/completions", b"{}") as reply:
            assert reply.status == 200
            with pytest.raises(BodyError, match="end of file"):
                await reply.read()
        await t.aclose()
        attempt, _ = await post_to(hostile.truncated(raw, sent=20))
    assert (attempt.status_code, attempt.error_code) == (200, "invalid_response")
    assert attempt.retryable


async def test_the_timeout_covers_a_body_that_trickles() -> None:
    # The status line comes at once; the body would take 20 s at a byte every 0.2 s.
    body = json.dumps(hostile.GOOD_ANSWER).encode()[:100]
    attempt, _ = await post_to(hostile.trickle(body, every_s=0.2), timeout_s=0.5)
    assert attempt.error_code == "timeout" and attempt.retryable
    assert "no answer within 0.5 s" in (attempt.error_message or "")


async def test_the_timeout_covers_waiting_for_the_status_line() -> None:
    def silent(seen: hostile.Seen, conn: socket.socket) -> None:
        time.sleep(3)

    server = hostile.HostileServer(silent)
    with server.running(), pytest.raises(TransportTimeout):
        async with transport(timeout_s=0.3).post(f"{server.base_url}/chat/completions", b"{}"):
            pass


async def test_the_size_cap_holds_for_a_gzip_bomb_and_an_announced_length() -> None:
    bomb, _ = await post_to(hostile.gzip_bomb(4 << 20), max_response_bytes=1 << 20)
    assert (bomb.status_code, bomb.error_code, bomb.retryable) == (200, "response_too_large", False)
    big = json.dumps({**hostile.GOOD_ANSWER, "pad": "x" * 5000}).encode()
    large, _ = await post_to(hostile.answer(200, big), max_response_bytes=4096)
    assert (large.error_code, large.retryable) == ("response_too_large", False)
    fits, _ = await post_to(hostile.answer(200, big), max_response_bytes=len(big))
    assert fits.ok


async def test_a_streamed_answer_is_read_as_it_comes_and_equals_the_plain_one() -> None:
    config = SimConfig(latency_ms=5, stream_chunk_ms=2, max_completion_tokens=12)
    with running_sim(config) as sim:
        t = transport()
        content = json.dumps({**BODY, "stream": True}).encode()
        async with t.post(f"{sim.base_url}/chat/completions", content) as reply:
            assert "text/event-stream" in reply.headers["Content-Type"]
            pieces = [piece async for piece in reply.chunks()]
        await t.aclose()
        async with native(sim.base_url) as client:
            plain = await client.post(BODY)
            usage = {"include_usage": True}
            streamed = await client.post({**BODY, "stream": True, "stream_options": usage})
    assert len(pieces) > 3  # one event a word, as the server sent them
    assert b"".join(pieces).rstrip().endswith(b"data: [DONE]")
    assert plain.ok and streamed.ok and streamed.ttft_s is not None
    plain.body.pop("created"), streamed.body.pop("created")
    assert streamed.body == plain.body


async def test_a_stream_cut_off_is_a_retryable_error() -> None:
    def cut(seen: hostile.Seen, conn: socket.socket) -> None:
        conn.sendall(hostile.head(200, {"Content-Type": "text/event-stream"}))
        conn.sendall(b'data: {"id": "x", "choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n')

    attempt, _ = await post_to(cut, timeout_s=5)
    # no Content-Length and the connection closed: the stream ended without [DONE]
    assert (attempt.status_code, attempt.error_code) == (200, "invalid_response")
    assert attempt.retryable


# --- the pool, choosing, closing ---------------------------------------------------------------


async def test_connections_are_kept_alive_and_no_more_than_the_pool_allows() -> None:
    import anyio

    peers: list[tuple[str, int]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        peers.append(tuple(scope["client"]))
        await anyio.sleep(0.002)
        raw = json.dumps(hostile.GOOD_ANSWER).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": raw})

    results: list[bool] = []
    with serving(app) as base_url:
        async with native(base_url, max_connections=4) as client:

            async def worker() -> None:
                for _ in range(25):
                    results.append((await client.post(BODY)).ok)

            async with anyio.create_task_group() as group:
                for _ in range(8):  # more workers than connections: they wait their turn
                    group.start_soon(worker)
    assert results == [True] * 200 and len(peers) == 200
    assert 1 <= len(set(peers)) <= 4  # 200 answers over at most 4 connections


def test_http_and_an_httpx_transport_are_not_given_together() -> None:
    mock = httpx.MockTransport(lambda request: httpx.Response(200))
    with pytest.raises(ValueError, match="not both"):
        ChatClient("http://x/v1", api_key=None, http="pyreqwest", transport=mock)


async def test_the_transport_raises_only_its_own_errors() -> None:
    t = transport()
    with pytest.raises(TransportError) as caught:
        async with t.post(f"http://127.0.0.1:{free_port()}/v1/chat/completions", b"{}"):
            pass
    await t.aclose()
    assert caught.value.connect_failure == "refused"
    assert type(caught.value) is TransportError


_EXITS = """
import asyncio, sys
from batcher.http.client import ChatClient

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

async def main(url):
    async with ChatClient(url, api_key=None, http="pyreqwest", max_connections=64) as client:
        answers = await asyncio.gather(*(client.post(BODY) for _ in range(256)))
    assert all(a.ok for a in answers)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
def test_a_process_that_closed_the_client_exits_cleanly() -> None:
    # The process exits right after its run. Without the pause in aclose, 3 of 40 such
    # processes aborted as the interpreter exited (so a dozen catch that one time in three).
    with running_sim() as sim:
        runs = [
            subprocess.run(
                [sys.executable, "-c", _EXITS, sim.base_url],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            for _ in range(12)
        ]
    assert [(run.returncode, run.stderr) for run in runs] == [(0, "")] * 12
