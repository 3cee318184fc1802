"""Several input files joined into one: lines numbered on across files in sorted order, a
later file's header and BOM dropped, forms and columns that do not agree refused."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.errors import InputError
from batcher.input.joined import join
from batcher.job_file import job_from_dict
from batcher.runner.staging import stage


def test_jsonl_files_join_line_after_line(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b'{"prompt": "1"}\n{"prompt": "2"}')  # no last newline
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'\xef\xbb\xbf{"prompt": "3"}\n'))
    out = tmp_path / "out"
    out.mkdir()
    joined = join([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"], out)
    assert joined.read_bytes() == b'{"prompt": "1"}\n{"prompt": "2"}\n{"prompt": "3"}\n'


def test_csv_files_keep_one_header_and_must_share_it(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(b"q,id\r\nx,1\r\n")
    (tmp_path / "b.csv").write_bytes(b"q,id\ny,2\n")
    (tmp_path / "c.csv").write_bytes(b"other,id\nz,3\n")
    out = tmp_path / "out"
    out.mkdir()
    joined = join([tmp_path / "a.csv", tmp_path / "b.csv"], out)
    assert joined.read_bytes() == b"q,id\r\nx,1\r\ny,2\n"
    with pytest.raises(InputError, match=r"c\.csv starts with another header than .*a\.csv"):
        join([tmp_path / "a.csv", tmp_path / "c.csv"], out)


def test_parquet_files_join_and_must_share_their_schema(tmp_path: Path) -> None:
    pq.write_table(pa.table({"q": ["a", "b"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"q": ["c"]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"q": [1]}), tmp_path / "c.parquet")
    out = tmp_path / "out"
    out.mkdir()
    joined = join([tmp_path / "a.parquet", tmp_path / "b.parquet"], out)
    assert pq.read_table(joined).column("q").to_pylist() == ["a", "b", "c"]
    with pytest.raises(InputError, match=r"c\.parquet has other columns"):
        join([tmp_path / "a.parquet", tmp_path / "c.parquet"], out)


def test_files_of_several_forms_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("q\nx\n")
    (tmp_path / "b.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match="not all of one form"):
        join([tmp_path / "a.csv", tmp_path / "b.jsonl"], tmp_path)


def test_a_local_glob_is_joined_for_the_run_and_the_copy_removed_after(tmp_path: Path) -> None:
    for name, n in (("p2.jsonl", 2), ("p1.jsonl", 1)):
        (tmp_path / name).write_text(f'{{"prompt": "{name}"}}\n' * n)
    job = job_from_dict({"job": {"input": str(tmp_path / "p*.jsonl"), "output": "o.jsonl"}})
    staging = stage(job)
    assert isinstance(staging.job.input, Path)
    text = staging.job.input.read_text()
    assert text.splitlines() == ['{"prompt": "p1.jsonl"}'] + ['{"prompt": "p2.jsonl"}'] * 2
    staging.close()
    assert not staging.job.input.exists()
    # a killed run's copy (its process gone) is removed by the next run that makes one
    orphan = staging.job.input.parent.parent / "999999999-x"
    orphan.mkdir()
    mine = stage(job)
    assert not orphan.exists() and isinstance(mine.job.input, Path) and mine.job.input.exists()
    mine.close()
    # a file whose name looks like a pattern is that file
    odd = tmp_path / "p[1].jsonl"
    odd.write_text('{"prompt": "odd"}\n')
    assert stage(job_from_dict({"job": {"input": str(odd)}})).job.input == odd
    # one local file: read where it is, nothing copied
    single = stage(job_from_dict({"job": {"input": str(tmp_path / "p1.jsonl")}}))
    assert single.job.input == tmp_path / "p1.jsonl"
