"""Tests for batcher.output.writers: both formats round-trip to the same rows, atomically."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher.errors import ConfigError, InputError
from batcher.output.rows import PLAIN, schema_for
from batcher.output.writers import (
    SCHEMA,
    JsonlWriter,
    ParquetWriter,
    batch_output_line,
    open_writer,
    parquet_row,
    read_results,
)
from batcher.records import Result, Usage

T0 = 1_700_000_000.123456


def ok_body(content: Any = "2 + 2 equals 4.", usage: Any = None) -> dict[str, Any]:
    usage = usage or {"prompt_tokens": 24, "completion_tokens": 15, "total_tokens": 39}
    return {
        "id": "chatcmpl-9758Iw",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
        "system_fingerprint": None,
    }


def make(custom_id: str = "request-1", **kw: Any) -> Result:
    body = kw.pop("body", ok_body())
    base: dict[str, Any] = dict(
        custom_id=custom_id,
        line=1,
        status="ok",
        model="gpt-4o-mini",
        attempts=1,
        latency_s=0.25,
        started_at=T0,
        finished_at=T0 + 1.5,
        status_code=200,
        request_id="req_c187b3",
        body=body,
        usage=Usage.from_body(body),
        metadata={"k": 1},
        cost_usd=0.0001,
    )
    base.update(kw)
    return Result(**base)


HTTP_ERROR = make(
    "bad",
    status="error",
    status_code=400,
    body={"error": {"message": "bad model", "type": "invalid_request_error", "code": None}},
    usage=None,
    error_code="invalid_request_error",
    error_message="bad model",
    cost_usd=None,
)
TRANSPORT_ERROR = make(
    "timeout",
    status="error",
    status_code=None,
    request_id=None,
    body=None,
    usage=None,
    error_code="timeout",
    error_message="read timed out after 3 attempts",
    attempts=3,
)
CASES = [
    make(),
    HTTP_ERROR,
    TRANSPORT_ERROR,
    make("no-choices", body={"id": "x", "usage": {"prompt_tokens": 3}}),
    make("choices-not-list", body={"choices": {"0": 1}}),
    make("message-not-dict", body={"choices": [{"message": "hi", "finish_reason": 3}]}),
    make("choice-not-dict", body={"choices": ["x"]}),
    make("text-body", status_code=502, body="<html>Bad gateway</html>", status="error"),
    make("list-body", body=[1, 2, 3]),
    make("parts", body=ok_body([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])),
    make("ünï 🎉", body=ok_body("héllo 🌍 日本語"), metadata={"tag": "ß💡"}),
    make("no-meta", metadata=None),
    make("usage-not-in-body", usage=Usage(prompt_tokens=7, total_tokens=9)),
    make("body-usage-ignored", usage=None),
    make("reasoning", body=ok_body(usage={"completion_tokens_details": {"reasoning_tokens": 5}})),
]


def write_all(cls: type[JsonlWriter] | type[ParquetWriter], path: Path, rs: list[Result]) -> None:
    with cls(path) as w:
        for r in rs:
            w.write(r)
        assert w.rows_written == len(rs)


def roundtrip(tmp: Path, rs: list[Result]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    write_all(JsonlWriter, tmp / "out.jsonl", rs)
    write_all(ParquetWriter, tmp / "out.parquet", rs)
    return list(read_results(tmp / "out.jsonl")), list(read_results(tmp / "out.parquet"))


def test_roundtrip_cases(tmp_path: Path) -> None:
    from_jsonl, from_parquet = roundtrip(tmp_path, CASES)
    assert from_jsonl == from_parquet == [parquet_row(r) for r in CASES]
    rows = {row["custom_id"]: row for row in from_parquet}
    assert list(rows["request-1"]) == [*SCHEMA.names, "messages"]
    assert rows["request-1"]["content"] == "2 + 2 equals 4."
    assert rows["request-1"]["total_tokens"] == 39
    assert rows["request-1"]["started_at"] == datetime.fromtimestamp(T0, UTC)
    assert rows["request-1"]["metadata"] == '{"k":1}'
    assert (
        rows["bad"]["status_code"] == 400 and rows["bad"]["error_code"] == "invalid_request_error"
    )
    assert json.loads(rows["bad"]["response"])["error"]["message"] == "bad model"
    assert rows["timeout"]["response"] is None and rows["timeout"]["status_code"] is None
    assert rows["no-choices"]["content"] is None and rows["no-choices"]["prompt_tokens"] == 3
    assert rows["message-not-dict"]["content"] is None
    assert rows["message-not-dict"]["finish_reason"] == "3"
    assert rows["text-body"]["response"] == "<html>Bad gateway</html>"
    assert json.loads(rows["parts"]["content"])[1]["text"] == "b"
    assert rows["ünï 🎉"]["content"] == "héllo 🌍 日本語"
    assert rows["no-meta"]["metadata"] is None
    assert rows["usage-not-in-body"]["prompt_tokens"] == 7
    assert rows["body-usage-ignored"]["prompt_tokens"] is None
    assert rows["reasoning"]["reasoning_tokens"] == 5


def test_batch_line_shape(tmp_path: Path) -> None:
    write_all(JsonlWriter, tmp_path / "o.jsonl", CASES)
    text = (tmp_path / "o.jsonl").read_text(encoding="utf-8")
    assert "🎉" in text and ", " not in text.split("\n")[0][:40]  # raw UTF-8, compact
    lines = [json.loads(s) for s in text.split("\n")[:-1]]
    ok, http, transport = lines[:3]
    assert set(ok) == {"id", "custom_id", "response", "error", "batcher"}
    assert ok["id"] == "batch_req_" + hashlib.sha256(b"request-1").hexdigest()[:24]
    assert ok["error"] is None and ok["response"]["body"]["usage"]["total_tokens"] == 39
    assert ok["batcher"]["started_at"] == "2023-11-14T22:13:20.123456Z"
    assert "usage" not in ok["batcher"]  # usage lives in the body only
    assert http["response"]["status_code"] == 400 and http["error"] is None  # as the Batch API
    assert (http["batcher"]["error_code"], http["batcher"]["error_message"]) == (
        "invalid_request_error",
        "bad model",
    )
    assert transport["response"] is None and transport["error"]["code"] == "timeout"
    assert batch_output_line(CASES[0]) == ok  # deterministic ids


def test_reads_foreign_batch_lines(tmp_path: Path) -> None:
    p = tmp_path / "openai.jsonl"
    vllm = {"id": "vllm-1", "custom_id": "b", "response": {"status_code": 400}, "error": "boom"}
    response = {"status_code": 200, "request_id": "r", "body": ok_body()}
    openai = {"id": "batch_req_x", "custom_id": "a", "response": response, "error": None}
    p.write_text(f"{json.dumps(openai)}\n\n{json.dumps(vllm)}\n", encoding="utf-8")
    a, b = read_results(p)
    assert (a["status"], a["model"], a["total_tokens"]) == ("ok", "gpt-4o-mini", 39)
    assert a["content"] == "2 + 2 equals 4." and a["started_at"] is None
    assert (b["status"], b["error_message"], b["attempts"]) == ("error", "boom", None)


# JSON as a server or an input line can carry it: no NaN or Infinity (both are refused when read).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(), kids, max_size=3),
    max_leaves=8,
)
maybe_int = st.none() | st.integers(min_value=0, max_value=2**62)
finite = st.floats(min_value=0, max_value=1e6, allow_nan=False)
bodies = st.one_of(
    st.none(),
    st.text(),
    json_values,
    st.builds(
        lambda content, pt, ct, extra: (
            {"choices": [{"message": {"content": content}}], **extra}
            | {"usage": {"prompt_tokens": pt, "completion_tokens": ct}}
        ),
        st.none() | st.text() | json_values,
        maybe_int,
        maybe_int,
        st.dictionaries(st.text(), json_values, max_size=2),
    ),
)


# Strategies are built once: building them inside the composite costs more than drawing.
short_text = st.none() | st.text(max_size=10)
other_usage = st.none() | st.builds(Usage, prompt_tokens=maybe_int, total_tokens=maybe_int)
metadata = st.none() | st.dictionaries(st.text(), json_values, max_size=3)
cost = st.none() | finite


@st.composite
def results(draw: st.DrawFn) -> Result:
    body = draw(bodies)
    # Mostly usage as the client parses it from the body; sometimes a different one.
    usage = Usage.from_body(body) if draw(st.booleans()) else draw(other_usage)
    answered = body is not None or draw(st.booleans())
    t = draw(st.floats(min_value=0, max_value=4e9))
    return Result(
        custom_id=draw(st.text()),
        line=draw(st.integers(1, 2**40)),
        status=draw(st.sampled_from(["ok", "error"])),
        model=draw(short_text),
        attempts=draw(st.integers(0, 100)),
        latency_s=draw(finite),
        started_at=t,
        finished_at=t + draw(finite),
        status_code=draw(st.integers(100, 599)) if answered else None,
        request_id=draw(short_text) if answered else None,
        body=body,
        usage=usage,
        error_code=draw(short_text),
        error_message=draw(st.none() | st.text()),
        metadata=draw(metadata),
        cost_usd=draw(cost),
    )


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(results(), max_size=6))
def test_property_roundtrip(tmp_path: Path, rs: list[Result]) -> None:
    from_jsonl, from_parquet = roundtrip(tmp_path, rs)
    assert from_jsonl == from_parquet == [parquet_row(r) for r in rs]
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
    for r, line in zip(rs, lines, strict=True):
        obj = json.loads(line)
        assert obj["custom_id"] == r.custom_id
        assert obj["id"] == batch_output_line(r)["id"]
        # a response (an object body) or an error, never both
        assert (obj["response"] is not None) == isinstance(r.body, dict)
        if obj["response"] is not None:
            assert obj["error"] is None
        else:
            assert (obj["error"] is not None) >= (r.status == "error")
            answered = r.status_code is not None or r.body is not None or r.request_id is not None
            assert (obj["error"] is not None) >= answered


@pytest.mark.parametrize("cls", [JsonlWriter, ParquetWriter])
def test_atomic_rename(tmp_path: Path, cls: type[JsonlWriter] | type[ParquetWriter]) -> None:
    path = tmp_path / ("o.jsonl" if cls is JsonlWriter else "o.parquet")
    partial = tmp_path / (path.name + ".partial")
    w = cls(path)
    w.write(CASES[0])
    assert not path.exists() and partial.exists()
    w.close()
    w.close()  # idempotent
    assert path.exists() and not partial.exists()
    assert [r["custom_id"] for r in read_results(path)] == ["request-1"]


def test_parquet_schema_row_groups_and_empty(tmp_path: Path) -> None:
    with ParquetWriter(tmp_path / "e.parquet") as w:
        pass
    assert w.rows_written == 0
    empty = pq.read_table(tmp_path / "e.parquet")
    assert empty.schema == schema_for(PLAIN) and empty.num_rows == 0
    assert empty.schema.names[: len(SCHEMA)] == SCHEMA.names  # the fixed columns come first
    assert list(read_results(tmp_path / "e.parquet")) == []
    rs = [replace(CASES[0], custom_id=f"id-{i}", line=i) for i in range(7)]
    with ParquetWriter(tmp_path / "g.parquet", row_group_size=3) as w:
        for r in rs:
            w.write(r)
    table = pq.read_table(tmp_path / "g.parquet")
    assert table.schema == schema_for(PLAIN) and table.column_names == [*SCHEMA.names, "messages"]
    assert pq.ParquetFile(tmp_path / "g.parquet").metadata.num_row_groups == 3
    assert table.column("line").to_pylist() == list(range(7))


def test_parquet_keeps_statistics_and_dictionaries_where_they_help(tmp_path: Path) -> None:
    rs = [replace(CASES[0], custom_id=f"id-{i}", line=i) for i in range(20)]
    with ParquetWriter(tmp_path / "s.parquet") as w:
        for r in rs:
            w.write(r)
    group = pq.ParquetFile(tmp_path / "s.parquet").metadata.row_group(0)
    chunks = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    # ids and numbers can be filtered on from the footer; long text has no min/max in it
    assert chunks["custom_id"].statistics.min == "id-0"
    assert chunks["custom_id"].statistics.max == "id-9"
    assert chunks["line"].statistics.max == 19
    assert chunks["response"].statistics is None
    assert chunks["content"].statistics is None
    # repeated values are dictionary-encoded, unique ones are not
    assert "RLE_DICTIONARY" in chunks["status"].encodings
    assert "RLE_DICTIONARY" not in chunks["response"].encodings
    assert "RLE_DICTIONARY" not in chunks["custom_id"].encodings


def test_parquet_survives_values_arrow_refuses(tmp_path: Path) -> None:
    odd = make("\ud800 lone", usage=Usage(prompt_tokens=2**70), attempts=3)
    write_all(ParquetWriter, tmp_path / "o.parquet", [odd, CASES[0]])
    write_all(JsonlWriter, tmp_path / "o.jsonl", [odd])
    (row, ok) = read_results(tmp_path / "o.parquet")
    assert row["custom_id"] == "\\ud800 lone" and row["prompt_tokens"] is None
    assert ok == parquet_row(CASES[0])
    assert next(read_results(tmp_path / "o.jsonl"))["custom_id"] == "\ud800 lone"


@pytest.mark.parametrize("writer", [ParquetWriter, JsonlWriter])
def test_interrupted_write_keeps_the_previous_output(tmp_path: Path, writer: Any) -> None:
    path = tmp_path / ("o.parquet" if writer is ParquetWriter else "o.jsonl")
    write_all(writer, path, CASES[:3])
    with pytest.raises(KeyboardInterrupt), writer(path) as w:
        w.write(CASES[0])
        raise KeyboardInterrupt  # Ctrl+C in the middle of writing a new output
    assert len(list(read_results(path))) == 3  # the old, whole file
    assert not w.partial.exists()


def test_read_results_bad_input(tmp_path: Path) -> None:
    line = '{"custom_id": "a", "response": null, "error": null}'
    (tmp_path / "bad.jsonl").write_text(f"{line}\n{{oops\n", encoding="utf-8")
    with pytest.raises(InputError, match=":2:"):
        list(read_results(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError):
        list(read_results(tmp_path / "bad.parquet"))
    with pytest.raises(InputError):
        list(read_results(tmp_path / "missing.jsonl"))


def test_open_writer(tmp_path: Path) -> None:
    with open_writer(tmp_path / "a.jsonl") as w:
        assert isinstance(w, JsonlWriter)
    with open_writer(tmp_path / "sub" / "a.PARQUET", row_group_size=10) as w:
        assert isinstance(w, ParquetWriter)
    with pytest.raises(ConfigError) as info:
        open_writer(tmp_path / "a.csv")
    assert info.value.field == "output" and ".parquet" in str(info.value)
    assert not (tmp_path / "a.csv").exists()


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_tool_calls_refusals_and_logprobs_survive_both_formats(tmp_path: Path, suffix: str) -> None:
    body = {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [
            {"index": 0, "finish_reason": "tool_calls",
             "message": {"role": "assistant", "content": None, "refusal": None,
                         "tool_calls": [{"id": "call_1", "type": "function",
                                         "function": {"name": "get_weather",
                                                      "arguments": '{"city": "Oslo"}'}}]},
             "logprobs": {"content": [{"token": "Hi", "logprob": -0.01, "bytes": [72, 105],
                                       "top_logprobs": [{"token": "Hi", "logprob": -0.01}]}]}},
            {"index": 1, "finish_reason": "stop",
             "message": {"role": "assistant", "content": None,
                         "refusal": "I can't help with that."}, "logprobs": None},
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17},
    }  # fmt: skip
    result = make("tools", body=body)
    path = tmp_path / f"o.{suffix}"
    write_all(JsonlWriter if suffix == "jsonl" else ParquetWriter, path, [result])
    (row,) = read_results(path)
    assert json.loads(row["response"]) == body  # every choice, tool call, refusal and logprob
    assert row["finish_reason"] == "tool_calls"
