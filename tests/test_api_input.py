"""``batcher.run(input=...)`` with rows in memory, request fields as keywords, the default output
in the cache folder (a second call sends nothing), and the dataset view (``to_pandas``...).

Requests are counted at a loopback server that answers each with its user message echoed, so
an answer can be matched to the row it came from.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batcher
from batcher import api_input
from batcher.api_view import dataset_view, in_input_order
from batcher.errors import ConfigError
from tests.helpers import free_port
from tests.loopback import chat_answer, json_app, serving

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
ROWS: list[dict[str, Any]] = [
    {"prompt": "What is 2+2?", "gold": "4"},
    {"prompt": "Capital of France?", "gold": "Paris"},
    {"prompt": "Colour of the sky?", "gold": "blue"},
]


class Server:
    """Counts the requests it answers and keeps their bodies; answers ``echo: <user message>``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        self.bodies.append(body)
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        return 200, chat_answer(body["model"], USAGE, f"echo: {user}"), {}


@pytest.fixture
def server() -> Iterator[tuple[Server, str]]:
    counting = Server()
    with serving(json_app(counting)) as url:
        yield counting, url


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("BATCHER_CACHE_DIR", str(folder))
    return folder


def test_rows_in_memory_run_and_the_same_call_again_sends_nothing(
    server: tuple[Server, str], cache: Path
) -> None:
    counting, url = server
    first = batcher.run(input=ROWS, base_url=url, model="m", temperature=0.0, seed=7)
    assert first.exit_code == 0, first.summary
    assert len(counting.bodies) == 3
    # keywords are request defaults; the row's own data (gold) is never sent
    assert all(b["seed"] == 7 and b["temperature"] == 0.0 for b in counting.bodies)
    assert all("gold" not in b for b in counting.bodies)
    assert first.output.is_relative_to(cache / "runs") and first.output.exists()

    again = batcher.run(input=ROWS, base_url=url, model="m", temperature=0.0, seed=7)
    assert len(counting.bodies) == 3  # the second call sent nothing
    assert again.output == first.output and again.stats.skipped == 3
    # how fast (limits) is not what is asked: the same output, nothing sent
    faster = batcher.run(
        input=ROWS, base_url=url, model="m", temperature=0.0, seed=7, concurrency=2, rpm=600
    )
    assert faster.output == first.output and len(counting.bodies) == 3
    # another question is another run
    hotter = batcher.run(input=ROWS, base_url=url, model="m", temperature=0.5, seed=7)
    assert hotter.output != first.output and len(counting.bodies) == 6


