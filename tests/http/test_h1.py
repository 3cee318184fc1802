"""batcher's own HTTP/1.1 transport (``batcher.http.h1``, the default) over real loopback sockets.

The promises every client keeps are tested for it in ``test_transports.py``; here, what a pool
and a parser of its own must get right: the request as sent (HTTP/1.1, its headers, the path
percent-encoded, the host in IDNA 2008, Basic auth from the URL), connections reused only when
an answer was read to its end and the server lets them stay open, no more of them than
allowed, a cancelled request's connection closed and its place given back, interim answers
skipped, chunked and until-close bodies read whole, and nothing of one answer (trailers, a
stray second answer, an unread body) leaking into the next.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from batcher.http.client import ChatClient
from batcher.http.h1 import H1Transport
from batcher.http.transport import TransportTimeout
from tests import hostile
from tests.helpers import free_port

pytestmark = pytest.mark.anyio

CANARY = "sk-canary-h1-5b0e-not-a-real-key"
BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
GOOD = json.dumps(hostile.GOOD_ANSWER).encode()
#: The .invalid top-level domain never resolves (RFC 2606): no request leaves this machine.
NOWHERE = "http://does-not-exist.invalid/v1"


def client_for(base_url: str, **kw: Any) -> ChatClient:
    """A ChatClient over the default transport, with a key to look for in messages."""
    kw.setdefault("timeout_s", 10)
    return ChatClient(base_url, api_key=CANARY, **kw)


def transport(timeout_s: float = 10, max_connections: int = 4) -> H1Transport:
    headers = {"authorization": f"Bearer {CANARY}", "content-type": "application/json"}
    return H1Transport(
        headers=headers,
        max_connections=max_connections,
        timeout_s=timeout_s,
        connect_timeout_s=timeout_s,
    )


async def post_to(behaviour: hostile.Behaviour, **kw: Any) -> Any:
    """One ChatClient post to a hostile server; the attempt and what the server saw."""
    server = hostile.HostileServer(behaviour)
    with server.running():
        async with client_for(server.base_url, **kw) as client:
            attempt = await client.post(BODY)
    return attempt, server.seen


def no_key_in(attempt: Any) -> None:
    text = f"{attempt.error_message} {attempt!r}"
    assert CANARY not in text and "Bearer" not in text


def kept_open(status: int = 200, body: bytes = GOOD, **headers: str) -> bytes:
    """An answer that lets the connection stay open (no ``Connection: close``)."""
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


CLOSE = "close"


class KeepAliveServer:
    """Answers every request on a connection in turn (``answers`` gives the bytes of the n-th
    request on that connection, or None to close it unanswered, or the bytes and ``CLOSE`` to
    close it right after them); counts connections and requests."""

    def __init__(self, answers: Any) -> None:
        self.answers = answers
        self.connections = 0
        self.requests = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._stop = threading.Event()
        self.base_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1"

    @contextlib.contextmanager
    def running(self) -> Iterator[KeepAliveServer]:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=5)
            self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            buffer = b""
            for turn in range(1 << 20):
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                self.requests += 1
                answer = self.answers(turn)
                if answer is None:
                    return
                if isinstance(answer, tuple):
                    conn.sendall(answer[0])
                    return
                conn.sendall(answer)


# --- connecting --------------------------------------------------------------------------------


async def test_a_name_whose_every_address_refuses_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # localhost is ::1 and 127.0.0.1 on many machines: both refuse while a server starts. Here
    # it is one address, so the resolver answers two loopback addresses for it (the one stand-in
    # in this module: the connections to them are real, and refused).
    port = free_port()
    loop = asyncio.get_running_loop()
    both = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
    ]

    async def two_addresses(host: str, *args: Any, **kw: Any) -> list[Any]:
        return both if host == "localhost" else await real(host, *args, **kw)

    real = loop.getaddrinfo
    monkeypatch.setattr(loop, "getaddrinfo", two_addresses)
    async with client_for(f"http://localhost:{port}/v1") as client:
        attempt = await client.post(BODY)
    assert (attempt.error_code, attempt.connect_failure) == ("connection_error", "refused")
    assert "127.0.0.1" in (message := attempt.error_message or "") and "127.0.0.2" in message


async def test_a_header_it_cannot_send_is_not_quoted() -> None:
    with pytest.raises(ValueError) as caught:
        H1Transport(
            headers={"authorization": f"Bearer {CANARY}\u2028"},
            max_connections=1,
            timeout_s=5,
            connect_timeout_s=5,
        )
    assert CANARY not in str(caught.value) and "Bearer" not in str(caught.value)


async def test_a_url_it_cannot_send_to_is_a_connection_error() -> None:
    async with client_for("http://127.0.0.1:99999/v1") as client:
        attempt = await client.post(BODY)
    assert attempt.error_code == "connection_error" and "invalid URL" in (
        attempt.error_message or ""
    )


async def test_the_request_is_sent_as_http_1_1_with_the_key_once() -> None:
    server = hostile.HostileServer(hostile.answer())
    with server.running():
        async with client_for(f"{server.base_url}?api-version=2") as client:
            attempt = await client.post(BODY)
    assert attempt.ok and attempt.usage is not None and attempt.usage.total_tokens == 6
    (request,) = server.seen
    assert request.method == "POST" and request.target == "/v1/chat/completions?api-version=2"
    assert request.headers["authorization"] == f"Bearer {CANARY}"
    assert request.headers["host"] == f"127.0.0.1:{server.port}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept-encoding"] == "gzip, deflate"
    assert request.headers["user-agent"] == "batcher/0.1.0"
    assert json.loads(request.body) == BODY
    assert "cookie" not in request.headers


async def test_credentials_in_the_url_are_sent_as_basic_auth() -> None:
    server = hostile.HostileServer(hostile.answer())
    with server.running():
        url = f"http://ann:p%40ss@127.0.0.1:{server.port}/v1"
        async with ChatClient(url, api_key=None, timeout_s=10) as client:
            attempt = await client.post(BODY)
    assert attempt.ok
    (request,) = server.seen
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"ann:p@ss").decode()
    assert request.headers["host"] == f"127.0.0.1:{server.port}"


# --- answers -----------------------------------------------------------------------------------


async def test_headers_are_found_in_any_case_and_repeated_ones_joined() -> None:
    headers = {"X-Request-ID": "req-7", "Retry-After": "3", "X-RateLimit-Limit-Requests": "60"}
    attempt, _ = await post_to(hostile.answer(429, {"error": {"message": "slow"}}, headers=headers))
    assert attempt.status_code == 429 and attempt.retryable
    assert attempt.request_id == "req-7" and attempt.retry_after == 3.0
    assert attempt.headers["x-ratelimit-limit-requests"] == "60"
    assert attempt.headers["X-RATELIMIT-LIMIT-REQUESTS"] == "60"
    assert "Retry-After" in attempt.headers
    twice = b"HTTP/1.1 200 OK\r\nVia: a\r\nVia: b\r\nContent-Length: 2\r\n\r\n{}"
    server = hostile.HostileServer(hostile.raw_bytes(twice))
    with server.running():
        t = transport()
        async with t.post(f"{server.base_url}/chat/completions", b"{}") as reply:
            assert reply.headers["via"] == "a, b" and await reply.read() == b"{}"
        await t.aclose()


@pytest.mark.parametrize("wbits", [31, 15], ids=["gzip", "deflate"])
async def test_a_compressed_body_is_decoded(wbits: int) -> None:
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    packed = packer.compress(GOOD) + packer.flush()
    encoding = "gzip" if wbits == 31 else "deflate"
    behaviour = hostile.answer(200, packed, headers={"Content-Encoding": encoding})
    attempt, _ = await post_to(behaviour)
    assert attempt.ok and attempt.body == hostile.GOOD_ANSWER


@pytest.mark.parametrize(
    ("body", "encoding"), [(b"not gzip", "gzip"), (GOOD, "br"), (zlib.compress(GOOD)[:20], "gzip")]
)
async def test_a_body_that_is_not_its_encoding_is_a_broken_answer(
    body: bytes, encoding: str
) -> None:
    behaviour = hostile.answer(200, body, headers={"Content-Encoding": encoding})
    attempt, _ = await post_to(behaviour)
    assert (attempt.status_code, attempt.error_code) == (200, "invalid_response")
    assert attempt.retryable


async def test_interim_answers_are_skipped() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
    server = hostile.HostileServer(hostile.raw_bytes(interim + kept_open()))
    with server.running():
        async with client_for(server.base_url) as client:
            attempt = await client.post(BODY)
    assert attempt.ok and attempt.status_code == 200 and "link" not in (attempt.headers or {})


async def test_a_chunked_body_and_one_that_ends_at_close_are_read_whole() -> None:
    pieces = [GOOD[:10], GOOD[10:100], GOOD[100:]]
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    by_chunks = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked
    until_close = head + b"Connection: close\r\n\r\n" + GOOD
    for raw in (by_chunks, until_close):
        attempt, _ = await post_to(hostile.raw_bytes(raw))
        assert attempt.ok and attempt.body == hostile.GOOD_ANSWER


# --- bodies ------------------------------------------------------------------------------------


async def test_a_body_longer_than_its_content_length_is_a_broken_answer() -> None:
    attempt, _ = await post_to(
        hostile.answer(200, GOOD + b"trailing junk", content_length=len(GOOD))
    )
    assert (attempt.status_code, attempt.error_code) == (200, "invalid_response")


# --- the pool ----------------------------------------------------------------------------------


async def test_a_connection_is_reused_and_an_answers_headers_stay_its_own() -> None:
    with KeepAliveServer(lambda turn: kept_open(x_turn=str(turn))).running() as server:
        async with client_for(server.base_url) as client:
            attempts = [await client.post(BODY) for _ in range(5)]
    assert [(a.headers or {}).get("x-turn") for a in attempts] == ["0", "1", "2", "3", "4"]
    assert (server.connections, server.requests) == (1, 5)


async def test_a_connection_the_server_closes_is_not_reused() -> None:
    # "Connection: close" on each answer; and a server that closes without saying so
    said = KeepAliveServer(lambda turn: kept_open(connection="close") if turn == 0 else None)
    with said.running():
        async with client_for(said.base_url) as client:
            attempts = [await client.post(BODY) for _ in range(3)]
    assert all(a.ok for a in attempts) and said.connections == 3

    silent = KeepAliveServer(lambda turn: (kept_open(), CLOSE))
    with silent.running():
        async with client_for(silent.base_url) as client:
            first = await client.post(BODY)
            await anyio.sleep(0.2)  # the server has hung up on the idle connection by now
            second = await client.post(BODY)
    assert first.ok and second.ok and silent.connections == 2

    # A server that closes a kept-alive connection as the next request arrives: that request
    # got no answer and the engine retries it; the connection is not used again.
    abrupt = KeepAliveServer(lambda turn: None if turn else kept_open())
    with abrupt.running():
        async with client_for(abrupt.base_url) as client:
            attempts = [await client.post(BODY) for _ in range(3)]
    assert [(a.ok, a.error_code) for a in attempts] == [
        (True, None),
        (False, "connection_error"),
        (True, None),
    ]
    assert attempts[1].retryable and attempts[1].connect_failure is None


async def test_a_cancelled_request_closes_its_connection_and_gives_back_its_place() -> None:
    hung = threading.Event()

    def behaviour(seen: hostile.Seen, conn: socket.socket) -> None:
        if seen.body == b'"slow"':
            hung.wait(5)  # holds the request until the test ends
            return
        conn.sendall(hostile.head(200, {"Content-Length": str(len(GOOD))}) + GOOD)

    server = hostile.HostileServer(behaviour)
    with server.running():
        t = transport(max_connections=1)
        url = f"{server.base_url}/chat/completions"
        with anyio.move_on_after(0.3) as scope:
            async with t.post(url, b'"slow"'):
                pass
        assert scope.cancelled_caught
        with anyio.fail_after(3):  # the one place in the pool is free again
            async with t.post(url, b'"fast"') as reply:
                assert reply.status == 200 and await reply.read() == GOOD
        hung.set()
        await t.aclose()
    assert [s.body for s in server.seen] == [b'"slow"', b'"fast"']


async def test_waiting_for_a_place_in_the_pool_counts_toward_the_timeout() -> None:
    hung = threading.Event()

    def silent(seen: hostile.Seen, conn: socket.socket) -> None:
        hung.wait(5)

    server = hostile.HostileServer(silent)
    with server.running():
        t = transport(timeout_s=0.3, max_connections=1)
        url = f"{server.base_url}/chat/completions"

        async def post() -> str:
            try:
                async with t.post(url, b"{}"):
                    return "answered"
            except TransportTimeout as exc:
                return str(exc)

        async with anyio.create_task_group() as group:
            outcomes: list[str] = []

            async def one() -> None:
                outcomes.append(await post())

            group.start_soon(one)
            group.start_soon(one)
        hung.set()
        await t.aclose()
    assert outcomes == ["no answer within 0.3 s"] * 2
    assert len(server.seen) == 1  # the second never got a connection


# --- what an answer brings must stay with it ---------------------------------------------------


def chunked(body: bytes, *, trailer: str = "", **headers: str) -> bytes:
    """A chunked answer that lets the connection stay open, with an optional trailer."""
    lines = ["HTTP/1.1 200 OK", "Transfer-Encoding: chunked", "Content-Type: application/json"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    end = f"0\r\n{trailer}\r\n\r\n" if trailer else "0\r\n\r\n"
    return (
        ("\r\n".join(lines) + "\r\n\r\n").encode()
        + b"%x\r\n%b\r\n" % (len(body), body)
        + (end.encode())
    )


async def test_a_chunked_answers_trailers_stay_out_of_the_next_answers_headers() -> None:
    def answers(turn: int) -> bytes:
        trailer = "X-Ratelimit-Remaining-Requests: 0"
        return chunked(GOOD, trailer=trailer, x_request_id=f"req-{turn}")

    with KeepAliveServer(answers).running() as server:
        async with client_for(server.base_url) as client:
            attempts = [await client.post(BODY) for _ in range(3)]
    assert [a.request_id for a in attempts] == ["req-0", "req-1", "req-2"]
    assert all("x-ratelimit-remaining-requests" not in (a.headers or {}) for a in attempts)
    assert server.connections == 1


async def test_an_empty_compressed_body_is_an_empty_body() -> None:
    # a 429 with nothing in it: its retry-after must still be heard
    headers = {"Content-Encoding": "gzip", "Retry-After": "7"}
    attempt, _ = await post_to(hostile.answer(429, b"", headers=headers))
    assert (attempt.status_code, attempt.error_code, attempt.retry_after) == (429, "http_429", 7.0)


async def test_deflate_without_its_zlib_header_is_decoded() -> None:
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate, as some send
    raw = packer.compress(GOOD) + packer.flush()
    attempt, _ = await post_to(hostile.answer(200, raw, headers={"Content-Encoding": "deflate"}))
    assert attempt.ok and attempt.body == hostile.GOOD_ANSWER


async def test_a_second_answer_sent_after_an_answer_breaks_it() -> None:
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Stray: 1\r\n\r\nEXTRA"
    server = KeepAliveServer(lambda turn: kept_open() + stray)
    with server.running():
        async with client_for(server.base_url) as client:
            first = await client.post(BODY)
            second = await client.post(BODY)
    assert (first.status_code, first.error_code) == (200, "invalid_response")
    assert first.retryable and "x-stray" not in (first.headers or {})
    assert second.status_code == 200 and server.connections == 2  # the first was not reused


async def test_an_answer_left_unread_is_not_read_as_the_next_ones() -> None:
    answers = [json.dumps({"answer": n}).encode() for n in range(2)]
    server: KeepAliveServer = KeepAliveServer(
        lambda turn: kept_open(body=answers[server.requests - 1])
    )
    with server.running():
        t = transport()
        url = f"{server.base_url}/chat/completions"
        async with t.post(url, b"{}") as reply:
            assert reply.status == 200  # and its body never read
        async with t.post(url, b"{}") as reply:
            second = await reply.read()
        await t.aclose()
    assert second == answers[1] and server.connections == 2


async def test_the_path_and_query_are_percent_encoded_once() -> None:
    server = hostile.HostileServer(hostile.answer())
    with server.running():
        url = f"{server.origin}/v1/my deployment/d\u00e9ploiement/a%2Fb?api-version=2024 01&x=%41"
        async with client_for(url) as client:
            attempt = await client.post(BODY)
    assert attempt.ok
    assert server.seen[0].target == (
        "/v1/my%20deployment/d%C3%A9ploiement/a%2Fb/chat/completions?api-version=2024%2001&x=%41"
    )


def test_an_international_host_name_is_sent_in_its_idna_2008_form() -> None:
    t = transport()
    target = t.post("http://stra\u00dfe.example/v1/chat/completions", b"{}")._target
    assert target.origin == ("http", "xn--strae-oqa.example", 80)
    assert b"\r\nhost: xn--strae-oqa.example\r\n" in target.head


async def test_a_host_name_that_cannot_be_encoded_is_a_connection_error() -> None:
    too_long = "\u00e9" * 70  # a label past 63 characters once encoded
    async with client_for(f"http://{too_long}.example/v1") as client:
        attempt = await client.post(BODY)
    assert attempt.error_code == "connection_error" and "invalid URL" in (
        attempt.error_message or ""
    )


async def test_a_switch_of_protocols_is_an_invalid_response_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    attempt, _ = await post_to(hostile.raw_bytes(switch + b"\x81\x05hello"))
    assert attempt.error_code == "invalid_response" and "101" in attempt.error_message
    assert "Fatal error" not in caplog.text and "Traceback" not in caplog.text


async def test_a_place_in_the_pool_given_to_a_request_that_leaves_goes_to_the_next() -> None:
    def slow(seen: hostile.Seen, conn: socket.socket) -> None:
        time.sleep(0.2)
        conn.sendall(hostile.head(200, {"Content-Length": str(len(GOOD))}) + GOOD)

    server = hostile.HostileServer(slow)
    with server.running():
        t = transport(timeout_s=5, max_connections=1)
        url = f"{server.base_url}/chat/completions"
        tasks: dict[str, asyncio.Task[bytes]] = {}

        async def post(name: str) -> bytes:
            async with t.post(url, b"{}") as reply:
                body = await reply.read()
            if name == "first":
                # the first's place is now "second"'s, which leaves before it can take it
                tasks["second"].cancel()
            return body

        tasks["first"] = asyncio.create_task(post("first"))
        await asyncio.sleep(0.05)
        tasks["second"] = asyncio.create_task(post("second"))
        await asyncio.sleep(0.05)
        tasks["third"] = asyncio.create_task(post("third"))
        with anyio.fail_after(3):  # without the place passed on: the third waits out its 5 s
            third = await tasks["third"]
        assert await tasks["first"] == GOOD and tasks["second"].cancelled() and third == GOOD
        await t.aclose()
