"""What every HTTP client under ``ChatClient`` promises, over real loopback sockets, for each
of them: batcher's own (the default), aiohttp's, and pyreqwest (when installed).

Errors mapped to the transport's own (a refused port and a name that does not exist told
apart, a TLS error, a status line that is not HTTP), no key in any message, the key sent once,
no proxy taken from the environment, no redirect followed, headers in any case, gzip decoded,
a body that breaks off or lies about its encoding is an answer error, one timeout over the
whole attempt, the size cap kept, streams read as they come, and the pool's bound. What only
one client does is in ``test_h1.py`` and ``test_native.py``.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from batcher.http.client import ChatClient, HttpLibrary
from batcher.http.h1 import H1Transport
from batcher.http.transport import (
    AiohttpTransport,
    BodyError,
    InvalidResponse,
    Transport,
    TransportError,
    TransportTimeout,
)
from batcher.sim.config import SimConfig
from batcher.sim.serve import running_sim
from tests import hostile
from tests.helpers import free_port
from tests.loopback import read_body, serving

pytestmark = pytest.mark.anyio

CANARY = "sk-canary-transports-41d2-not-a-real-key"
BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
GOOD = json.dumps(hostile.GOOD_ANSWER).encode()
#: The .invalid top-level domain never resolves (RFC 2606): no request leaves this machine.
NOWHERE = "http://does-not-exist.invalid/v1"
_NO_PYREQWEST = importlib.util.find_spec("pyreqwest") is None


@pytest.fixture(
    params=[
        "httptools",
        "aiohttp",
        pytest.param(
            "pyreqwest", marks=pytest.mark.skipif(_NO_PYREQWEST, reason="the native extra")
        ),
    ]
)
def http(request: pytest.FixtureRequest) -> HttpLibrary:
    """Each HTTP client in turn."""
    name: HttpLibrary = request.param
    return name


def client_for(http: HttpLibrary, base_url: str, **kw: Any) -> ChatClient:
    """A ChatClient over ``http``, with a key to look for in messages."""
    kw.setdefault("timeout_s", 10)
    return ChatClient(base_url, api_key=CANARY, http=http, **kw)


def transport(http: HttpLibrary, timeout_s: float = 10) -> Transport:
    """The bare transport of ``http`` (as ChatClient makes it)."""
    headers = {"authorization": f"Bearer {CANARY}", "content-type": "application/json"}
    kw: dict[str, Any] = {
        "headers": headers,
        "max_connections": 4,
        "timeout_s": timeout_s,
        "connect_timeout_s": timeout_s,
    }
    if http == "httptools":
        return H1Transport(**kw)
    if http == "aiohttp":
        return AiohttpTransport(**kw)
    from batcher.http.native import ReqwestTransport

    return ReqwestTransport(**kw)


async def post_to(
    http: HttpLibrary, behaviour: hostile.Behaviour, *, host: str = "127.0.0.1", **kw: Any
) -> Any:
    """One ChatClient post to a hostile server; the attempt and what the server saw."""
    server = hostile.HostileServer(behaviour)
    with server.running():
        async with client_for(http, f"http://{host}:{server.port}/v1", **kw) as client:
            attempt = await client.post(BODY)
    return attempt, server.seen


def no_key_in(attempt: Any) -> None:
    text = f"{attempt.error_message} {attempt!r}"
    assert CANARY not in text and "Bearer" not in text


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


# --- connecting --------------------------------------------------------------------------------


async def test_a_refused_port_and_a_missing_host_are_told_apart(http: HttpLibrary) -> None:
    async with client_for(http, f"http://127.0.0.1:{free_port()}/v1") as client:
        refused = await client.post(BODY)
    async with client_for(http, NOWHERE) as client:
        missing = await client.post(BODY)
    assert (refused.error_code, refused.connect_failure) == ("connection_error", "refused")
    assert (missing.error_code, missing.connect_failure) == ("connection_error", "dns")
    assert refused.retryable and refused.status_code is None
    no_key_in(refused)
    no_key_in(missing)


async def test_a_tls_error_carries_no_key(http: HttpLibrary) -> None:
    with not_tls() as port:
        async with client_for(http, f"https://127.0.0.1:{port}/v1") as client:
            attempt = await client.post(BODY)
    assert attempt.error_code == "connection_error" and attempt.status_code is None
    assert attempt.connect_failure is None
    no_key_in(attempt)


async def test_the_key_is_sent_once_as_a_header(http: HttpLibrary) -> None:
    attempt, seen = await post_to(http, hostile.answer())
    assert attempt.ok and attempt.usage is not None and attempt.usage.total_tokens == 6
    (request,) = seen
    assert request.headers["authorization"] == f"Bearer {CANARY}"
    assert request.method == "POST" and request.target == "/v1/chat/completions"
    assert json.loads(request.body) == BODY
    assert "cookie" not in request.headers


async def test_no_proxy_is_taken_from_the_environment(
    http: HttpLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = hostile.HostileServer(hostile.answer())
    with proxy.running():
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.origin)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        # localhost, not 127.0.0.1: some clients never proxy a literal loopback address
        attempt, seen = await post_to(http, hostile.answer(), host="localhost")
    assert proxy.seen == []  # the key went to the endpoint only
    assert attempt.ok and len(seen) == 1


# --- answers -----------------------------------------------------------------------------------


async def test_a_redirect_is_an_answer_and_is_not_followed(http: HttpLibrary) -> None:
    recorder = hostile.HostileServer(hostile.answer())
    with recorder.running():
        target = f"{recorder.origin}/v1/chat/completions"
        attempt, seen = await post_to(http, hostile.redirect(307, target))
    assert recorder.seen == []  # nothing, the key least of all, reached the other origin
    assert len(seen) == 1
    assert (attempt.status_code, attempt.error_code) == (307, "redirect")
    assert recorder.origin in (attempt.error_message or "")


async def test_headers_are_found_in_any_case(http: HttpLibrary) -> None:
    headers = {"X-Request-ID": "req-7", "Retry-After": "3", "X-RateLimit-Limit-Requests": "60"}
    answer = hostile.answer(429, {"error": {"message": "slow"}}, headers=headers)
    attempt, _ = await post_to(http, answer)
    assert attempt.status_code == 429 and attempt.retryable and attempt.headers is not None
    assert attempt.request_id == "req-7" and attempt.retry_after == 3.0
    assert attempt.headers["x-ratelimit-limit-requests"] == "60"
    assert attempt.headers["X-RATELIMIT-LIMIT-REQUESTS"] == "60"


async def test_a_gzip_body_is_decoded(http: HttpLibrary) -> None:
    packed = gzip.compress(GOOD)
    answer = hostile.answer(200, packed, headers={"Content-Encoding": "gzip"})
    attempt, _ = await post_to(http, answer)
    assert attempt.ok and attempt.body == hostile.GOOD_ANSWER


async def test_a_body_that_is_not_its_encoding_is_a_broken_answer(http: HttpLibrary) -> None:
    answer = hostile.answer(200, b"not gzip", headers={"Content-Encoding": "gzip"})
    attempt, _ = await post_to(http, answer)
    assert (attempt.status_code, attempt.error_code) == (200, "invalid_response")
    assert attempt.retryable


async def test_a_status_line_that_is_not_http_is_an_invalid_response(http: HttpLibrary) -> None:
    server = hostile.HostileServer(hostile.raw_bytes(b"HTTP/1.1 abc nonsense\r\n\r\n"))
    with server.running():
        url = f"{server.base_url}?api-version=1&api-key={CANARY}"
        async with client_for(http, url) as client:
            attempt = await client.post(BODY)
        t = transport(http)
        with pytest.raises(InvalidResponse):
            async with t.post(f"{server.base_url}/chat/completions", b"{}"):
                pass
        await t.aclose()
    assert attempt.error_code == "invalid_response" and attempt.status_code is None
    no_key_in(attempt)


# --- bodies: cut off, too slow, too large, streamed --------------------------------------------


async def test_a_body_that_breaks_off_is_a_body_error(http: HttpLibrary) -> None:
    server = hostile.HostileServer(hostile.truncated(GOOD, sent=20))
    with server.running():
        t = transport(http)
        async with t.post(f"{server.base_url}/chat/completions", b"{}") as reply:
            assert reply.status == 200
            with pytest.raises(BodyError):
                await reply.read()
        await t.aclose()
    attempt, _ = await post_to(http, hostile.truncated(GOOD, sent=20))
    assert (attempt.status_code, attempt.error_code) == (200, "invalid_response")
    assert attempt.retryable


async def test_the_timeout_covers_a_body_that_trickles(http: HttpLibrary) -> None:
    # The status line comes at once; the body would take 20 s at a byte every 0.2 s.
    attempt, _ = await post_to(http, hostile.trickle(GOOD[:100], every_s=0.2), timeout_s=0.5)
    assert attempt.error_code == "timeout" and attempt.retryable
    assert "no answer within 0.5 s" in (attempt.error_message or "")


async def test_the_timeout_covers_waiting_for_the_status_line(http: HttpLibrary) -> None:
    def silent(seen: hostile.Seen, conn: socket.socket) -> None:
        time.sleep(3)

    server = hostile.HostileServer(silent)
    t = transport(http, timeout_s=0.3)
    with server.running(), pytest.raises(TransportTimeout):
        async with t.post(f"{server.base_url}/chat/completions", b"{}"):
            pass
    await t.aclose()


async def test_the_size_cap_holds_for_a_gzip_bomb_and_an_announced_length(
    http: HttpLibrary,
) -> None:
    bomb, _ = await post_to(http, hostile.gzip_bomb(4 << 20), max_response_bytes=1 << 20)
    assert (bomb.status_code, bomb.error_code, bomb.retryable) == (200, "response_too_large", False)
    big = json.dumps({**hostile.GOOD_ANSWER, "pad": "x" * 5000}).encode()
    large, _ = await post_to(http, hostile.answer(200, big), max_response_bytes=4096)
    assert (large.error_code, large.retryable) == ("response_too_large", False)
    fits, _ = await post_to(http, hostile.answer(200, big), max_response_bytes=len(big))
    assert fits.ok


async def test_a_streamed_answer_is_read_as_it_comes_and_equals_the_plain_one(
    http: HttpLibrary,
) -> None:
    config = SimConfig(latency_ms=5, stream_chunk_ms=2, max_completion_tokens=12)
    with running_sim(config) as sim:
        t = transport(http)
        content = json.dumps({**BODY, "stream": True}).encode()
        async with t.post(f"{sim.base_url}/chat/completions", content) as reply:
            assert "text/event-stream" in reply.headers["Content-Type"]
            pieces = [piece async for piece in reply.chunks()]
        await t.aclose()
        async with client_for(http, sim.base_url) as client:
            plain = await client.post(BODY)
            usage = {"include_usage": True}
            streamed = await client.post({**BODY, "stream": True, "stream_options": usage})
    assert len(pieces) > 3  # one event a word, as the server sent them
    assert b"".join(pieces).rstrip().endswith(b"data: [DONE]")
    assert plain.ok and streamed.ok and streamed.ttft_s is not None
    assert plain.body is not None and streamed.body is not None
    plain.body.pop("created"), streamed.body.pop("created")
    assert streamed.body == plain.body


async def test_a_stream_cut_off_is_a_retryable_error(http: HttpLibrary) -> None:
    def cut(seen: hostile.Seen, conn: socket.socket) -> None:
        conn.sendall(hostile.head(200, {"Content-Type": "text/event-stream"}))
        conn.sendall(b'data: {"id": "x", "choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n')

    attempt, _ = await post_to(http, cut, timeout_s=5)
    # no Content-Length and the connection closed: the stream ended without [DONE]
    assert (attempt.status_code, attempt.error_code) == (200, "invalid_response")
    assert attempt.retryable


# --- the pool ----------------------------------------------------------------------------------


async def test_connections_are_kept_alive_and_no_more_than_the_pool_allows(
    http: HttpLibrary,
) -> None:
    peers: list[tuple[str, int]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        peers.append(tuple(scope["client"]))
        await anyio.sleep(0.002)
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": GOOD})

    results: list[bool] = []
    with serving(app) as base_url:
        async with client_for(http, base_url, max_connections=4) as client:

            async def worker() -> None:
                for _ in range(25):
                    results.append((await client.post(BODY)).ok)

            async with anyio.create_task_group() as group:
                for _ in range(8):  # more workers than connections: they wait their turn
                    group.start_soon(worker)
    assert results == [True] * 200 and len(peers) == 200
    assert 1 <= len(set(peers)) <= 4  # 200 answers over at most 4 connections


async def test_the_transport_raises_only_its_own_errors(http: HttpLibrary) -> None:
    t = transport(http)
    with pytest.raises(TransportError) as caught:
        async with t.post(f"http://127.0.0.1:{free_port()}/v1/chat/completions", b"{}"):
            pass
    await t.aclose()
    assert caught.value.connect_failure == "refused"
    assert type(caught.value) is TransportError