def test_notify_urls_and_split_errors_resume_the_same_run(cache: Path) -> None:
    bodies: list[dict[str, Any]] = []

    async def answer(body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        bodies.append(body)
        user = body["messages"][-1]["content"]
        if "France" in user:  # one final error, kept by a resume
            return 400, {"error": {"message": "refused", "type": "invalid_request_error"}}, {}
        return 200, chat_answer(body["model"], USAGE, f"echo: {user}"), {}

    with serving(json_app(answer)) as url:
        first = batcher.run(input=ROWS, base_url=url, model="m")
        assert first.exit_code == 1 and len(bodies) == 3
        errors = first.output.with_name(first.output.name + ".errors.jsonl")
        assert pq.read_table(first.output).num_rows == 3 and not errors.exists()
        # split, then told elsewhere, then unsplit: the same output, nothing sent again
        for split, notify in [(True, None), (True, [f"json://127.0.0.1:{free_port()}/n"]),
                              (False, None)]:  # fmt: skip
            again = batcher.run(
                input=ROWS, base_url=url, model="m", split_errors=split, notify=notify
            )
            assert again.output == first.output and len(bodies) == 3
            assert again.stats.skipped == 3 and again.exit_code == 1
            ok = pq.read_table(again.output).column("status").to_pylist()
            assert ok == (["ok", "ok"] if split else ["ok", "error", "ok"])
            assert errors.exists() == split
            if split:
                (line,) = errors.read_text().splitlines()
                assert json.loads(line)["custom_id"] == "line-2"
        # what is asked still decides: another model is another run
        other = batcher.run(input=ROWS, base_url=url, model="m2", split_errors=True)
        assert other.output != first.output and len(bodies) == 6


def test_the_dataset_view_puts_the_inputs_columns_first_in_input_order(
    server: tuple[Server, str], cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = server
    result = batcher.run(input=ROWS, base_url=url, model="m")
    frame = result.to_pandas()
    assert list(frame.columns[:3]) == ["prompt", "gold", "custom_id"]
    assert list(frame["gold"]) == ["4", "Paris", "blue"]
    assert list(frame["content"]) == [f"echo: {row['prompt']}" for row in ROWS]

    polars = result.to_polars()
    assert polars["gold"].to_list() == ["4", "Paris", "blue"]
    assert polars.schema["prompt_tokens"].is_integer()

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = result.to_dataset()
    assert data["gold"] == ["4", "Paris", "blue"]
    assert data.features["prompt_tokens"].dtype == "int64"


def test_dataframes_arrow_and_datasets_give_the_same_run(
    server: tuple[Server, str], cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same rows from any library are the same input: one run, paid once."""
    import datasets
    import pandas as pd
    import polars as pl

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    counting, url = server
    rows = [{**row, "messages": [{"role": "user", "content": row.pop("prompt")}]} for row in
            [dict(r) for r in ROWS]]  # fmt: skip
    first = batcher.run(input=pd.DataFrame(rows), base_url=url, model="m")
    assert first.exit_code == 0 and len(counting.bodies) == 3
    # a table gives each message every key any message has: the nulls are not sent
    assert counting.bodies[0]["messages"] == [{"role": "user", "content": "What is 2+2?"}]
    for same in (
        pl.DataFrame(rows),
        pl.DataFrame(rows).lazy(),
        pa.Table.from_pylist(rows),
        datasets.Dataset.from_list(rows),
        rows,
    ):
        again = batcher.run(input=same, base_url=url, model="m")
        assert again.output == first.output, type(same)
        assert again.stats.skipped == 3
    assert len(counting.bodies) == 3


def test_a_dataset_selection_is_the_rows_it_shows(
    server: tuple[Server, str], cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    counting, url = server
    picked = datasets.Dataset.from_list(ROWS).select([2, 0])
    result = batcher.run(input=picked, base_url=url, model="m")
    assert sorted(b["messages"][-1]["content"] for b in counting.bodies) == sorted(
        [ROWS[2]["prompt"], ROWS[0]["prompt"]]
    )
    assert result.to_pandas()["gold"].tolist() == ["blue", "4"]


def test_an_id_column_names_request_rows(server: tuple[Server, str], cache: Path) -> None:
    _, url = server
    rows = [{"qid": f"q{i}", **row} for i, row in enumerate(ROWS)]
    result = batcher.run(input=rows, base_url=url, model="m", id_column="qid")
    view = result.to_pandas()
    assert list(view["custom_id"]) == ["q0", "q1", "q2"]
    assert list(view["qid"]) == ["q0", "q1", "q2"]


def test_a_file_input_without_output_goes_to_the_cache_too(
    server: tuple[Server, str], cache: Path, tmp_path: Path
) -> None:
    counting, url = server
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in ROWS))
    first = batcher.run(input=src, base_url=url, model="m")
    again = batcher.run(input=str(src), base_url=url, model="m")
    assert again.output == first.output and first.output.is_relative_to(cache)
    assert len(counting.bodies) == 3 and again.stats.skipped == 3
    src.write_text(src.read_text() + json.dumps({"prompt": "one more"}) + "\n")
    assert batcher.run(input=src, base_url=url, model="m").output != first.output


def test_unknown_keywords_are_type_errors_naming_them(cache: Path) -> None:
    with pytest.raises(TypeError, match=r"'temprature'; did you mean 'temperature'\?"):
        batcher.run(input=ROWS, model="m", temprature=0.2)
    with pytest.raises(TypeError, match=r"'concurency'; did you mean 'concurrency'\?"):
        batcher.run(input=ROWS, concurency=3)
    with pytest.raises(TypeError, match=r"arun\(\) got an unexpected keyword argument 'colour' "):
        asyncio.run(batcher.arun(input=ROWS, colour="red"))
    assert not cache.exists()  # raised before anything was written


def test_input_of_another_kind_is_a_type_error_naming_what_is_taken(cache: Path) -> None:
    import pandas as pd

    for odd in (iter(ROWS), pd.Series([1, 2]), {"prompt": "a dict is not rows"}):
        with pytest.raises(TypeError, match="input must be a path, a list of dicts"):
            batcher.run(input=odd, model="m")


def test_rows_that_are_not_requests_need_a_template(
    server: tuple[Server, str], cache: Path
) -> None:
    counting, url = server
    with pytest.raises(ConfigError, match=r"template_user.*'question', 'gold'"):
        batcher.run(input=[{"question": "q", "gold": "a"}], base_url=url, model="m")
    assert counting.bodies == []


def test_without_a_cache_folder_an_output_is_needed(
    server: tuple[Server, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHER_CACHE_DIR", "")
    counting, url = server
    with pytest.raises(ConfigError, match=r"output.*cache folder is off"):
        batcher.run(input=ROWS, base_url=url, model="m")
    assert counting.bodies == []
    out = tmp_path / "o.parquet"
    result = batcher.run(input=ROWS, base_url=url, model="m", output=str(out))
    assert result.output == out and len(counting.bodies) == 3
    assert batcher.run(input=ROWS, base_url=url, model="m", output=str(out)).stats.skipped == 3


# --- materialisation --------------------------------------------------------------------


def test_template_rows_are_written_as_parquet_named_by_their_content(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "gold": i, "tags": ["a", "b"][: i % 3]} for i in range(25)]
    one = api_input.materialise(rows, template_user="{question}", id_column=None, folder=tmp_path)
    assert not one.requests and one.path.suffix == ".parquet"
    back = pq.read_table(one.path)
    assert back.column_names == ["question", "gold", "tags"]
    assert back.schema.field("gold").type == pa.int64() and back.to_pylist() == rows
    # the same rows chunked otherwise, from another library: the same file
    chunked = pa.Table.from_batches(pa.Table.from_pylist(rows).to_batches(max_chunksize=7))
    two = api_input.materialise(chunked, template_user="x", id_column=None, folder=tmp_path)
    assert two.path == one.path and two.digest == one.digest
    import pandas as pd
    import polars as pl

    for other in (pd.DataFrame(rows), pl.DataFrame(rows)):
        same = api_input.materialise(other, template_user="x", id_column=None, folder=tmp_path)
        assert same.digest == one.digest, type(other)
    changed = [*rows[:-1], {**rows[-1], "gold": -1}]
    three = api_input.materialise(changed, template_user="x", id_column=None, folder=tmp_path)
    assert three.path != one.path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([one.path.name, three.path.name])


def test_a_column_of_mixed_types_is_kept_as_text() -> None:
    table = api_input.rows_table([{"a": 1, "b": "x"}, {"a": "two"}, {"b": {"k": 1}}])
    assert table.column_names == ["a", "b"]
    assert table["a"].to_pylist() == ["1", "two", None]
    assert table["b"].to_pylist() == ["x", None, '{"k":1}']


def test_request_lines_keep_request_keys_only() -> None:
    row = {"prompt": "p", "gold": "g", "seed": None, "top_k": 5, "custom_id": "c1", "n": 2}
    assert json.loads(api_input.request_line(row)) == {
        "prompt": "p",
        "top_k": 5,
        "custom_id": "c1",
        "n": 2,
    }
    assert json.loads(api_input.request_line({"prompt": "p", "k": 1.0}, "k"))["custom_id"] == "1.0"


def test_the_run_key_ignores_speed_and_credentials_not_questions() -> None:
    from batcher.config import EndpointConfig, JobConfig, LimitsConfig

    job = JobConfig(request={"model": "m"}, endpoint=EndpointConfig(base_url="http://h/v1"))
    key = api_input.run_key(job, "d")
    import dataclasses

    same = [
        dataclasses.replace(job, limits=LimitsConfig(concurrency=3, max_cost_usd=2.0)),
        dataclasses.replace(job, output=Path("elsewhere"), progress=False),
        dataclasses.replace(
            job,
            endpoint=EndpointConfig(
                base_url="http://h/v1", api_key_env="OTHER", headers={"x-key": "s3cret"}
            ),
        ),
    ]
    assert [api_input.run_key(j, "d") for j in same] == [key] * 3
    other = [
        dataclasses.replace(job, request={"model": "m2"}),
        dataclasses.replace(job, system="be brief"),
        dataclasses.replace(job, endpoint=EndpointConfig(base_url="http://other/v1")),
    ]
    keys = {api_input.run_key(j, "d") for j in other} | {api_input.run_key(job, "e")}
    assert len(keys) == 4 and key not in keys


# --- the dataset view -------------------------------------------------------------------


def test_the_view_flattens_the_input_column_and_renames_clashes() -> None:
    inputs = pa.array(
        [{"question": "q2", "content": "c2"}, None, {"question": "q1", "content": "c1"}]
    )
    output = pa.table(
        {"custom_id": ["b", "x", "a"], "content": ["A2", "AX", "A1"], "line": [2, 3, 1],
         "input": inputs}
    )  # fmt: skip
    view = dataset_view(output)
    assert view.column_names == ["question", "input_content", "custom_id", "content", "line"]
    assert view.to_pylist()[0] == {
        "question": "q1", "input_content": "c1", "custom_id": "a", "content": "A1", "line": 1
    }  # fmt: skip
    assert view["question"].to_pylist() == ["q1", "q2", None]


def test_the_view_matches_in_memory_rows_by_line_and_orders_variants() -> None:
    source = pa.table({"q": ["first", "second"], "custom_id": ["mine-1", "mine-2"]})
    output = pa.table(
        {"custom_id": ["2", "1", "1", "2"], "variant": ["warm", "warm", "cold", "cold"],
         "line": [2, 1, 1, 2]}
    )  # fmt: skip
    view = dataset_view(output, source, ["cold", "warm"])
    assert view.column_names == ["q", "input_custom_id", "custom_id", "variant", "line"]
    assert view["q"].to_pylist() == ["first", "first", "second", "second"]
    assert view["variant"].to_pylist() == ["cold", "warm", "cold", "warm"]
    # an input with three variants sorted by their declared place, not by name
    three = pa.table({"line": [1, 1, 1], "variant": ["a", "c", "b"]})
    assert in_input_order(three, ["c", "b", "a"])["variant"].to_pylist() == ["c", "b", "a"]


# --- template rows (tabular input) ------------------------------------------------------


def test_a_dataframe_of_questions_runs_through_the_template(
    server: tuple[Server, str], cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("batcher.input.tabular")
    import pandas as pd

    counting, url = server
    frame = pd.DataFrame({"question": ["2+2?", "3+3?"], "gold": ["4", "6"], "points": [1, 2]})
    first = batcher.run(
        input=frame, template_user="Q: {question}", system="Answer briefly.", base_url=url,
        model="m", max_tokens=16,
    )  # fmt: skip
    assert first.exit_code == 0, first.summary
    assert sorted(b["messages"][-1]["content"] for b in counting.bodies) == ["Q: 2+2?", "Q: 3+3?"]
    assert all(b["max_tokens"] == 16 for b in counting.bodies)
    view = first.to_pandas()
    assert list(view["question"]) == ["2+2?", "3+3?"] and list(view["gold"]) == ["4", "6"]
    assert list(view["content"]) == ["echo: Q: 2+2?", "echo: Q: 3+3?"]
    assert str(view["points"].dtype) == "int64"  # the row's own types, not text
    again = batcher.run(
        input=frame, template_user="Q: {question}", system="Answer briefly.", base_url=url,
        model="m", max_tokens=16,
    )  # fmt: skip
    assert again.output == first.output and len(counting.bodies) == 2

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    data = datasets.Dataset.from_pandas(frame)
    from_dataset = batcher.run(
        input=data, template_user="Q: {question}", system="Answer briefly.", base_url=url,
        model="m", max_tokens=16,
    )  # fmt: skip
    assert from_dataset.output == first.output and len(counting.bodies) == 2
    assert from_dataset.to_dataset()["gold"] == ["4", "6"]


@pytest.mark.slow  # a fresh interpreter: what a run of a list of dicts imports
def test_a_list_of_dicts_imports_no_dataframe_library(tmp_path: Path) -> None:
    # pandas is left out: pyarrow itself imports it when installed (pa.array does, in any run)
    code = (
        "import sys, batcher\n"
        "r = batcher.run(input=[{'prompt': 'hi'}], base_url='sim', model='m')\n"
        "assert r.exit_code == 0, r.summary\n"
        "print(sorted({'polars', 'datasets'} & set(sys.modules)))\n"
    )
    env = {**os.environ, "BATCHER_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]"]


def test_a_job_with_a_template_renders_rows_that_look_like_requests(
    server: tuple[Server, str], cache: Path
) -> None:
    """The job's own [template] wins over a ``prompt`` column: the rows are rendered."""
    pytest.importorskip("batcher.input.tabular")
    import polars as pl

    counting, url = server
    job = {"template": {"user": "Say: {prompt}", "id_column": "key"}, "request": {"model": "m"}}
    frame = pl.DataFrame({"key": ["a", "b"], "prompt": ["one", "two"]})
    result = batcher.run(job, input=frame, base_url=url)
    assert result.exit_code == 0, result.summary
    assert sorted(b["messages"][-1]["content"] for b in counting.bodies) == ["Say: one", "Say: two"]
    view = result.to_polars()
    assert view["custom_id"].to_list() == ["a", "b"] and view["prompt"].to_list() == ["one", "two"]
