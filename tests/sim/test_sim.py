"""The simulator in process (answers, 400s, limits, faults, stats) and once over a socket."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Mapping
from typing import Any

import httpx
import pytest

from batcher.sim.answers import count_prompt_tokens, expected_content
from batcher.sim.app import Simulator
from batcher.sim.config import SimConfig
from batcher.sim.faults import format_duration
from batcher.sim.serve import running_sim

CHAT = "/v1/chat/completions"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def client(sim: Simulator) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=sim), base_url="http://sim")


def body(text: str = "Hello, world!", **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **fields}


def words(content: str) -> list[str]:
    """The generated words of a content, without its ``sim-<hex>`` tag."""
    return content.split(" ")[1:]


@pytest.mark.anyio
async def test_answer_is_deterministic_and_shaped_like_openai() -> None:
    request = body(seed=7, temperature=0.5)
    async with client(Simulator()) as http:
        first = await http.post(CHAT, json=request)
        again = await http.post(CHAT, json=request)
        other = await http.post(CHAT, json=body("Something else"))
    assert first.status_code == 200
    assert re.fullmatch(r"req_[0-9a-f]{32}", first.headers["x-request-id"])
    assert first.headers["x-request-id"] != again.headers["x-request-id"]
    data = first.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "gpt-4o-mini"
    assert data["id"] == "chatcmpl-" + data["choices"][0]["message"]["content"][4:16]
    assert data["system_fingerprint"]
    [choice] = data["choices"]
    assert choice["index"] == 0
    assert choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == expected_content(request)
    assert re.fullmatch(r"sim-[0-9a-f]{12}( \w+)+", choice["message"]["content"])
    assert again.json()["choices"][0]["message"]["content"] == expected_content(request)
    assert other.json()["choices"][0]["message"]["content"] != expected_content(request)
    usage = data["usage"]
    assert usage["prompt_tokens"] == count_prompt_tokens(request["messages"], request["model"])
    assert usage["completion_tokens"] == len(words(choice["message"]["content"]))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_content_depends_on_the_hashed_fields_only() -> None:
    base = body(seed=1, temperature=0.0)
    assert expected_content(base) == expected_content({**base, "top_p": 0.3, "user": "u"})
    for change in ({"seed": 2}, {"temperature": 1.0}, {"model": "gpt-4o"}):
        assert expected_content(base) != expected_content({**base, **change})
    assert expected_content(base, 0) != expected_content(base, 1)


@pytest.mark.anyio
async def test_n_choices_each_with_its_own_content() -> None:
    request = body(n=3)
    async with client(Simulator()) as http:
        data = (await http.post(CHAT, json=request)).json()
    contents = [choice["message"]["content"] for choice in data["choices"]]
    assert [choice["index"] for choice in data["choices"]] == [0, 1, 2]
    assert contents == [expected_content(request, i) for i in range(3)]
    assert len(set(contents)) == 3
    assert data["usage"]["completion_tokens"] == sum(len(words(c)) for c in contents)


@pytest.mark.anyio
async def test_max_tokens_cuts_the_answer_with_finish_reason_length() -> None:
    finishes = []
    async with client(Simulator()) as http:
        for i in range(12):
            uncapped = body(f"prompt {i}")
            natural = len(words(expected_content(uncapped)))
            for cap_field in ("max_tokens", "max_completion_tokens"):
                capped = {**uncapped, cap_field: 32}
                choice = (await http.post(CHAT, json=capped)).json()["choices"][0]
                assert choice["message"]["content"] == expected_content(capped)
                assert len(words(choice["message"]["content"])) == min(natural, 32)
                assert choice["finish_reason"] == ("length" if natural > 32 else "stop")
                finishes.append(choice["finish_reason"])
    assert {"length", "stop"} <= set(finishes)  # the prompts above exercise both branches


@pytest.mark.anyio
async def test_config_cap_bounds_every_answer() -> None:
    config = SimConfig(max_completion_tokens=4)
    async with client(Simulator(config)) as http:
        for i in range(10):
            request = body(f"prompt {i}")
            choice = (await http.post(CHAT, json=request)).json()["choices"][0]
            content = choice["message"]["content"]
            assert content == expected_content(request, max_completion_tokens=4)
            assert 1 <= len(words(content)) <= 4
            assert choice["finish_reason"] == "stop"


def test_count_prompt_tokens_uses_the_models_encoding() -> None:
    # 3 priming + 3 per message + tiktoken's count: "Hello, world!" is 4 tokens in both.
    assert count_prompt_tokens([{"role": "user", "content": "Hello, world!"}], "gpt-4o") == 10
    parts = [{"type": "text", "text": "two words"}, {"type": "image_url", "image_url": {}}]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": parts, "name": "bob"},
        {"role": "assistant", "content": None},
    ]
    # "Be brief." = 3, "two words" = 2, "bob" = 1
    assert count_prompt_tokens(messages, "gpt-4") == 3 + 3 * 3 + 3 + 2 + 1
    text = [{"role": "user", "content": "Ünïcödé text, with 12345 numbers ✓"}]
    assert count_prompt_tokens(text, "gpt-4o") != count_prompt_tokens(text, "gpt-3.5-turbo")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"{not json", "parse the JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"model": "m"}).encode(), "messages"),
        (json.dumps({"model": "m", "messages": []}).encode(), "messages"),
        (json.dumps({"model": "m", "messages": ["hi"]}).encode(), "messages[0]"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model"),
        (json.dumps(body(stream="yes")).encode(), "stream must be a boolean"),
        (json.dumps(body(stream_options={"include_usage": True})).encode(), "stream_options"),
        (json.dumps(body(n=0)).encode(), "n must be"),
        (json.dumps(body(max_tokens=0)).encode(), "max_tokens"),
        (json.dumps(body(max_tokens=True)).encode(), "max_tokens"),
    ],
)
async def test_bad_requests_get_400(raw: bytes, needle: str) -> None:
    sim = Simulator()
    async with client(sim) as http:
        response = await http.post(CHAT, content=raw)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"]
    assert set(error) >= {"message", "type", "code"}
    assert sim.stats.bad_requests == 1
    assert sim.stats.by_status == {"400": 1}


@pytest.mark.anyio
async def test_routes_models_prefixless_path_and_404() -> None:
    sim = Simulator()
    async with client(sim) as http:
        models = (await http.get("/v1/models")).json()
        prefixless = await http.post("/chat/completions", json=body())
        missing = await http.post("/v1/completions", json=body())
        wrong_method = await http.get(CHAT)
    assert models["object"] == "list"
    assert models["data"] and all(m["object"] == "model" and m["id"] for m in models["data"])
    assert prefixless.status_code == 200
    for response in (missing, wrong_method):
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert set(error) >= {"message", "type", "code"}
    assert "POST /v1/completions" in missing.json()["error"]["message"]


@pytest.mark.anyio
async def test_rpm_limit_429_then_200_after_the_clock_moves() -> None:
    clock = FakeClock()
    sim = Simulator(SimConfig(rpm=60), clock=clock)  # 1 request/s, a 1 s burst = 1 request
    async with client(sim) as http:
        ok = await http.post(CHAT, json=body())
        limited = await http.post(CHAT, json=body())
        clock.now += 0.5
        still = await http.post(CHAT, json=body())
        clock.now += 0.5
        again = await http.post(CHAT, json=body())
    assert ok.status_code == 200
    assert ok.headers["x-ratelimit-limit-requests"] == "60"
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"
    assert ok.headers["x-ratelimit-reset-requests"] == "1s"
    assert "x-ratelimit-limit-tokens" not in ok.headers  # no TPM limit set

    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "1"
    assert limited.headers["retry-after-ms"] == "1000"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    error = limited.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")

    assert still.status_code == 429
    assert still.headers["retry-after-ms"] == "500"
    assert still.headers["retry-after"] == "1"  # whole seconds, rounded up
    assert again.status_code == 200
    assert sim.stats.rejected_429 == 2 and sim.stats.answered_ok == 2


@pytest.mark.anyio
async def test_tpm_limit_charges_prompt_plus_max_tokens_times_n() -> None:
    clock = FakeClock()
    sim = Simulator(SimConfig(tpm=6000, rpm=6000), clock=clock)  # 100 tokens/s and burst
    request = body(max_tokens=20, n=2)  # 10 prompt tokens + 20 x 2 = 50 tokens reserved
    async with client(sim) as http:
        first = await http.post(CHAT, json=request)
        second = await http.post(CHAT, json=request)
        third = await http.post(CHAT, json=request)
        clock.now += 0.5
        fourth = await http.post(CHAT, json=request)
    assert first.headers["x-ratelimit-limit-tokens"] == "6000"
    assert first.headers["x-ratelimit-remaining-tokens"] == "50"
    assert first.headers["x-ratelimit-reset-tokens"] == "500ms"
    assert first.headers["x-ratelimit-remaining-requests"] == "99"
    assert second.status_code == 200
    assert third.status_code == 429
    assert third.json()["error"]["type"] == "tokens"
    assert third.headers["retry-after-ms"] == "500"
    assert fourth.status_code == 200


@pytest.mark.anyio
async def test_request_larger_than_the_tpm_limit_never_fits() -> None:
    sim = Simulator(SimConfig(tpm=30), clock=FakeClock())
    async with client(sim) as http:
        response = await http.post(CHAT, json=body(max_tokens=100))
    assert response.status_code == 429
    assert "too large" in response.json()["error"]["message"]
    assert "retry-after" not in response.headers


def test_format_duration_like_openai() -> None:
    cases = {0: "0s", 0.02: "20ms", 0.0201: "21ms", 1: "1s", 2.5: "2.5s", 90.25: "1m30.25s"}
    cases |= {360: "6m0s", 3600: "1h0m0s"}
    assert {seconds: format_duration(seconds) for seconds in cases} == cases


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["500", "502", "503", "malformed", "no_usage"])
async def test_each_fault_kind(kind: str) -> None:
    sim = Simulator(SimConfig(error_rate=1.0, error_kinds=(kind,)))
    request = body()
    async with client(sim) as http:
        response = await http.post(CHAT, json=request)
    expected_status = {"500": 500, "502": 502, "503": 503}.get(kind, 200)
    assert response.status_code == expected_status
    if kind in ("500", "503"):
        assert response.json()["error"]["type"] == "server_error"
    elif kind == "502":
        assert response.headers["content-type"].startswith("text/html")
        assert "502 Bad Gateway" in response.text
    elif kind == "malformed":
        with pytest.raises(json.JSONDecodeError):
            json.loads(response.content)
    else:
        data = response.json()
        assert "usage" not in data
        assert data["choices"][0]["message"]["content"] == expected_content(request)
    stats = sim.stats
    assert (stats.faults_injected, stats.answered_ok) == (1, 0)
    assert stats.total_tokens_served == 0
    assert stats.by_status == {str(expected_status): 1}


@pytest.mark.anyio
async def test_faults_are_drawn_per_attempt_and_reproducible_by_seed() -> None:
    async def statuses(seed: int) -> list[int]:
        sim = Simulator(SimConfig(error_rate=0.5, error_kinds=("500", "503"), seed=seed))
        async with client(sim) as http:
            return [(await http.post(CHAT, json=body())).status_code for _ in range(40)]

    first = await statuses(seed=3)
    assert first == await statuses(seed=3)
    assert first != await statuses(seed=4)
    # The same request, retried, meets both outcomes: the draw is per attempt.
    assert {200, 500, 503} == set(first)


@pytest.mark.anyio
async def test_stats_count_every_outcome_and_reset() -> None:
    clock = FakeClock()
    sim = Simulator(SimConfig(rpm=120), clock=clock)  # a burst of 2 requests
    async with client(sim) as http:
        await http.post(CHAT, json=body(n=2))
        await http.post(CHAT, json=body("again"))
        await http.post(CHAT, json=body())  # 429
        await http.post(CHAT, content=b"nope")  # 400
        await http.get("/nowhere")  # 404
        await http.get("/v1/models")  # not counted
        stats = (await http.get("/stats")).json()
        reset = (await http.post("/stats/reset")).json()
    assert set(stats) == {
        "requests_received",
        "answered_ok",
        "rejected_429",
        "faults_injected",
        "bad_requests",
        "prompt_tokens_served",
        "completion_tokens_served",
        "total_tokens_served",
        "tokens_charged",
        "by_status",
        "batches",  # the Batches API's counts
    }
    assert stats["requests_received"] == 5
    assert stats["answered_ok"] == 2
    assert stats["rejected_429"] == 1
    assert stats["bad_requests"] == 2
    assert stats["faults_injected"] == 0
    assert stats["by_status"] == {"200": 2, "429": 1, "400": 1, "404": 1}
    outcomes = ("answered_ok", "rejected_429", "faults_injected", "bad_requests")
    assert stats["requests_received"] == sum(stats[name] for name in outcomes)
    served = sum(
        count_prompt_tokens(body(text)["messages"], body(text)["model"])
        for text in ("Hello, world!", "again")
    )
    assert stats["prompt_tokens_served"] == served
    completion = sum(len(words(expected_content(body(n=2), i))) for i in range(2))
    completion += len(words(expected_content(body("again"))))
    assert stats["completion_tokens_served"] == completion
    assert stats["total_tokens_served"] == served + completion
    assert reset["requests_received"] == 0 and reset["by_status"] == {}
    assert sim.stats.requests_received == 0


@pytest.mark.anyio
async def test_lifespan_is_answered() -> None:
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[Mapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(incoming)

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)

    await Simulator()({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


@pytest.mark.anyio
async def test_latency_and_jitter_are_reported() -> None:
    sim = Simulator(SimConfig(latency_ms=2, latency_jitter_ms=2))
    async with client(sim) as http:
        waits = [
            int((await http.post(CHAT, json=body())).headers["openai-processing-ms"])
            for _ in range(5)
        ]
    assert all(0 <= wait <= 4 for wait in waits)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"latency_ms": -1}, "latency_ms"),
        ({"latency_jitter_ms": -0.5}, "latency_jitter_ms"),
        ({"rpm": -5}, "rpm"),
        ({"tpm": 0}, "tpm"),
        ({"error_rate": 1.5}, "error_rate"),
        ({"error_rate": -0.1}, "error_rate"),
        ({"error_kinds": ("500", "418")}, "error_kinds"),
        ({"error_kinds": ()}, "error_kinds"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"burst_s": 0}, "burst_s"),
    ],
)
def test_config_validation_names_the_field(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SimConfig(**fields)


def test_running_sim_over_a_loopback_socket() -> None:
    with running_sim(SimConfig()) as handle:
        assert handle.base_url == f"http://127.0.0.1:{handle.port}/v1"
        with httpx.Client(base_url=handle.base_url, timeout=10) as http:
            answers = [http.post("/chat/completions", json=body(f"q{i}")) for i in range(3)]
            stats = http.get(f"http://127.0.0.1:{handle.port}/stats").json()
        for i, answer in enumerate(answers):
            assert answer.status_code == 200
            content = answer.json()["choices"][0]["message"]["content"]
            assert content == expected_content(body(f"q{i}"))
        assert stats["answered_ok"] == 3
        assert stats["by_status"] == {"200": 3}
        assert handle.simulator.stats.answered_ok == 3
    # Shut down: the port no longer accepts connections.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", handle.port), timeout=1):
        pass


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [("429", 429, "rate_limit_exceeded"), ("401", 401, "invalid_api_key"),
     ("quota", 429, "insufficient_quota")],
)  # fmt: skip
async def test_rate_limit_and_account_faults(kind: str, status: int, code: str) -> None:
    sim = Simulator(SimConfig(error_rate=1.0, error_kinds=(kind,), fault_retry_after_s=2.5))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sim), base_url="http://sim"
    ) as http:
        response = await http.post(CHAT, json=body("hi"))
        log = (await http.get("/log")).json()
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    if kind == "429":
        assert response.headers["retry-after"] == "3"
        assert response.headers["retry-after-ms"] == "2500"
        assert len(log["rate_limited"]) == 1
    assert len(log["arrivals"]) == 1


@pytest.mark.anyio
async def test_tokens_charged_counts_prompt_and_completion_budget() -> None:
    sim = Simulator(SimConfig(tpm=1_000_000))
    request = {**body("Hello, world!"), "max_tokens": 7, "n": 2}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sim), base_url="http://sim"
    ) as http:
        await http.post(CHAT, json=request)
    prompt = count_prompt_tokens(request["messages"], request["model"])
    assert sim.stats.tokens_charged == prompt + 7 * 2
