"""Results as rows (``batcher.output.rows``): every field of a ``Result`` lands in its column,
and a Batch API line reads back as the same row, without a writer in between."""

from __future__ import annotations

import json
import math
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher.errors import ConfigError, InputError
from batcher.output.reading import parquet_parts, read_results, row_from_line
from batcher.output.rows import (
    ENCODE,
    NAMES,
    SCHEMA,
    batch_output_line,
    parquet_row,
    row_values,
)
from batcher.records import Result, Usage

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(), kids, max_size=3),
    max_leaves=8,
)
token_count = st.none() | st.integers(0, 2**62)
# Floats as a server or a clock may give them: non-finite ones must become nulls.
any_float = st.floats(allow_nan=True, allow_infinity=True)
maybe_text = st.none() | st.text(max_size=12)
usages = st.none() | st.builds(
    Usage,
    prompt_tokens=token_count,
    completion_tokens=token_count,
    total_tokens=token_count,
    cached_tokens=token_count,
    reasoning_tokens=token_count,
)
choice = st.fixed_dictionaries(
    {"message": st.fixed_dictionaries({"role": st.just("assistant"), "content": maybe_text})},
    optional={"finish_reason": maybe_text, "index": st.integers(0, 9)},
)
bodies = st.none() | st.text() | json_values | st.builds(
    lambda choices, usage: {"choices": choices, "usage": usage},
    st.lists(choice, max_size=3),
    st.fixed_dictionaries({"prompt_tokens": token_count, "completion_tokens": token_count}),
)  # fmt: skip


@st.composite
def results(draw: st.DrawFn) -> Result:
    """Any ``Result``, every optional field drawn (variants, schema checks, odd floats...)."""
    body = draw(bodies)
    started = draw(st.floats(min_value=-1e11, max_value=1e11) | any_float)
    return Result(
        custom_id=draw(st.text()),
        line=draw(st.integers(1, 2**40)),
        status=draw(st.sampled_from(["ok", "error"])),
        model=draw(maybe_text),
        attempts=draw(st.integers(0, 100)),
        latency_s=draw(any_float),
        started_at=started,
        finished_at=draw(st.floats(min_value=0, max_value=4e9)),
        status_code=draw(st.none() | st.integers(100, 599)),
        request_id=draw(maybe_text),
        body=body,
        usage=Usage.from_body(body) if draw(st.booleans()) else draw(usages),
        error_code=draw(maybe_text),
        error_message=draw(maybe_text),
        metadata=draw(st.none() | st.dictionaries(st.text(), json_values, max_size=3)),
        cost_usd=draw(st.none() | any_float),
        ttft_s=draw(st.none() | any_float),
        schema_valid=draw(st.none() | st.booleans()),
        schema_error=draw(maybe_text),
        endpoint=draw(maybe_text),
        variant=draw(maybe_text),
        choices_asked=draw(st.none() | st.integers(2, 128)),
    )


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def read_back(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Batch API lines written as a JSONL file, then read back as rows."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "out.jsonl"
        path.write_text("".join(ENCODE(line) + "\n" for line in lines), encoding="utf-8")
        return list(read_results(path))


@settings(max_examples=50, deadline=None)
@given(results())
def test_every_field_lands_in_its_column(r: Result) -> None:
    row = parquet_row(r)
    assert tuple(row) == (*NAMES, "messages")  # SCHEMA's columns, then the typed ones
    assert tuple(SCHEMA.names) == NAMES
    same = ("custom_id", "status", "model", "attempts", "status_code", "request_id",
            "error_code", "error_message", "line", "schema_valid", "schema_error", "endpoint",
            "variant", "choices_asked")  # fmt: skip
    assert {k: row[k] for k in same} == {k: getattr(r, k) for k in same}
    for name in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
                 "reasoning_tokens"):  # fmt: skip
        assert row[name] == (None if r.usage is None else getattr(r.usage, name))
    for name in ("latency_s", "cost_usd", "ttft_s"):  # NaN and inf would break JSON readers
        assert row[name] == finite_or_none(getattr(r, name))
    if r.metadata is None:
        assert row["metadata"] is None
    else:
        assert json.loads(row["metadata"]) == r.metadata
    if r.body is None or isinstance(r.body, str):
        assert row["response"] == r.body
    else:
        assert json.loads(row["response"]) == r.body
    finished = datetime.fromtimestamp(r.finished_at, UTC)
    assert abs(row["finished_at"] - finished) <= timedelta(microseconds=1)
    assert len(row_values(r)) == len(NAMES)


