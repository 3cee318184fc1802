"""``stream: true``: server-sent events read and assembled into the record a plain call gives.

Unit tests feed ``StreamReader`` hand-written events (tool calls in fragments, refusals,
logprobs, keep-alive comments); the end-to-end tests stream from the simulator over a real
loopback socket and compare with the same requests not streamed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.http.streaming import StreamError, StreamReader
from batcher.input.reader import parse_line
from batcher.job_file import job_from_dict
from batcher.output.writers import read_results
from batcher.records import Reject, Request
from batcher.runner.run import run_job
from batcher.sim.config import SimConfig
from batcher.sim.serve import running_sim
from tests.engine.test_faults import run_against
from tests.helpers import write_input
from tests.loopback import read_body


def events(*chunks: dict[str, Any] | str) -> list[str]:
    """SSE lines: one ``data:`` line and a blank line per chunk."""
    lines: list[str] = []
    for chunk in chunks:
        data = chunk if isinstance(chunk, str) else json.dumps(chunk)
        lines += [f"data: {data}\r\n", "\r\n"]
    return lines


def delta(index: int, finish: str | None = None, logprobs: Any = None, **fields: Any) -> Any:
    choice = {"index": index, "delta": fields, "finish_reason": finish, "logprobs": logprobs}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
            "model": "m-2024", "system_fingerprint": "fp", "choices": [choice]}  # fmt: skip


def read(lines: list[str], cuts: list[int] | None = None) -> StreamReader:
    """Feed the stream's bytes as a transport would: in pieces cut at ``cuts`` (default: every
    7 bytes, so cuts fall inside lines, inside CRLFs and inside multi-byte characters)."""
    data = "".join(lines).encode()
    cuts = sorted(set(cuts if cuts is not None else range(7, len(data), 7)))
    reader = StreamReader(start=0.0)
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        reader.feed(data[a:b])
    reader.finish()
    return reader


def test_tool_call_fragments_refusal_and_logprobs_are_assembled() -> None:
    lp = [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]
    lines = [": keep-alive\n", *events(
        delta(0, role="assistant", content=""),
        delta(1, role="assistant", content=None),
        delta(0, content="Hi", logprobs={"content": lp, "refusal": None}),
        delta(0, content=" there", logprobs={"content": lp}),
        delta(1, tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                              "function": {"name": "get_", "arguments": ""}}]),
        delta(1, tool_calls=[{"index": 0, "function": {"name": "weather", "arguments": '{"ci'}}]),
        delta(1, tool_calls=[{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]),
        delta(2, refusal="I can't"),
        delta(2, refusal=" help."),
        delta(0, "stop"),
        delta(1, "tool_calls"),
        delta(2, "stop"),
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m-2024",
         "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}},
        "[DONE]",
    )]  # fmt: skip
    reader = read(lines)
    body = reader.body()
    assert reader.done and reader.ttft_s is not None
    assert body["object"] == "chat.completion" and body["model"] == "m-2024"
    assert body["system_fingerprint"] == "fp" and body["id"] == "chatcmpl-1"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    first, second, third = body["choices"]
    assert first["message"] == {"role": "assistant", "content": "Hi there", "refusal": None}
    assert first["finish_reason"] == "stop"
    assert first["logprobs"] == {"content": lp + lp, "refusal": None}
    assert second["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    ]  # fmt: skip
    assert second["finish_reason"] == "tool_calls" and second["message"]["content"] is None
    assert third["message"]["refusal"] == "I can't help." and third["message"]["content"] is None


SAMPLE = events(
    delta(0, role="assistant", content=""),
    delta(0, content="line\u2028sep\u2029para\x85nel \u00e9\u6f22 \U0001f600"),
    delta(0, "stop"),
    "[DONE]",
)


@given(st.lists(st.integers(min_value=1, max_value=400), max_size=30))
def test_any_split_of_the_bytes_reads_the_same(cuts: list[int]) -> None:
    """Only CR, LF and CRLF end a line: raw U+2028, U+2029 and U+0085 stay inside the JSON."""
    reader = read(SAMPLE, [c for c in cuts if c < len("".join(SAMPLE).encode())])
    assert reader.done and reader.problem() is None
    content = reader.body()["choices"][0]["message"]["content"]
    assert content == "line\u2028sep\u2029para\x85nel \u00e9\u6f22 \U0001f600"


def test_cr_only_line_endings_and_a_bom() -> None:
    lines = ["\ufeff" + line.replace("\r\n", "\r") for line in SAMPLE[:1]] + [
        line.replace("\r\n", "\r") for line in SAMPLE[1:]
    ]
    reader = read(lines)
    assert reader.done and reader.body()["choices"][0]["finish_reason"] == "stop"


def test_incomplete_streams_have_a_problem() -> None:
    assert read(["data: [DONE]\n", "\n"]).problem() == "the stream has no choices"
    unfinished = read(events(delta(0, content="half")))
    assert unfinished.problem() == "choice 0 has no finish_reason"
    # whole but without [DONE]: kept, unless the usage it asked for never came
    whole = events(delta(0, content="all"), delta(0, "stop"))
    assert read(whole).problem() is None
    asked = StreamReader(start=0.0, usage_asked=True)
    asked.feed("".join(whole).encode())
    asked.finish()
    assert asked.problem() == "the stream ended before [DONE] and its usage"


def test_azure_empty_first_chunk_choice_extras_and_tool_calls_without_index() -> None:
    azure_first = {
        "id": "",
        "object": "",
        "created": 0,
        "model": "",
        "choices": [],
        "prompt_filter_results": [{"prompt_index": 0}],
    }
    first = delta(
        0,
        role="assistant",
        tool_calls=[
            {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{"}}
        ],
    )
    first["choices"][0]["content_filter_results"] = {"hate": {"filtered": False}}
    first["obfuscation"] = "xyz"
    lines = events(
        azure_first,
        first,
        delta(0, tool_calls=[{"function": {"arguments": "}"}}]),
        delta(0, tool_calls=[{"id": "call_b", "type": "function",
                              "function": {"name": "g", "arguments": "{}"}}]),
        {**delta(0, "tool_calls"), "error": None},
        "[DONE]",
    )  # fmt: skip
    body = read(lines).body()
    assert body["model"] == "m-2024" and body["id"] == "chatcmpl-1" and body["created"] == 7
    assert body["prompt_filter_results"] == [{"prompt_index": 0}] and "obfuscation" not in body
    choice = body["choices"][0]
    assert choice["content_filter_results"] == {"hate": {"filtered": False}}
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "f", "arguments": "{}"},
        {"name": "g", "arguments": "{}"},
    ]


def test_multi_line_data_and_missing_blank_line_at_the_end() -> None:
    chunk = json.dumps(delta(0, content="a b"), indent=1)  # one event over several data lines
    lines = [f"data: {part}\n" for part in chunk.splitlines()] + ["\n", "data: [DONE]"]
    reader = read(lines)
    assert reader.done and reader.body()["choices"][0]["message"]["content"] == "a b"


def test_stream_without_done_is_not_done() -> None:
    reader = read(events(delta(0, content="half")))
    assert not reader.done and reader.chunks == 1


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["data: {not json\n", "\n"], "not JSON"),
        (["data: [1, 2]\n", "\n"], "not a JSON object"),
        (["event: error\n", 'data: {"message": "boom"}\n', "\n"], "error in the stream"),
        (['data: {"error": {"message": "overloaded"}}\n', "\n"], "overloaded"),
    ],
)
def test_broken_events_raise(lines: list[str], message: str) -> None:
    with pytest.raises(StreamError, match=message):
        read(lines)


def test_stream_asks_for_usage_unless_the_line_says_otherwise() -> None:
    def body(line: dict[str, Any]) -> dict[str, Any]:
        parsed = parse_line(json.dumps(line).encode(), 1, {"model": "gpt-4o-mini"})
        assert isinstance(parsed, Request), parsed
        return parsed.body

    assert body({"prompt": "x", "stream": True})["stream_options"] == {"include_usage": True}
    kept = body({"prompt": "x", "stream": True, "stream_options": {"include_usage": False}})
    assert kept["stream_options"] == {"include_usage": False}
    assert "stream_options" not in body({"prompt": "x"})
    bad = parse_line(b'{"prompt": "x", "stream": true, "stream_options": 3}', 4, {"model": "m"})
    assert isinstance(bad, Reject) and bad.reason.startswith("stream_options: must be an object")
    alone = parse_line(b'{"prompt": "x", "stream_options": {}}', 5, {"model": "m"})
    assert isinstance(alone, Reject) and "only allowed with stream: true" in alone.reason


def run_job_over(tmp_path: Path, sim_url: str, name: str, request: dict[str, Any]) -> Path:
    src = write_input(tmp_path / "in.jsonl", 12)
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / name), "progress": False},
            "endpoint": {"base_url": sim_url},
            "request": {"model": "gpt-4o-mini", "n": 2, **request},
            "limits": {"concurrency": 4},
        }
    )
    report = run_job(job, stream=io.StringIO())
    assert report.exit_code == 0, report.summary
    return report.output


def test_streamed_records_equal_plain_ones_over_a_socket(tmp_path: Path) -> None:
    config = SimConfig(latency_ms=30, stream_chunk_ms=3, max_completion_tokens=12)
    with running_sim(config) as sim:
        plain = run_job_over(tmp_path, sim.base_url, "plain.parquet", {})
        streamed = run_job_over(tmp_path, sim.base_url, "streamed.parquet", {"stream": True})
    plain_rows = {r["custom_id"]: r for r in read_results(plain)}
    stream_rows = {r["custom_id"]: r for r in read_results(streamed)}
    assert plain_rows.keys() == stream_rows.keys() and len(plain_rows) == 12
    # n = 2 from the job (lines of the second input form ask for n = 1): choices interleave
    assert sum(len(r["choices"]) == 2 for r in stream_rows.values()) == 8
    for cid, p in plain_rows.items():
        s = stream_rows[cid]
        same = ("status", "model", "content", "finish_reason", "prompt_tokens",
                "completion_tokens", "total_tokens", "cost_usd", "choices")  # fmt: skip
        assert {k: s[k] for k in same} == {k: p[k] for k in same}, cid
        plain_body, stream_body = json.loads(p["response"]), json.loads(s["response"])
        plain_body.pop("created"), stream_body.pop("created")
        assert stream_body == plain_body, cid
        # the first token comes after the latency, the last a few chunks later
        assert p["ttft_s"] is None
        assert 0.03 <= s["ttft_s"] < s["latency_s"], (s["ttft_s"], s["latency_s"])


@pytest.mark.parametrize(
    "kind",
    ["malformed", "stream_error", "reset_body", "reset_headers",
     pytest.param("stall", marks=pytest.mark.slow)],  # waits out a read timeout
)  # fmt: skip
def test_cut_off_stream_is_retried(tmp_path: Path, kind: str) -> None:
    config = SimConfig(error_rate=0.3, error_kinds=(kind,), seed=3)
    report, faults = run_against(tmp_path, config, 24, request={"stream": True})
    rows = list(read_results(report.output))
    assert report.exit_code == 0, report.summary
    assert len(rows) == 24 and {r["status"] for r in rows} == {"ok"}
    assert faults > 0 and report.stats.retries == faults  # one retry per broken stream
    assert all(r["completion_tokens"] and r["ttft_s"] is not None for r in rows)


def test_stream_that_never_finishes_is_an_error_record_after_its_attempts(tmp_path: Path) -> None:
    config = SimConfig(error_rate=1.0, error_kinds=("malformed",))
    report, _ = run_against(tmp_path, config, 2, request={"stream": True}, max_attempts=2)
    rows = list(read_results(report.output))
    assert {(r["status"], r["status_code"], r["error_code"], r["attempts"]) for r in rows} == {
        ("error", 200, "invalid_response", 2)
    }
    assert all("has no finish_reason" in r["error_message"] for r in rows)


def test_server_that_ignores_stream_is_read_as_plain_json(tmp_path: Path) -> None:
    """A gateway that drops ``stream`` and answers JSON: the answer is still kept."""
    import httpx

    from batcher.sim.app import Simulator

    sim = Simulator()

    async def plain_json(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            request = json.loads(await read_body(receive))
            request.pop("stream"), request.pop("stream_options")

            async def replay() -> dict[str, Any]:
                return {"type": "http.request", "body": json.dumps(request).encode()}

            await sim(scope, replay, send)

    src = write_input(tmp_path / "in.jsonl", 3)
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / "o.jsonl"), "progress": False},
            "endpoint": {"base_url": "http://sim.test/v1"},
            "request": {"model": "gpt-4o-mini", "stream": True},
        }
    )
    report = run_job(job, transport=httpx.ASGITransport(app=plain_json), stream=io.StringIO())
    rows = list(read_results(report.output))
    assert report.exit_code == 0 and {r["status"] for r in rows} == {"ok"}
    assert all(r["content"].startswith("sim-") and r["ttft_s"] is None for r in rows)


# A plain answer with a tool call, and the same answer with a legacy function call: what a
# stream of either must assemble into.
PLAIN_TOOL_CALL = {
    "id": "chatcmpl-9", "object": "chat.completion", "created": 7, "model": "m-2024",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
        "role": "assistant", "content": None, "refusal": None,
        "tool_calls": [{"id": "call_0", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]}}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
}  # fmt: skip
PLAIN_FUNCTION_CALL = {
    **PLAIN_TOOL_CALL,
    "choices": [{"index": 0, "finish_reason": "function_call", "logprobs": None, "message": {
        "role": "assistant", "content": None, "refusal": None,
        "function_call": {"name": "get_weather",
                          "arguments": '{"city": "Oslo", "unit": "C"}'}}}],
}  # fmt: skip
ARGUMENT_PIECES = ['{"ci', 'ty": "Os', 'lo", "un', 'it": "C"}']


def call_chunks(plain: dict[str, Any], style: str) -> list[dict[str, Any]]:
    """The chunks of ``plain``'s one call as a server streams them: ``openai`` names the call
    (and gives its id) in the first fragment only; ``llama`` (llama-cpp-python) repeats the
    name and id in every fragment, after a first fragment with empty arguments."""
    choice = plain["choices"][0]
    legacy = "function_call" in choice["message"]
    pieces = ([""] if style == "llama" else []) + ARGUMENT_PIECES
    chunks = [{**delta(0, role="assistant", content=None), "id": plain["id"]}]
    for i, piece in enumerate(pieces):
        named = style == "llama" or i == 0
        function = {"name": "get_weather", "arguments": piece} if named else {"arguments": piece}
        if legacy:
            fields: dict[str, Any] = {"function_call": function}
        else:
            call: dict[str, Any] = {"index": 0, "function": function}
            if named:
                call |= {"id": "call_0", "type": "function"}
            fields = {"tool_calls": [call]}
        chunks.append({**delta(0, **fields), "id": plain["id"]})
    chunks.append({**delta(0, choice["finish_reason"]), "id": plain["id"]})
    usage = {"id": plain["id"], "object": "chat.completion.chunk", "created": 7,
             "model": "m-2024", "choices": [], "usage": plain["usage"]}  # fmt: skip
    return [*chunks, usage]


@pytest.mark.parametrize("style", ["openai", "llama"])
@pytest.mark.parametrize("plain", [PLAIN_TOOL_CALL, PLAIN_FUNCTION_CALL], ids=["tool", "legacy"])
def test_streamed_calls_assemble_into_the_plain_answer(plain: dict[str, Any], style: str) -> None:
    reader = read(events(*call_chunks(plain, style), "[DONE]"))
    assert reader.problem() is None
    body = reader.body()
    body.pop("system_fingerprint")
    assert body == plain


def test_a_different_name_fragment_is_appended_a_repeated_one_is_not() -> None:
    """A server that splits the name gets it joined; the whole name or the id given again is
    kept once."""
    parts = [("get_", "call_1"), ("weather", "call_1"), ("get_weather", None)]
    chunks = [
        delta(0, tool_calls=[{"index": 0, "id": cid, "function": {"name": name}}])
        for name, cid in parts
    ]
    body = read(events(*chunks, delta(0, "tool_calls"), "[DONE]")).body()
    call = body["choices"][0]["message"]["tool_calls"][0]
    assert call == {"id": "call_1", "function": {"name": "get_weather"}}


def test_done_without_finish_reason_says_the_server_cut_the_stream() -> None:
    cut = read(events(delta(0, content="half"), "[DONE]")).problem()
    assert cut == (
        "the server ended the stream before the answer finished ([DONE] without "
        "finish_reason for choice 0)"
    )


class CallServer:
    """A MockTransport handler answering every request with ``plain``: as it is, or streamed
    in llama-cpp-python's style; a stream is cut (``[DONE]`` without ``finish_reason``) the
    first ``cuts`` times, as llama-cpp-python does when another request interrupts it."""

    def __init__(self, plain: dict[str, Any], cuts: int = 0) -> None:
        self.plain = plain
        self.cuts = cuts

    def __call__(self, request: Any) -> Any:
        import httpx

        if not json.loads(request.content).get("stream"):
            return httpx.Response(200, json=self.plain)
        chunks: list[Any] = call_chunks(self.plain, "llama")
        if self.cuts:
            self.cuts -= 1
            chunks = chunks[:2]
        text = "".join(events(*chunks, "[DONE]"))
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def run_calls(
    tmp_path: Path, server: CallServer, name: str, stream: bool, exit_code: int = 0
) -> list[dict[str, Any]]:
    import httpx

    src = write_input(tmp_path / "in.jsonl", 3)
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / name), "progress": False},
            "endpoint": {"base_url": "http://llama.test/v1"},
            "request": {"model": "m-2024", "stream": stream},
            "retry": {"max_attempts": 2, "backoff_initial_s": 0.01, "backoff_max_s": 0.01},
        }
    )
    report = run_job(job, transport=httpx.MockTransport(server), stream=io.StringIO())
    assert report.exit_code == exit_code, report.summary
    return sorted(read_results(report.output), key=lambda r: r["custom_id"])


@pytest.mark.parametrize("plain", [PLAIN_TOOL_CALL, PLAIN_FUNCTION_CALL], ids=["tool", "legacy"])
def test_streamed_call_records_equal_plain_ones(tmp_path: Path, plain: dict[str, Any]) -> None:
    plain_rows = run_calls(tmp_path, CallServer(plain), "plain.jsonl", stream=False)
    stream_rows = run_calls(tmp_path, CallServer(plain), "streamed.jsonl", stream=True)
    same = ("status", "model", "content", "finish_reason", "prompt_tokens", "completion_tokens",
            "choices")  # fmt: skip
    for p, s in zip(plain_rows, stream_rows, strict=True):
        assert {k: s[k] for k in same} == {k: p[k] for k in same}
        stream_body = json.loads(s["response"])
        stream_body.pop("system_fingerprint")
        assert stream_body == json.loads(p["response"]) == plain


def test_a_cut_stream_is_retried_and_the_error_says_so(tmp_path: Path) -> None:
    rows = run_calls(tmp_path, CallServer(PLAIN_TOOL_CALL, cuts=9), "cut.jsonl", True, 1)
    assert {(r["status"], r["attempts"]) for r in rows} == {("error", 2)}
    assert all("the server ended the stream before" in r["error_message"] for r in rows)
