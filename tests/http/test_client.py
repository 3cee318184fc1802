"""Status → outcome mapping and retry-after parsing, through httpx.MockTransport."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from batcher.http.answers import retry_after_s
from batcher.http.client import ChatClient

OK_BODY = {
    "id": "c1",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
BODY = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


def client_for(handler: Callable[[httpx.Request], httpx.Response], **kw: object) -> ChatClient:
    return ChatClient(
        "http://test/v1",
        api_key="k-test",
        transport=httpx.MockTransport(handler),
        **kw,  # type: ignore[arg-type]
    )


async def post_with(response: httpx.Response) -> object:
    async with client_for(lambda request: response) as client:
        return await client.post(BODY)


@pytest.mark.anyio
async def test_ok_answer_parses_usage_and_sends_the_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=OK_BODY, headers={"x-request-id": "req_1"})

    async with client_for(handler, headers={"x-extra": "1"}) as client:
        attempt = await client.post(BODY)
    assert attempt.ok and not attempt.retryable
    assert attempt.usage is not None and attempt.usage.total_tokens == 4
    assert attempt.request_id == "req_1"
    (request,) = seen
    assert request.url == "http://test/v1/chat/completions"
    assert json.loads(request.content) == BODY
    assert request.headers["authorization"] == "Bearer k-test"
    assert request.headers["x-extra"] == "1"


@pytest.mark.anyio
@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
async def test_retryable_statuses(status: int) -> None:
    attempt = await post_with(httpx.Response(status, text="<html>Bad Gateway</html>"))
    assert not attempt.ok and attempt.retryable  # type: ignore[attr-defined]
    assert attempt.error_code == f"http_{status}"  # type: ignore[attr-defined]
    assert "Bad Gateway" in attempt.error_message  # type: ignore[attr-defined]


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_final_statuses(status: int) -> None:
    body = {"error": {"message": "nope", "type": "invalid_request_error", "code": "bad_thing"}}
    attempt = await post_with(httpx.Response(status, json=body))
    assert not attempt.ok and not attempt.retryable  # type: ignore[attr-defined]
    assert attempt.error_code == "bad_thing"  # type: ignore[attr-defined]
    assert attempt.error_message == "nope"  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_insufficient_quota_is_not_retried() -> None:
    body = {
        "error": {"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}
    }
    attempt = await post_with(httpx.Response(429, json=body))
    assert not attempt.retryable  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_non_json_200_and_missing_choices_are_retryable_invalid_responses() -> None:
    attempt = await post_with(httpx.Response(200, text='{"id": "trunc'))
    assert attempt.retryable and attempt.error_code == "invalid_response"  # type: ignore[attr-defined]
    attempt = await post_with(httpx.Response(200, json={"id": "x"}))
    assert attempt.retryable and attempt.error_code == "invalid_response"  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_answer_without_usage_is_ok_with_no_usage() -> None:
    body = {k: v for k, v in OK_BODY.items() if k != "usage"}
    attempt = await post_with(httpx.Response(200, json=body))
    assert attempt.ok and attempt.usage is None  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_connection_error_is_retryable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with client_for(handler) as client:
        attempt = await client.post(BODY)
    assert attempt.retryable and attempt.error_code == "connection_error"
    assert attempt.status_code is None


@pytest.mark.anyio
async def test_retry_after_headers_are_read() -> None:
    attempt = await post_with(httpx.Response(429, headers={"retry-after": "7"}))
    assert attempt.retry_after == 7.0  # type: ignore[attr-defined]
    attempt = await post_with(
        httpx.Response(429, headers={"retry-after": "7", "retry-after-ms": "250"})
    )
    assert attempt.retry_after == 0.25  # type: ignore[attr-defined]


def test_retry_after_http_date_and_garbage() -> None:
    now = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    assert retry_after_s({"retry-after": "Tue, 14 Nov 2023 22:13:30 GMT"}, now=now) == 10.0
    assert retry_after_s({"retry-after": "Tue, 14 Nov 2023 22:13:00 GMT"}, now=now) == 0.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({"retry-after": "-3"}) is None
    assert retry_after_s({"retry-after-ms": "nan", "retry-after": "2"}) == 2.0
    assert retry_after_s({}) is None


@pytest.mark.anyio
async def test_refused_connection_over_the_real_transport_is_a_connection_error() -> None:
    from tests.helpers import free_port

    client = ChatClient(f"http://127.0.0.1:{free_port()}/v1", api_key=None, timeout_s=5)
    async with client:
        attempt = await client.post(BODY)
    assert attempt.retryable
    assert attempt.error_code == "connection_error"
    assert attempt.status_code is None


def test_chat_url_keeps_a_query_after_the_path() -> None:
    from batcher.http.client import chat_completions_url as chat_url

    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert (
        chat_url("https://x.example/openai/deployments/d?api-version=2024-10-21")
        == "https://x.example/openai/deployments/d/chat/completions?api-version=2024-10-21"
    )
