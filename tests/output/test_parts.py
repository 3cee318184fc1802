"""The Ray engine's output folder of Parquet parts (``batcher.output.parts``): names that sort
in the order runs wrote them, whole parts only, one run at a time, each id's latest record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.errors import ConfigError, OutputError
from batcher.output.parts import (
    compact,
    locked,
    new_stamp,
    next_run,
    part_path,
    prepare,
    scan,
    write_part,
)
from batcher.output.rows import PLAIN, schema_for
from batcher.output.writers import SCHEMA, parquet_parts, results_table
from batcher.records import Result, Status


def result(cid: str, status: Status = "ok", code: int | None = 200) -> Result:
    return Result(custom_id=cid, line=1, status=status, model="m", attempts=1, latency_s=0.1,
                  started_at=1.0, finished_at=2.0, status_code=code,
                  error_code=None if status == "ok" else "server_error")  # fmt: skip


def write(folder: Path | str, stamp: str, *results: Result) -> Path | str:
    path = part_path(folder, stamp, 0)
    write_part(path, results_table(list(results)), None)
    return path


def test_a_stamp_names_its_run() -> None:
    stamps = [new_stamp(run) for run in (9, 10, 11)]
    assert stamps == sorted(stamps) and stamps[0].startswith("000009-")
    assert part_path(Path("o"), "S", 7) == Path("o/part-S-00007.parquet")


def test_a_part_is_written_whole_with_the_output_schema(tmp_path: Path) -> None:
    # as a Ray block may come: a column of a wider type than the schema's
    table = results_table([result("a")])
    at = table.schema.get_field_index("attempts")
    narrow = table.set_column(at, "attempts", table["attempts"].cast(pa.int64()))
    assert narrow.schema != SCHEMA
    path = tmp_path / "part-1.parquet"
    write_part(path, narrow.replace_schema_metadata({"own": "1"}), {"batcher.input": "in"})
    assert pq.read_schema(path).remove_metadata() == schema_for(PLAIN)
    assert pq.read_schema(path).metadata == {b"batcher.input": b"in"}  # replaced
    write_part(path, narrow.replace_schema_metadata({"own": "1"}), None)
    assert pq.read_schema(path).metadata == {b"own": b"1"}  # kept
    assert [p.name for p in tmp_path.iterdir()] == ["part-1.parquet"]  # no .partial left


def test_scan_keeps_each_id_s_latest_record(tmp_path: Path) -> None:
    first = write(tmp_path, "1", result("a", "error", 503), result("b"))
    second = write(tmp_path, "2", result("a"))
    found = scan(tmp_path)
    assert found.parts == [first, second] and found.duplicated
    assert found.records["a"].status == "ok" and found.records["a"].part == 1
    assert (found.records["b"].status, found.records["b"].status_code) == ("ok", 200)
    assert found.counts() == {"ok": 2}


def test_compact_drops_replaced_rows_and_empty_parts(tmp_path: Path) -> None:
    first = write(tmp_path, "1", result("a", "error", 503), result("b", "error", 500))
    write(tmp_path, "2", result("a"), result("c"))
    third = write(tmp_path, "3", result("b"))
    compact(scan(tmp_path))
    assert first not in parquet_parts(tmp_path)  # every row in it was replaced
    after = scan(tmp_path)
    assert not after.duplicated and len(after.parts) == 2 and third in after.parts
    assert {cid: r.status for cid, r in after.records.items()} == {"a": "ok", "b": "ok", "c": "ok"}


def test_prepare_removes_what_a_crash_left_and_restart_empties_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "out.parquet"
    assert prepare(folder, restart=False).records == {}  # made
    write(folder, "1", result("a", "error", 503))
    write(folder, "2", result("a"))
    (folder / ".part-3-00000.parquet.partial").write_bytes(b"PAR1")
    found = prepare(folder, restart=False)
    assert not found.duplicated and list(found.records) == ["a"]
    assert not list(folder.glob(".*.partial"))
    assert prepare(folder, restart=True).records == {} and parquet_parts(folder) == []


def test_a_part_that_is_not_parquet_is_an_output_error(tmp_path: Path) -> None:
    (tmp_path / "part-1.parquet").write_bytes(b"not parquet")
    with pytest.raises(OutputError, match=r"cannot read .*part-1\.parquet"):
        scan(tmp_path)


def test_one_run_at_a_time_per_folder(tmp_path: Path) -> None:
    with locked(tmp_path):
        with (
            pytest.raises(ConfigError, match="another batcher run is writing") as info,
            locked(tmp_path),
        ):
            pass
        assert info.value.field == "job.output"
    with locked(tmp_path):  # released with the first run
        pass


def test_a_folder_in_a_bucket_is_its_objects_under_the_prefix(s3_bucket: str) -> None:
    from tests.s3_server import S3_CANARY, exists, get, put

    folder = f"s3://{s3_bucket}/runs/out.parquet"
    assert prepare(folder, restart=False).records == {}  # nothing there yet: no error
    assert next_run(folder) == 1
    first = write(folder, new_stamp(1), result("a", "error", 503), result("b"))
    put(f"{folder}/.part-000002-abcdef-00000.parquet.partial", b"PAR1")  # an upload cut short
    put(f"s3://{s3_bucket}/runs/out.parquet.rejects.jsonl", b"{}\n")  # beside, not under
    second = write(folder, new_stamp(2), result("a"))
    assert next_run(folder) == 3  # one more than the highest run among the names listed
    hidden = f"{folder}/.{str(second).rpartition('/')[2]}.partial"  # uploaded, copied, deleted
    assert not exists(hidden) and get(str(second))[:4] == b"PAR1"

    found = prepare(folder, restart=False)  # the duplicate kept once, the partial removed

    assert not exists(f"{folder}/.part-000002-abcdef-00000.parquet.partial")
    assert found.parts == [first, second] and not found.duplicated
    assert {cid: r.status for cid, r in found.records.items()} == {"a": "ok", "b": "ok"}
    assert pq.read_table(f"{s3_bucket}/runs/out.parquet", filesystem=_fs()).num_rows == 2
    assert prepare(folder, restart=True).records == {} and next_run(folder) == 1
    with locked(folder):  # no lock in a store: nothing held, nothing refused
        pass
    assert S3_CANARY not in folder


def test_an_unreachable_bucket_is_named_without_its_credentials(s3_bucket: str) -> None:
    with pytest.raises(ConfigError, match=r"^job\.output: the bucket of s3://no-such-bucket/o"):
        prepare("s3://no-such-bucket/o.parquet", restart=False)


def _fs() -> Any:
    from batcher.storage import filesystem

    return filesystem("s3://x")[0]
