"""The output's typed columns: which a job has (``shape_for``), and their values written to
Parquet and JSONL and read back."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.config import JobConfig, VariantConfig
from batcher.input.line_formats import line_asks
from batcher.output.parts import compact, scan, write_part
from batcher.output.rows import PLAIN, SCHEMA, schema_for
from batcher.output.shape import MESSAGES, OutputShape, output_shape, shape_for, tool_calls_type
from batcher.output.typed import JSON_TEXT
from batcher.output.writers import open_writer, read_results, results_table, rows_table
from batcher.records import Result

ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
    "required": ["answer", "confidence"],
}
ANSWER_T = pa.struct([("answer", pa.string()), ("confidence", pa.float64())])
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
}
WEATHER_T = pa.struct([("city", pa.string()), ("days", pa.int64())])


def json_schema(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


def tool(name: str, parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def variant(name: str, **request: Any) -> VariantConfig:
    return VariantConfig(name=name, request=request)


def test_a_plain_job_has_messages_only() -> None:
    shape = shape_for(JobConfig(request={"model": "m"}), None)
    assert shape == OutputShape() == PLAIN
    assert [f.name for f in shape.fields()] == ["messages"]
    assert schema_for(shape).names == [*SCHEMA.names, "messages"]  # the fixed columns first


def test_every_typed_column_after_the_fixed_ones() -> None:
    job = JobConfig(
        request={"response_format": json_schema(ANSWER), "tools": [tool("weather", WEATHER)]}
    )
    rows = pa.schema([("question", pa.string()), ("gold", pa.string())])
    shape = shape_for(job, rows)
    assert shape == OutputShape(
        input=pa.struct(list(rows)), parsed=ANSWER_T, tool_arguments=WEATHER_T
    )
    names = schema_for(shape).names
    assert names[: len(SCHEMA)] == SCHEMA.names
    assert names[len(SCHEMA) :] == ["messages", "input", "parsed", "tool_calls"]


@pytest.mark.parametrize(
    ("request_", "variants", "parsed"),
    [
        ({"response_format": {"type": "json_object"}}, (), None),
        ({"response_format": json_schema(ANSWER)}, (), ANSWER_T),
        # every variant asks the same schema (the default): typed
        ({"response_format": json_schema(ANSWER)}, (variant("a"), variant("b", seed=1)), ANSWER_T),
        # every variant its own, the same: typed
        ({}, (variant("a", response_format=json_schema(ANSWER)),) * 2, ANSWER_T),
        # variants differ: JSON text
        (
            {"response_format": json_schema(ANSWER)},
            (variant("a"), variant("b", response_format=json_schema(WEATHER))),
            JSON_TEXT,
        ),
        # only some ask for a schema: JSON text
        ({}, (variant("a"), variant("b", response_format=json_schema(ANSWER))), JSON_TEXT),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, (), JSON_TEXT),
    ],
)
def test_parsed_type(
    request_: dict[str, Any], variants: tuple[VariantConfig, ...], parsed: pa.DataType | None
) -> None:
    assert shape_for(JobConfig(request=request_, variants=variants), None).parsed == parsed


def test_the_lines_own_response_format_types_parsed(tmp_path: Path) -> None:
    def batch_line(i: int, **body: Any) -> str:
        body = {"messages": [{"role": "user", "content": "hi"}], **body}
        return json.dumps({"custom_id": f"r{i}", "url": "/v1/chat/completions", "body": body})

    def parsed(lines: list[str], **job: Any) -> pa.DataType | None:
        src = tmp_path / f"in{len(list(tmp_path.iterdir()))}.jsonl"
        src.write_text("\n".join(["not json", *lines]) + "\n", encoding="utf-8")
        return output_shape(JobConfig(input=src, **job)).parsed

    answer, weather = json_schema(ANSWER), json_schema(WEATHER)
    every = [batch_line(i, response_format=answer) for i in range(3)]
    assert parsed(every) == ANSWER_T  # every line asks the same: typed
    assert parsed([*every, batch_line(9, response_format=weather)]) == JSON_TEXT  # they differ
    assert parsed([*every, batch_line(9)]) == JSON_TEXT  # only some ask
    # the job's default fills the lines without one; a variant's wins over the line's
    assert parsed([*every, batch_line(9)], request={"response_format": answer}) == ANSWER_T
    swept = (variant("a", response_format=weather),)
    assert parsed(every, variants=swept) == WEATHER_T
    assert line_asks(tmp_path / "missing.jsonl") == []


def test_tool_arguments_type() -> None:
    def args(tools: Any) -> pa.DataType | None:
        return shape_for(JobConfig(request={"tools": tools}), None).tool_arguments

    assert args([tool("weather", WEATHER)]) == WEATHER_T
    assert args([tool("weather", WEATHER), tool("other", ANSWER)]) == JSON_TEXT
    assert args([{"type": "function", "function": {"name": "now"}}]) == JSON_TEXT
    assert args([]) is None


def answer(content: str | None, tool_calls: list[Any] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}


def result(cid: str, body: Any, **kw: Any) -> Result:
    return Result(
        custom_id=cid, line=1, status="ok", model="m", attempts=1, latency_s=0.1,
        started_at=1.0, finished_at=2.0, status_code=200, body=body, **kw,
    )  # fmt: skip


MESSAGES_SENT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
]
SHAPE = OutputShape(
    input=pa.struct([("question", pa.string()), ("gold", pa.string())]),
    parsed=ANSWER_T,
    tool_arguments=WEATHER_T,
)
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "weather", "arguments": '{"city": "Oslo", "days": 3, "x": 1}'},
}
RESULTS = [
    result(
        "a",
        answer('{"answer": "4", "confidence": 0.9}', [CALL]),
        messages=MESSAGES_SENT,
        input={"question": "What is 2+2?", "gold": "4"},
    ),
    # an answer that does not fit: its fields null, never an error
    result("b", answer('{"answer": 4, "confidence": "high"}'), messages=MESSAGES_SENT),
    result("c", answer("not JSON")),  # no messages known (a journal from before them)
    result("d", "raw text, not a body"),
]


def test_typed_columns_round_trip_through_parquet(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    with open_writer(path, shape=SHAPE) as writer:
        for r in RESULTS:
            writer.write(r)
    table = pq.read_table(path)
    assert table.schema.field("messages").type == MESSAGES
    assert table.schema.field("parsed").type == ANSWER_T
    assert table.schema.field("tool_calls").type == tool_calls_type(WEATHER_T)
    rows = list(read_results(path))
    assert [r["custom_id"] for r in rows] == ["a", "b", "c", "d"]
    a, b, c, d = rows
    assert a["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": '[{"type":"text","text":"What is 2+2?"}]'},  # JSON text
    ]
    assert a["input"] == {"question": "What is 2+2?", "gold": "4"}
    assert a["parsed"] == {"answer": "4", "confidence": 0.9}
    assert a["tool_calls"] == [
        {"id": "call_1", "name": "weather", "arguments": {"city": "Oslo", "days": 3}}
    ]
    assert b["parsed"] == {"answer": "4", "confidence": None}  # text kept as text; "high" null
    assert b["input"] is None and b["tool_calls"] is None
    assert c["messages"] is None and c["parsed"] is None
    assert d["parsed"] is None and d["content"] is None
    # The Ray engine's blocks are the same table
    block = results_table(RESULTS, shape=SHAPE)
    assert block.schema == schema_for(SHAPE)
    assert block.to_pylist() == pq.read_table(path).to_pylist()


def test_the_jsonl_line_carries_messages_input_and_parsed(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with open_writer(path, shape=SHAPE) as writer:
        for r in RESULTS:
            writer.write(r)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    first = lines[0]["batcher"]
    assert first["messages"] == MESSAGES_SENT  # as sent, not flattened
    assert first["input"] == {"question": "What is 2+2?", "gold": "4"}
    assert first["parsed"] == {"answer": "4", "confidence": 0.9}
    assert "input" not in lines[1]["batcher"] and "messages" not in lines[2]["batcher"]
    assert lines[2]["batcher"]["parsed"] is None
    rows = list(read_results(path))
    assert rows[0]["messages"][1]["content"] == '[{"type":"text","text":"What is 2+2?"}]'
    assert rows[0]["input"] == first["input"] and rows[0]["parsed"] == first["parsed"]
    # As a table (``batcher.run``'s of a JSONL output): the typed columns as the Parquet's
    table = rows_table(rows, shape=SHAPE)
    assert table.schema == schema_for(SHAPE)
    parquet = tmp_path / "out.parquet"
    with open_writer(parquet, shape=SHAPE) as writer:
        for r in RESULTS:
            writer.write(r)
    typed = ["messages", "input", "parsed"]  # tool_calls: in the body only, in JSONL
    assert table.select(typed).equals(pq.read_table(parquet).select(typed))
    # A job with no json_schema: no parsed key
    plain = tmp_path / "plain.jsonl"
    with open_writer(plain) as writer:
        writer.write(RESULTS[0])
    assert "parsed" not in json.loads(plain.read_text())["batcher"]


def test_a_parquet_inputs_own_types_survive_the_journal(tmp_path: Path) -> None:
    """A Parquet input's own types pass through as they are; read back from the journal they
    are JSON text (a timestamp as ISO text), cast back leaf by leaf; what cannot be is null."""
    when = pa.timestamp("us", tz="UTC")
    shape = OutputShape(
        input=pa.struct([("when", when), ("price", pa.decimal128(5, 2)), ("n", pa.int32())])
    )
    at = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    path = tmp_path / "out.parquet"
    with open_writer(path, shape=shape) as writer:
        writer.write(result("live", None, input={"when": at, "price": Decimal("1.50"), "n": 7}))
        journaled = json.loads(json.dumps({"when": at.isoformat(), "price": "1.50", "n": 7}))
        writer.write(result("journal", None, input=journaled))
        writer.write(result("bad", None, input={"when": "not a time", "price": "x", "n": 1}))
    rows = {r["custom_id"]: r for r in read_results(path)}
    assert rows["live"]["input"] == rows["journal"]["input"] == {
        "when": at, "price": Decimal("1.50"), "n": 7
    }  # fmt: skip
    assert rows["bad"]["input"] == {"when": None, "price": None, "n": 1}


def test_ray_parts_keep_the_typed_columns_when_compacted(tmp_path: Path) -> None:
    """Part files are written with the job's columns, and compacting one keeps them."""
    schema = schema_for(SHAPE)
    first, second = tmp_path / "part-1.parquet", tmp_path / "part-2.parquet"
    write_part(first, results_table(RESULTS, shape=SHAPE), None, schema=schema)
    write_part(second, results_table(RESULTS[:1], shape=SHAPE), None, schema=schema)
    compact(scan(tmp_path))  # "a" is in both: its older row goes
    assert pq.read_schema(first).remove_metadata() == schema
    rows = list(read_results(first))
    assert [r["custom_id"] for r in rows] == ["b", "c", "d"]
    assert rows[0]["parsed"] == {"answer": "4", "confidence": None}
    assert next(read_results(second))["tool_calls"][0]["arguments"] == {"city": "Oslo", "days": 3}
