"""A schema-constrained run against the simulator: its ``parsed`` column has the schema's types
(queried with DuckDB), and ``messages`` reads as a list of structs in polars and pandas."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest

from batcher.job_file import job_from_dict
from batcher.output.writers import read_results
from batcher.runner.run import run_job
from batcher.sim import sim_server
from tests.helpers import keep_full_journal

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string"},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["math", "easy", "hard"]}},
        "source": {
            "anyOf": [
                {"type": "object", "properties": {"page": {"type": "number"}}},
                {"type": "null"},
            ]
        },
    },
    "required": ["answer", "score", "tags", "source"],
    "additionalProperties": False,
}
N = 12


RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "graded", "schema": SCHEMA, "strict": True},
}


def run(tmp_path: Path, output: str, *, per_line: bool = False) -> Path:
    """``per_line``: Batch API lines, each with the response format in its body (the job's
    ``[request]`` has none)."""
    src = tmp_path / "in.jsonl"
    with src.open("w") as f:
        for i in range(N):
            messages = [{"role": "user", "content": f"What is {i} + {i}?"}]
            line: dict[str, Any] = {"custom_id": f"q{i}", "messages": messages}
            if per_line:
                body = {"messages": messages, "response_format": RESPONSE_FORMAT}
                line = {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions"}
                line["body"] = body
            f.write(json.dumps(line) + "\n")
    request: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 50}
    if not per_line:
        request["response_format"] = RESPONSE_FORMAT
    job = job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / output), "progress": False},
            "endpoint": {"base_url": "sim"},
            "request": request,
        }
    )
    report = run_job(job, stream=io.StringIO(), sim=sim_server)
    assert report.exit_code == 0
    return report.output


def query(sql: str) -> list[tuple[Any, ...]]:
    relation = duckdb.sql(sql)
    assert relation is not None  # a select gives a relation (other statements give None)
    return relation.fetchall()


@pytest.mark.parametrize("per_line", [False, True], ids=["job", "each line"])
def test_parsed_has_the_schemas_types_in_duckdb(tmp_path: Path, per_line: bool) -> None:
    out = run(tmp_path, "out.parquet", per_line=per_line)
    described = {row[0]: row[1] for row in query(f"DESCRIBE SELECT * FROM '{out}'")}
    assert described["parsed"] == (
        'STRUCT(answer VARCHAR, score BIGINT, tags VARCHAR[], "source" STRUCT(page DOUBLE))'
    )
    assert described["messages"] == 'STRUCT("role" VARCHAR, "content" VARCHAR)[]'
    rows = query(
        f"SELECT custom_id, parsed.answer, parsed.score, parsed.tags, parsed.source.page, "
        f"content, messages[1].content FROM '{out}' ORDER BY custom_id"
    )
    assert len(rows) == N
    for cid, answer, score, tags, _page, content, asked in rows:
        sent = json.loads(content)  # the answer as text, as always
        assert (answer, score, tags) == (sent["answer"], sent["score"], sent["tags"])
        assert isinstance(score, int) and 1 <= score <= 5
        assert asked == f"What is {cid[1:]} + {cid[1:]}?"
    # a typed column filters and aggregates as such
    [(total,)] = query(f"SELECT sum(parsed.score) FROM '{out}'")
    assert total == sum(json.loads(r[5])["score"] for r in rows)


def test_the_output_written_again_from_the_journal_has_the_same_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep_full_journal(monkeypatch)  # the journal keeps the answers, to write them again
    out = run(tmp_path, "out.parquet")
    first = pq.read_table(out)
    out.unlink()  # the next run writes it again from its journal, sending nothing
    again = run(tmp_path, "out.parquet")
    table = pq.read_table(again)
    assert table.schema == first.schema
    key = [("custom_id", "ascending")]
    assert (
        table.sort_by(key)
        .select(["messages", "parsed"])
        .equals(first.sort_by(key).select(["messages", "parsed"]))
    )


def test_messages_read_as_a_list_of_structs_in_polars_and_pandas(tmp_path: Path) -> None:
    polars = pytest.importorskip("polars")
    out = run(tmp_path, "out.parquet")
    frame = polars.read_parquet(out).sort("custom_id")
    assert frame.schema["messages"] == polars.List(
        polars.Struct({"role": polars.String, "content": polars.String})
    )
    assert frame["messages"][0].to_list() == [{"role": "user", "content": "What is 0 + 0?"}]
    assert frame.schema["parsed"].to_schema()["score"] == polars.Int64
    pandas = pytest.importorskip("pandas")
    df = pandas.read_parquet(out).sort_values("custom_id")
    first: Any = df["messages"].iloc[0]
    assert [dict(m) for m in first] == [{"role": "user", "content": "What is 0 + 0?"}]
    parsed = df["parsed"].iloc[0]
    assert isinstance(parsed["score"], int) and all(
        t in {"math", "easy", "hard"} for t in parsed["tags"]
    )


def test_a_jsonl_output_carries_them_in_the_batcher_object(tmp_path: Path) -> None:
    out = run(tmp_path, "out.jsonl")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == N
    for line in lines:
        body = line["response"]["body"]
        assert line["batcher"]["parsed"] == json.loads(body["choices"][0]["message"]["content"])
        assert line["batcher"]["messages"][0]["role"] == "user"
    rows = list(read_results(out))
    assert all(row["parsed"]["answer"] for row in rows)