@settings(max_examples=50, deadline=None)
@given(st.lists(results(), max_size=5))
def test_a_batch_line_reads_back_as_the_row(rs: list[Result]) -> None:
    assert read_back([batch_output_line(r) for r in rs]) == [parquet_row(r) for r in rs]


@given(ts=st.floats(min_value=-6e10, max_value=2.5e11))
def test_timestamps_keep_their_microsecond(ts: float) -> None:
    r = result(started_at=ts)
    expected = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=round(ts * 1e6))
    assert parquet_row(r)["started_at"] == expected
    line = batch_output_line(r)["batcher"]["started_at"]
    assert line.endswith("Z") and datetime.fromisoformat(line) == expected


@pytest.mark.parametrize("ts", [math.nan, math.inf, -math.inf, 1e15, -1e15])
def test_a_time_no_datetime_can_hold_is_null(ts: float) -> None:
    r = result(started_at=ts)
    assert parquet_row(r)["started_at"] is None
    assert batch_output_line(r)["batcher"]["started_at"] is None


def result(**fields: Any) -> Result:
    base: dict[str, Any] = dict(
        custom_id="a", line=1, status="ok", model="m", attempts=1, latency_s=0.5,
        started_at=1_700_000_000.0, finished_at=1_700_000_001.0,
    )  # fmt: skip
    return Result(**(base | fields))


def test_first_choice_and_every_choice() -> None:
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    body = {
        "choices": [
            {"index": 1, "message": {"content": None, "tool_calls": calls},
             "finish_reason": "tool_calls"},
            {"message": {"content": {"json": 1}, "refusal": "no"}, "finish_reason": 7},
            "not a choice",
        ]
    }  # fmt: skip
    row = parquet_row(result(body=body, status_code=200))
    assert (row["content"], row["finish_reason"]) == (None, "tool_calls")
    assert row["choices"] == [
        {"index": 1, "content": None, "finish_reason": "tool_calls", "refusal": None,
         "tool_calls": ENCODE(calls)},
        # no index of its own: its position; odd values as JSON text
        {"index": 1, "content": '{"json":1}', "finish_reason": "7", "refusal": "no",
         "tool_calls": None},
    ]  # fmt: skip
    assert parquet_row(result(body={"choices": "x"}))["choices"] is None


@given(st.lists(st.tuples(st.text(max_size=3), st.none() | st.text(max_size=2)), unique=True))
def test_batch_ids_are_one_per_request_and_the_same_on_a_rerun(
    keys: list[tuple[str, str | None]],
) -> None:
    ids = [batch_output_line(result(custom_id=c, variant=v))["id"] for c, v in keys]
    assert len(set(ids)) == len(ids)
    again = [batch_output_line(result(custom_id=c, variant=v))["id"] for c, v in keys]
    assert again == ids and all(i.startswith("batch_req_") for i in ids)


