"""The Ray driver's blocks, folder and session helpers, without Ray: requests into Arrow blocks,
finished blocks read back, what a re-run skips, and a worker's error as one line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pytest

from batcher.input.reader import Reader
from batcher.output.parts import Record, prepare, write_part
from batcher.output.resume import RetryErrors
from batcher.output.writers import results_table
from batcher.ray.blocks import Outbox, count_rows, request_blocks, split_stop_row
from batcher.ray.folder import done, rerun
from batcher.ray.session import first_line
from batcher.ray.worker import ERROR_MARK, STOPPED
from batcher.records import Reject, Result, Usage
from batcher.runner.stats import RunStats


def lines(*objs: object) -> io.BytesIO:
    return io.BytesIO(b"".join(json.dumps(o).encode() + b"\n" for o in objs))


def result(cid: str, status: str = "ok", **kw: object) -> Result:
    fields: dict[str, object] = {"line": 1, "model": "m", "attempts": 1, "latency_s": 0.1}
    fields |= {"started_at": 0.0, "finished_at": 0.1, "endpoint": "e"} | kw
    return Result(custom_id=cid, status=status, **fields)  # type: ignore[arg-type]


def test_requests_become_blocks_and_rejects_and_skipped_ids_come_apart() -> None:
    source = lines(
        {"custom_id": "a", "prompt": "1"},
        {"custom_id": "b", "prompt": "2"},
        {"custom_id": "c", "nothing": "here"},
        {"custom_id": "d", "prompt": "4", "metadata": {"k": 1}},
        {"custom_id": "e", "prompt": "5"},
    )
    reader = Reader(source, {"model": "m"})
    items = list(request_blocks(reader, skip={"b"}, block_rows=2))
    tables = [item for item in items if isinstance(item, pa.Table)]
    assert [t["custom_id"].to_pylist() for t in tables] == [["a", "d"], ["e"]]
    assert [item for item in items if isinstance(item, str)] == ["b"]
    [reject] = [item for item in items if isinstance(item, Reject)]
    assert (reject.line, reject.custom_id) == (3, "c")
    first = tables[0]
    assert first["line"].to_pylist() == [1, 4]
    assert json.loads(first["body"][0].as_py())["model"] == "m"
    assert first["metadata"].to_pylist() == [None, '{"k":1}']
    # prompts not counted: a typed column, not Arrow's null type
    assert first.schema.field("prompt_tokens").type == pa.int64()


def test_the_outbox_counts_the_requests_put() -> None:
    put: list[pa.Table] = []

    def store(table: pa.Table) -> int:
        put.append(table)
        return len(put)

    outbox = Outbox(put=store)
    outbox.send(pa.table({"custom_id": ["a", "b"]}))
    outbox.send(pa.table({"custom_id": ["c"]}))
    assert (outbox.refs, outbox.requests) == ([1, 2], 3)


def test_a_stop_row_is_taken_out_of_its_block() -> None:
    stop = result("", STOPPED, error_message="no quota", error_code="insufficient_quota")
    block = results_table([result("a"), stop, result("b", "error", error_code="http_500")])
    table, row = split_stop_row(block)
    assert table["custom_id"].to_pylist() == ["a", "b"]
    assert row == {"error_message": "no quota", "error_code": "insufficient_quota", "endpoint": "e"}
    assert split_stop_row(table) == (table, None)


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


def test_a_rerun_skips_the_ids_done_and_knows_those_sent_again(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    prepare(out, restart=False)
    old = [result("a"), result("b", "error", status_code=500, error_code="http_500")]
    write_part(out / "part-1-00000.parquet", results_table(old), None)
    found = rerun(out, restart=False, retry_errors="all")
    assert found.skip == {"a"}
    assert found.resent(pa.table({"custom_id": ["b", "c"]})) == 1
    assert rerun(out, restart=True, retry_errors="none").skip == set()


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
