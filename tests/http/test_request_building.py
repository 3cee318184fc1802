"""A request the HTTP client cannot build: a header that cannot be sent, a URL it cannot parse.

aiohttp and pyreqwest report the same thing for the same bad input, over loopback against the
simulator, and no message carries the key or the header's value.
"""

from __future__ import annotations

from typing import Any

import pytest

from batcher.http.client import ChatClient, HttpLibrary
from batcher.http.native import available
from batcher.sim.serve import running_sim

pytestmark = pytest.mark.anyio

CANARY = "sk-canary-building-5d2f-not-a-real-key"
BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
CLIENTS = [
    "aiohttp",
    pytest.param(
        "pyreqwest", marks=pytest.mark.skipif(not available(), reason="pyreqwest not installed")
    ),
]


@pytest.mark.parametrize("http", CLIENTS)
@pytest.mark.parametrize("value", [f"{CANARY}\n", f"{CANARY}\r\nx-injected: 1", f" {CANARY}"])
async def test_a_header_value_that_cannot_be_sent_is_refused_before_sending(
    http: HttpLibrary, value: str
) -> None:
    # aiohttp failed each request on it (an invalid_response record, retried); pyreqwest
    # refused to start with the value in its message
    with running_sim() as sim:
        with pytest.raises(ValueError) as caught:
            async with ChatClient(
                sim.base_url, api_key=None, headers={"api-key": value}, http=http
            ) as client:
                await client.post(BODY)
        received = sim.simulator.stats.requests_received
    assert "'api-key'" in str(caught.value) and CANARY not in str(caught.value)
    assert received == 0


@pytest.mark.parametrize("http", CLIENTS)
async def test_a_header_name_that_cannot_be_sent_is_refused_before_sending(
    http: HttpLibrary,
) -> None:
    with running_sim() as sim:
        with pytest.raises(ValueError, match="'api key' is not a valid header name"):
            ChatClient(sim.base_url, api_key=CANARY, headers={"api key": "v"}, http=http)
        assert sim.simulator.stats.requests_received == 0


async def _report(base_url: str, http: HttpLibrary) -> tuple[Any, ...]:
    async with ChatClient(base_url, api_key=CANARY, http=http, timeout_s=10) as client:
        attempt = await client.post(BODY)
    message = attempt.error_message or ""
    assert CANARY not in message and "Bearer" not in message
    return attempt.error_code, attempt.retryable, attempt.status_code, attempt.connect_failure


@pytest.mark.parametrize("http", CLIENTS)
@pytest.mark.parametrize("url", ["http://127.0.0.1:70000/v1", "ftp://127.0.0.1:{port}/v1"])
async def test_a_url_the_client_cannot_build_is_a_connection_error_as_over_aiohttp(
    http: HttpLibrary, url: str
) -> None:
    # pyreqwest's BuilderError (a ValueError) became an invalid_response record: an answer
    # the server never gave
    with running_sim() as sim:
        bad = url.format(port=sim.port)
        got = await _report(bad, http)
        over_aiohttp = await _report(bad, "aiohttp")
        received = sim.simulator.stats.requests_received
    assert got == over_aiohttp == ("connection_error", True, None, None)
    assert received == 0