def test_a_line_keeps_the_usage_its_body_does_not_say() -> None:
    body = {"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    same = batch_output_line(result(body=body, usage=Usage.from_body(body)))
    assert "usage" not in same["batcher"]  # the body says it: not written twice
    other = Usage(prompt_tokens=5)
    line = batch_output_line(result(body=body, usage=other))
    assert line["batcher"]["usage"]["prompt_tokens"] == 5
    (row,) = read_back([line])
    assert (row["prompt_tokens"], row["total_tokens"]) == (5, None)
    (row,) = read_back([batch_output_line(result(body=body, usage=None))])
    assert row["prompt_tokens"] is None  # no usage, whatever the body says


def test_variant_and_choices_asked_appear_only_when_set() -> None:
    plain = batch_output_line(result())["batcher"]
    assert "variant" not in plain and "choices_asked" not in plain
    swept = batch_output_line(result(variant="v2", choices_asked=3))["batcher"]
    assert (swept["variant"], swept["choices_asked"]) == ("v2", 3)


def test_error_and_response_objects() -> None:
    failed = batch_output_line(result(status="error", error_code="timeout", error_message="t"))
    assert failed["response"] is None  # no HTTP answer came
    assert failed["error"] == {"code": "timeout", "message": "t"}
    answered = batch_output_line(
        result(status="error", status_code=500, body="oops", request_id="req-1")
    )
    # no usable body: an error, not a response; the raw answer is the error's message
    assert answered["response"] is None
    assert answered["error"] == {"code": "invalid_response", "message": "oops"}
    assert answered["batcher"]["response_body"] == "text"
    assert (answered["batcher"]["status_code"], answered["batcher"]["request_id"]) == (
        500,
        "req-1",
    )
    assert batch_output_line(result())["error"] is None


def test_reading_a_folder_of_parts_and_bad_files(tmp_path: Path) -> None:
    folder = tmp_path / "out.parquet"
    folder.mkdir()
    for name in ("part-2.parquet", "part-1.parquet", ".part-0.parquet.partial", "notes.txt"):
        (folder / name).write_text("x")
    (folder / "sub.parquet").mkdir()
    assert [p.name for p in parquet_parts(folder)] == ["part-1.parquet", "part-2.parquet"]
    with pytest.raises(InputError, match="cannot read"):
        list(read_results(folder))  # "x" is no Parquet file
    with pytest.raises(ConfigError, match=r"must end in \.jsonl"):
        list(read_results(tmp_path / "out.csv"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a", "response": null, "error": null}\n[1]\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:2: not a batch output line"):
        list(read_results(bad))


def test_a_sweep_line_has_a_unique_custom_id_and_reads_back_as_the_line_id() -> None:
    line = batch_output_line(result(custom_id="q:1", variant="v2"))
    assert line["custom_id"] == "q:1:v2" and line["batcher"]["line_id"] == "q:1"
    row = row_from_line(json.loads(json.dumps(line)))
    assert (row["custom_id"], row["variant"]) == ("q:1", "v2")
    assert "line_id" not in batch_output_line(result())["batcher"]


@pytest.mark.parametrize(
    ("body", "where"), [([1, "two"], "json"), (None, "none"), ("<html>", "text"), ({}, None)]
)
def test_a_body_that_is_not_an_object_goes_to_the_error_and_reads_back(
    body: Any, where: str | None
) -> None:
    r = result(status="error", status_code=502, body=body, error_code="http_502",
               error_message="bad gateway")  # fmt: skip
    line = batch_output_line(r)
    if where is None:  # an object body: the response, no error
        assert line["response"]["body"] == body and line["error"] is None
        assert "status_code" not in line["batcher"]
    else:  # never both: the error, the answer's status in batcher
        assert line["response"] is None and line["error"]["code"] == "http_502"
        assert line["batcher"]["status_code"] == 502
    assert line["batcher"].get("response_body") == where
    assert (line["batcher"]["error_code"], line["batcher"]["error_message"]) == (
        "http_502",
        "bad gateway",
    )
    assert row_from_line(json.loads(json.dumps(line))) == parquet_row(r)  # lossless


def test_lines_written_by_an_older_version_read_back_as_before() -> None:
    """No ``batcher.error_code`` or ``line_id``: the error and the id come from the line."""
    old = {
        "id": "batch_req_x", "custom_id": "q7",
        "response": {"status_code": 502, "request_id": None, "body": "<html>bad</html>"},
        "error": {"code": "http_502", "message": "HTTP 502"},
        "batcher": {"status": "error", "model": "m", "line": 7, "variant": "v"},
    }  # fmt: skip
    row = row_from_line(old)
    assert (row["custom_id"], row["variant"], row["line"]) == ("q7", "v", 7)
    assert (row["error_code"], row["error_message"]) == ("http_502", "HTTP 502")
    assert row["response"] == "<html>bad</html>"
