"""Datasets in, datasets out, as a user meets them: a CSV of questions with gold answers through
``[template]`` to Parquet and back in pandas, polars, DuckDB and Hugging Face ``datasets``; the
same from a DataFrame and a ``datasets.Dataset`` through ``batcher.run``; a sweep's rows in
(line, variant) order with ids unique in JSONL. Every run is real HTTP to the simulator on
loopback (``base_url = "sim"``) or to ``batcher sim`` in its own process.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

import batcher
from tests.helpers import jsonl, run_batcher, write_job

QUESTIONS = [
    ("q3", "arithmetic", "What is 2 + 2?", "4"),
    ("q1", "geography", "What is the capital of France?", "Paris"),
    ("q2", "arithmetic", "What is 7 * 6?", "42"),
    ("q5", "geography", "What is the capital of Peru?", "Lima"),
    ("q4", "arithmetic", "What is 9 - 3?", "6"),
]
USER = "Topic: {topic}. {question}"
SYSTEM = "Answer with the answer only."


def _rendered(topic: str, question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Topic: {topic}. {question}"},
    ]


@pytest.fixture(autouse=True)
def _offline_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets` kept offline, with its cache in the test's folder."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _csv(path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "topic", "question", "gold"])
        writer.writerows(QUESTIONS)
    return path


def _dataset_job(tmp_path: Path, output: str = "out.parquet") -> Path:
    return write_job(
        tmp_path / "job.toml",
        f"""
[job]
input = "questions.csv"
output = "{output}"
progress = false

[template]
user = "{USER}"
system = "{SYSTEM}"
id_column = "id"

[endpoint]
base_url = "sim"

[request]
model = "gpt-4o-mini"
max_tokens = 16

[limits]
concurrency = 2

[sim]
latency_ms = 5
latency_jitter_ms = 20
seed = 3
""",
    )


def _check_table(rows: list[dict[str, Any]]) -> None:
    """Rows in the CSV's order, each with its rendered messages and the row's own columns."""
    assert [r["custom_id"] for r in rows] == [q[0] for q in QUESTIONS]
    for row, (qid, topic, question, gold) in zip(rows, QUESTIONS, strict=True):
        assert row["status"] == "ok"
        assert row["messages"] == _rendered(topic, question)
        assert row["input"] == {"id": qid, "topic": topic, "question": question, "gold": gold}
        assert row["content"]


def test_csv_through_a_template_reads_back_in_every_data_tool(tmp_path: Path) -> None:
    _csv(tmp_path / "questions.csv")
    done = run_batcher("run", str(_dataset_job(tmp_path)))
    assert done.returncode == 0, done.stderr
    output = tmp_path / "out.parquet"

    import pyarrow.parquet as pq

    _check_table(pq.read_table(output).to_pylist())

    import pandas as pd

    frame = pd.read_parquet(output)
    assert list(frame["input"].map(lambda r: r["gold"])) == [q[3] for q in QUESTIONS]
    assert (
        frame["messages"].iloc[1][1]["content"]
        == "Topic: geography. What is the capital of France?"
    )

    import polars as pl

    polars_frame = pl.read_parquet(output)
    assert polars_frame.schema["input"] == pl.Struct(
        {"id": pl.String, "topic": pl.String, "question": pl.String, "gold": pl.String}
    )
    assert polars_frame.schema["messages"] == pl.List(
        pl.Struct({"role": pl.String, "content": pl.String})
    )
    assert polars_frame["input"].struct.field("gold").to_list() == [q[3] for q in QUESTIONS]

    import duckdb

    relation = duckdb.sql(
        f"select custom_id, input.gold, messages[2].content from read_parquet('{output}')"
    )
    assert relation is not None
    assert relation.fetchall() == [
        (qid, gold, f"Topic: {topic}. {question}") for qid, topic, question, gold in QUESTIONS
    ]

    import datasets

    loaded = datasets.load_dataset(
        "parquet", data_files=str(output), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert loaded.features["input"]["gold"] == datasets.Value("string")
    assert [r["gold"] for r in loaded["input"]] == [q[3] for q in QUESTIONS]
    assert loaded[0]["messages"] == _rendered(QUESTIONS[0][1], QUESTIONS[0][2])


def _frame_rows() -> list[dict[str, str]]:
    return [dict(zip(("id", "topic", "question", "gold"), q, strict=True)) for q in QUESTIONS]


def _api_run(tmp_path: Path, data: Any) -> batcher.RunResult:
    return batcher.run(
        input=data,
        output=tmp_path / "api.parquet",
        base_url="sim",
        model="gpt-4o-mini",
        max_tokens=16,
        template_user=USER,
        template_system=SYSTEM,
        id_column="id",
    )


def test_a_dataframe_through_the_python_api(tmp_path: Path) -> None:
    import pandas as pd

    result = _api_run(tmp_path, pd.DataFrame(_frame_rows()))
    assert result.exit_code == 0
    assert result.table is not None
    _check_table(result.table.to_pylist())
    view = result.to_pandas()
    assert list(view["gold"]) == [q[3] for q in QUESTIONS]
    assert list(view["question"]) == [q[2] for q in QUESTIONS]
    assert view["content"].notna().all()


def test_a_hugging_face_dataset_through_the_python_api(tmp_path: Path) -> None:
    import datasets

    result = _api_run(tmp_path, datasets.Dataset.from_list(_frame_rows()))
    assert result.table is not None
    _check_table(result.table.to_pylist())
    back = result.to_dataset()
    assert back["gold"] == [q[3] for q in QUESTIONS]


def test_a_sweep_is_in_line_then_variant_order_with_unique_jsonl_ids(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    ids = [f"r{i}" for i in (5, 2, 9, 1, 7, 3)]
    source.write_text(
        "".join(json.dumps({"custom_id": i, "prompt": f"say {i}"}) + "\n" for i in ids),
        encoding="utf-8",
    )
    job = write_job(
        tmp_path / "sweep.toml",
        """
[job]
input = "in.jsonl"
output = "out.jsonl"
progress = false

[endpoint]
base_url = "sim"

[request]
model = "gpt-4o-mini"
max_tokens = 8

[[variants]]
name = "cold"
temperature = 0

[[variants]]
name = "warm"
temperature = 0.7

[[variants]]
name = "hot"
temperature = 1.3

[sim]
latency_ms = 2
latency_jitter_ms = 30
seed = 5
""",
    )
    done = run_batcher("run", str(job))
    assert done.returncode == 0, done.stderr
    lines = jsonl(tmp_path / "out.jsonl")
    expected = [(i, v) for i in ids for v in ("cold", "warm", "hot")]
    assert [(ln["batcher"]["line_id"], ln["batcher"]["variant"]) for ln in lines] == expected
    by_id = {ln["custom_id"]: ln for ln in lines}
    assert len(by_id) == len(lines) == 18

    done = run_batcher("run", str(job), "--output", str(tmp_path / "out.parquet"))
    assert done.returncode == 0, done.stderr
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [(r["custom_id"], r["variant"]) for r in rows] == expected
