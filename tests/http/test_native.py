"""The pyreqwest transport (``batcher.http.native``) over real loopback sockets: what only it
does. The promises every client keeps are tested for it in ``test_transports.py``; here, that
its messages are made of pyreqwest's causes (and name no URL), that a header it cannot send is
not quoted, and that a process exits cleanly after closing it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from batcher.http.client import ChatClient
from batcher.http.transport import BodyError, InvalidResponse
from batcher.sim.serve import running_sim
from tests import hostile
from tests.helpers import ROOT, free_port

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


# --- answers -----------------------------------------------------------------------------------


async def test_invalid_response_is_raised_by_the_transport() -> None:
    server = hostile.HostileServer(hostile.raw_bytes(b"HTTP/1.1 abc nonsense\r\n\r\n"))
    with server.running(), pytest.raises(InvalidResponse) as caught:
        async with transport().post(f"{server.base_url}/chat/completions", b"{}"):
            pass
    assert "invalid HTTP status-code" in str(caught.value)


# --- bodies ------------------------------------------------------------------------------------


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


# --- the pool, choosing, closing ---------------------------------------------------------------


def test_http_and_an_httpx_transport_are_not_given_together() -> None:
    mock = httpx.MockTransport(lambda request: httpx.Response(200))
    with pytest.raises(ValueError, match="not both"):
        ChatClient("http://x/v1", api_key=None, http="pyreqwest", transport=mock)


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
