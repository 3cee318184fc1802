"""The Ray engine's read task, blocks, folder and session helpers, without Ray: the input into
request blocks (rejects, duplicates across files, ids done or changed), finished blocks taken
apart, what a re-run knows, and a worker's error as one line."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from batcher.config import JobConfig
from batcher.job_file import job_from_dict
from batcher.output.parts import Record, new_stamp, part_metadata, part_path, prepare, write_part
from batcher.output.resume import RetryErrors
from batcher.output.writers import read_results, results_table
from batcher.ray.blocks import count_rows, take_apart
from batcher.ray.folder import done, rerun, strangers
from batcher.ray.reading import (
    READ,
    REJECTED,
    RESENT,
    SEND,
    SKIPPED,
    ReadPlan,
    input_files,
    pack,
    request_tables,
    unpack,
)  # fmt: skip
from batcher.ray.session import first_line
from batcher.ray.worker import ERROR_MARK, SENT, STOPPED, _with_markers
from batcher.records import Reject, Result, Usage
from batcher.runner.stats import RunStats


def lines(*objs: object) -> io.BytesIO:
    return io.BytesIO(b"".join(json.dumps(o).encode() + b"\n" for o in objs))


def result(cid: str, status: str = "ok", **kw: object) -> Result:
    fields: dict[str, object] = {"line": 1, "model": "m", "attempts": 1, "latency_s": 0.1}
    fields |= {"started_at": 0.0, "finished_at": 0.1, "endpoint": "e"} | kw
    return Result(custom_id=cid, status=status, **fields)  # type: ignore[arg-type]


def job_for(src: Path) -> JobConfig:
    return job_from_dict(
        {
            "job": {"input": str(src), "output": "out.parquet", "progress": False},
            "request": {"model": "m"},
        }
    )


def kinds(tables: list[pa.Table]) -> list[tuple[str, str | None, int | None]]:
    rows = [r for t in tables for r in t.select(["kind", "custom_id", "line"]).to_pylist()]
    return [(r["kind"], r["custom_id"], r["line"]) for r in rows]


def test_the_read_task_makes_blocks_with_rejects_and_skipped_ids_marked(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        lines(
            {"custom_id": "a", "prompt": "1"},
            {"custom_id": "b", "prompt": "2"},
            {"custom_id": "c", "nothing": "here"},
            {"custom_id": "d", "prompt": "4", "metadata": {"k": 1}},
            {"custom_id": "e", "prompt": "5"},
        ).getvalue()
    )
    plan = ReadPlan(job=job_for(src), files=[str(src)], block_rows=2, known={"b": (True, None)})
    tables = list(request_tables(plan))
    assert kinds(tables) == [
        (SEND, "a", 1), (SKIPPED, "b", None), (REJECTED, "c", 3), (SEND, "d", 4),
        (SEND, "e", 5), (READ, None, 5),
    ]  # fmt: skip
    first = tables[0]
    assert json.loads(first["body"][0].as_py())["model"] == "m"
    assert first["metadata"].to_pylist() == [None, None, None, '{"k":1}']
    # prompts not counted: a typed column, not Arrow's null type
    assert first.schema.field("prompt_tokens").type == pa.int64()
    [table] = list(unpack(pack(first)))
    assert table.equals(first)


def test_lines_run_on_across_files_and_a_duplicate_in_a_later_file_is_rejected(
    tmp_path: Path,
) -> None:
    one, two = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    one.write_bytes(
        lines({"custom_id": "x", "prompt": "1"}, {"custom_id": "y", "prompt": "2"}).getvalue()
    )
    two.write_bytes(
        b"\n"
        + lines({"custom_id": "x", "prompt": "3"}, {"custom_id": "z", "prompt": "4"}).getvalue()
    )
    assert input_files(str(tmp_path / "*.jsonl")) == [str(one), str(two)]
    plan = ReadPlan(job=job_for(one), files=[str(one), str(two)], block_rows=10)
    rows = kinds(list(request_tables(plan)))
    assert rows == [
        (SEND, "x", 1), (SEND, "y", 2), (REJECTED, "x", 4), (SEND, "z", 5), (READ, None, 5)
    ]  # fmt: skip


def test_a_changed_line_is_sent_again_and_an_unchanged_one_skipped(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        lines({"custom_id": "a", "prompt": "1"}, {"custom_id": "b", "prompt": "2"}).getvalue()
    )
    first = list(request_tables(ReadPlan(job=job_for(src), files=[str(src)], block_rows=10)))
    hashes = dict(
        zip(first[0]["custom_id"].to_pylist(), first[0]["body_hash"].to_pylist(), strict=True)
    )
    src.write_bytes(
        lines({"custom_id": "a", "prompt": "1"}, {"custom_id": "b", "prompt": "changed"}).getvalue()
    )
    known = {cid: (True, h) for cid, h in hashes.items() if cid is not None}
    plan = ReadPlan(job=job_for(src), files=[str(src)], block_rows=10, known=known)
    assert kinds(list(request_tables(plan))) == [
        (SKIPPED, "a", None), (RESENT, "b", None), (SEND, "b", 2), (READ, None, 2)
    ]  # fmt: skip


def test_a_finished_block_comes_apart_into_records_hashes_rejects_and_counts() -> None:
    stop = result("", STOPPED, error_message="no quota", error_code="insufficient_quota")
    table = results_table([result("a"), stop, result("b", "error", error_code="http_500")])
    markers: list[dict[str, Any]] = [
        {"kind": REJECTED, "custom_id": "c", "line": 3, "reason": "no messages", "text": "{}"},
        {"kind": SKIPPED, "custom_id": "d"},
        {"kind": RESENT, "custom_id": "b"},
        {"kind": READ, "line": 9},
        {"kind": SENT, "line": 2},
    ]
    block = _with_markers(table, markers, {"a": "ha", "b": "hb"})
    stats = RunStats()
    done = take_apart(block, stats)
    assert done.records["custom_id"].to_pylist() == ["a", "b"]
    assert "body_hash" not in done.records.column_names
    assert done.hashes == {"a": "ha", "b": "hb"}
    assert done.rejects == [Reject(line=3, reason="no messages", text="{}", custom_id="c")]
    assert done.stop is not None and done.stop["error_message"] == "no quota"
    assert done.stop["error_code"] == "insufficient_quota"
    assert (stats.skipped, stats.resent, stats.rejected) == (1, 1, 1)
    assert (stats.lines_read, stats.submitted) == (9, 2)


def test_a_finished_block_is_counted_into_the_stats() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    block = results_table(
        [result("a", usage=usage, attempts=2), result("b", "error", error_code="http_500")]
    )
    stats = RunStats()
    count_rows(block, stats)
    assert (stats.ok, stats.error, stats.attempts) == (1, 1, 3)
    assert (stats.prompt_tokens, stats.completion_tokens) == (3, 4)
    assert stats.error_codes == {"http_500": 1}


@pytest.mark.parametrize(
    ("retry_errors", "ok", "retryable", "final"),
    [("none", True, True, True), ("all", True, False, False), ("retryable", True, False, True)],
)
def test_what_a_rerun_counts_as_done(
    retry_errors: RetryErrors, ok: bool, retryable: bool, final: bool
) -> None:
    assert done(Record("ok", 200, None, 0), retry_errors) is ok
    assert done(Record("error", 503, "http_503", 0), retry_errors) is retryable
    assert done(Record("error", 400, "invalid_request", 0), retry_errors) is final


def test_a_rerun_knows_the_ids_done_and_their_hashes(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    prepare(out, restart=False)
    old = [result("a"), result("b", "error", status_code=500, error_code="http_500")]
    path = part_path(out, new_stamp(4), 0)
    write_part(path, results_table(old), part_metadata({}, 4, {"a": "ha", "b": "hb"}))
    found = rerun(out, restart=False, retry_errors="all")
    assert found.known == {"a": (True, "ha"), "b": (False, "hb")}
    assert found.run == 5  # one more than the folder's highest
    fresh = rerun(out, restart=True, retry_errors="none")
    assert (fresh.known, fresh.run) == ({}, 1)


def test_the_later_run_then_the_later_block_wins_an_id_found_twice(tmp_path: Path) -> None:
    """A re-sent id whose old record was not dropped yet (the run stopped in between): the
    winner is the part of the later run, then of the later block; the parts' times and
    names as clocks play no part (a part from a time-stamped name counts as run 0)."""
    out = tmp_path / "out.parquet"
    out.mkdir()
    legacy = part_path(out, "20990101T000000000000-ffffff", 7)  # a clock far ahead
    write_part(legacy, results_table([result("a", "error"), result("z")]), None)
    ninth = part_path(out, "000009-ffffff", 0)
    write_part(ninth, results_table([result("a", "error"), result("b", "error")]), None)
    tenth = part_path(out, "000010-000000", 2)  # "0..." sorts first by its random part
    write_part(tenth, results_table([result("b")]), None)
    later_block = part_path(out, "000010-000000", 10)
    write_part(later_block, results_table([result("a")]), None)
    os.utime(ninth, (2**31, 2**31))  # the newest file by its time: no matter

    found = prepare(out, restart=False)

    assert {cid: r.status for cid, r in found.records.items()} == {"a": "ok", "b": "ok", "z": "ok"}
    assert rerun(out, restart=False, retry_errors="none").run == 11
    assert [r["custom_id"] for r in read_results(legacy)] == ["z"]
    assert not ninth.exists()  # both its records were replaced


def test_a_workers_error_comes_back_as_its_own_line() -> None:
    try:
        try:
            raise RuntimeError(f"Traceback...\n  {ERROR_MARK}$KEY is not set on the worker\n")
        except RuntimeError as inner:
            raise ValueError("ray wrapping") from inner
    except ValueError as outer:
        assert first_line(outer) == "$KEY is not set on the worker"
    assert first_line(OSError("first\nlast line\n\n")) == "last line"
    assert first_line(KeyError()) == "KeyError"


def test_the_read_task_opens_uris_parquet_through_a_template_and_gzip(tmp_path: Path) -> None:
    import gzip

    import pyarrow.parquet as pq

    from batcher.config import TemplateConfig

    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"key": ["k1", "k2"], "q": ["one", "two"]}), table)
    job = dataclasses.replace(
        job_for(table), template=TemplateConfig(user="Q: {q}", id_column="key")
    )
    uri = f"file://{table}"
    assert input_files(f"file://{tmp_path}/*.parquet") == [uri]
    rows = list(request_tables(ReadPlan(job=job, files=[uri], block_rows=10)))
    assert kinds(rows) == [(SEND, "k1", 1), (SEND, "k2", 2), (READ, None, 2)]
    assert json.loads(rows[0]["input"][1].as_py()) == {"key": "k2", "q": "two"}

    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress(lines({"custom_id": "z", "prompt": "1"}).getvalue()))
    plan = ReadPlan(job=job_for(packed), files=[f"file://{packed}"], block_rows=10)
    assert kinds(list(request_tables(plan))) == [(SEND, "z", 1), (READ, None, 1)]


def test_parts_another_driver_wrote_to_the_same_prefix_are_noticed(s3_bucket: str) -> None:
    output = f"s3://{s3_bucket}/out.parquet"
    before = part_path(output, new_stamp(1), 0)
    write_part(before, results_table([result("a")]), None)
    found = rerun(output, restart=False, retry_errors="none")
    assert found.run == 2 and found.stamp.startswith("000002-")  # after the highest listed
    write_part(part_path(output, found.stamp, 0), results_table([result("b")]), None)
    assert strangers(output, found) == []  # its own parts and older runs' are not strangers
    other = part_path(output, new_stamp(2), 3)  # a driver that listed the same parts
    write_part(other, results_table([result("c")]), None)
    assert strangers(output, found) == [other.rpartition("/")[2]]


def test_a_worker_writes_its_block_as_a_part_and_sends_back_only_what_is_counted(
    tmp_path: Path,
) -> None:
    from batcher.output.parts import order_key, scan
    from batcher.output.rows import PLAIN, schema_for
    from batcher.ray.blocks import write_on_worker
    from batcher.ray.folder import PartFiles

    said = {"choices": [{"message": {"role": "assistant", "content": "long answer"}}]}
    answers = [result("a", line=7, body=said), result("b", line=8, body=said)]
    markers: list[dict[str, Any]] = [
        {"kind": REJECTED, "custom_id": "c", "line": 9, "reason": "no messages", "text": "{}"},
        {"kind": SENT, "line": 2},
    ]
    block = _with_markers(results_table(answers), markers, {"a": "ha", "b": "hb"})
    folder = tmp_path / "out.parquet"
    folder.mkdir()
    files = PartFiles(
        output=folder, run=3, stamp=new_stamp(3), metadata={}, schema=schema_for(PLAIN)
    )

    slim = write_on_worker(block, files)

    found = scan(folder)
    assert [order_key(p)[:2] for p in found.parts] == [(3, 7)]  # named after its first line
    assert {c: r.hash for c, r in found.records.items()} == {"a": "ha", "b": "hb"}
    assert read_results(folder).__next__()["content"] == "long answer"
    stats = RunStats()
    done = take_apart(slim, stats)
    assert done.records["content"].to_pylist() == [None, None]  # the answers stay in the part
    assert done.rejects == [Reject(line=9, reason="no messages", text="{}", custom_id="c")]
    count_rows(done.records, stats)
    assert (stats.ok, stats.submitted, stats.rejected) == (2, 2, 1)


def test_ids_from_numbers_and_duplicates_run_on_across_a_globs_files(tmp_path: Path) -> None:
    from batcher.config import TemplateConfig

    (tmp_path / "1.jsonl").write_bytes(lines({"prompt": "a"}, {"prompt": "b"}).getvalue())
    (tmp_path / "2.jsonl").write_bytes(lines({"prompt": "c"}, {"prompt": "d"}).getvalue())
    files = input_files(str(tmp_path / "*.jsonl"))
    plan = ReadPlan(job=job_for(tmp_path / "1.jsonl"), files=files, block_rows=10)
    assert kinds(list(request_tables(plan))) == [
        (SEND, "line-1", 1), (SEND, "line-2", 2), (SEND, "line-3", 3), (SEND, "line-4", 4),
        (READ, None, 4),
    ]  # fmt: skip

    (tmp_path / "1.csv").write_text("q\none\ntwo\n")
    (tmp_path / "2.csv").write_text("q\nthree\n\nfour\n")
    job = dataclasses.replace(job_for(tmp_path / "1.csv"), template=TemplateConfig(user="{q}"))
    plan = ReadPlan(job=job, files=input_files(str(tmp_path / "*.csv")), block_rows=10)
    assert kinds(list(request_tables(plan))) == [
        (SEND, "1", 1), (SEND, "2", 2), (SEND, "3", 3), (SEND, "4", 4), (READ, None, 4)
    ]  # fmt: skip


def test_a_duplicate_in_a_later_file_is_rejected_with_its_line_as_written(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.jsonl").write_bytes(b'{"custom_id": "x", "prompt": "1"}\n')
    (tmp_path / "b.jsonl").write_bytes(b'{"prompt":"2",  "custom_id":"x"}\n')
    job = dataclasses.replace(job_for(tmp_path / "a.jsonl"))
    files = input_files(str(tmp_path / "*.jsonl"))
    tables = list(request_tables(ReadPlan(job=job, files=files, block_rows=10)))
    rejected = [r for t in tables for r in t.to_pylist() if r["kind"] == REJECTED]
    assert [(r["custom_id"], r["line"], r["text"]) for r in rejected] == [
        ("x", 2, '{"prompt":"2",  "custom_id":"x"}')
    ]


def test_input_errors_never_show_the_uris_credentials(s3_bucket: str, tmp_path: Path) -> None:
    from batcher.errors import BatcherError

    canary = "LEAKCANARY1"
    for spec in (
        f"s3://AKQ:{canary}@{s3_bucket}/missing.jsonl",
        f"s3://AKQ:{canary}@{s3_bucket}/nothing/*.jsonl",
        f"s3://AKQ:{canary}@no-such-bucket-here/*.jsonl",
    ):
        with pytest.raises(BatcherError) as caught:
            input_files(spec)
        assert canary not in str(caught.value) and "AKQ" not in str(caught.value)
        assert s3_bucket in str(caught.value) or "no-such-bucket-here" in str(caught.value)
    with pytest.raises(BatcherError) as caught:
        job = job_for(tmp_path / "x.jsonl")
        list(
            request_tables(ReadPlan(job=job, files=[f"s3://AKQ:{canary}@nb/x.jsonl"], block_rows=1))
        )
    assert canary not in str(caught.value)
