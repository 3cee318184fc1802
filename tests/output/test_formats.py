"""Output formats and the rejects file (``batcher.output.formats``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batcher.errors import ConfigError, OutputError
from batcher.output.formats import RejectsWriter, output_format
from batcher.records import Reject


@pytest.mark.parametrize(
    ("name", "suffix"),
    [("o.jsonl", ".jsonl"), ("o.parquet", ".parquet"), ("O.PARQUET", ".parquet"),
     ("a.b.JsonL", ".jsonl")],
)  # fmt: skip
def test_output_format_by_suffix(name: str, suffix: str) -> None:
    assert output_format(Path(name)) == suffix


@pytest.mark.parametrize("name", ["o.csv", "o", "o.jsonl.gz", "o.parquet/"])
def test_other_suffixes_are_a_config_error_naming_the_output(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        output_format(Path(name + ("x" if name.endswith("/") else "")))
    assert info.value.field == "output" and ".jsonl" in str(info.value)


def lines_of(path: Path) -> list[dict[str, object]]:
    return [json.loads(s) for s in path.read_text(encoding="utf-8").splitlines()]


def test_no_rejects_no_file(tmp_path: Path) -> None:
    path = tmp_path / "out.rejects.jsonl"
    with RejectsWriter(path) as rw:
        pass
    assert rw.count == 0 and not path.exists()


def test_rejects_are_written_in_order_and_a_rerun_replaces_them(tmp_path: Path) -> None:
    path = tmp_path / "out.rejects.jsonl"
    with RejectsWriter(path) as rw:
        rw.write(Reject(line=3, reason="not valid JSON", text="{oops 🎉"))
        rw.write(Reject(line=9, reason="duplicate custom_id", text="{}", custom_id="a"))
    assert rw.count == 2
    assert lines_of(path) == [
        {"line": 3, "reason": "not valid JSON", "custom_id": None, "text": "{oops 🎉"},
        {"line": 9, "reason": "duplicate custom_id", "custom_id": "a", "text": "{}"},
    ]
    with RejectsWriter(path) as rw:  # the same input again: its rejects once, not twice
        rw.write(Reject(line=3, reason="not valid JSON", text="{oops 🎉"))
    assert [line["line"] for line in lines_of(path)] == [3]


def test_text_that_is_not_unicode_is_kept_escaped(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with RejectsWriter(path) as rw:
        rw.write(Reject(line=1, reason="not UTF-8", text="a\udcff\u2028b"))
    raw = path.read_text(encoding="utf-8")
    assert raw.count("\n") == 1  # U+2028 inside the text does not end the line
    assert json.loads(raw)["text"] == "a\udcff\u2028b"  # the lone surrogate escaped, read back


def test_close_is_idempotent_and_the_block_s_error_passes_through(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with pytest.raises(RuntimeError, match="boom"), RejectsWriter(path) as rw:
        rw.write(Reject(line=1, reason="r", text="t"))
        raise RuntimeError("boom")
    rw.close()
    assert lines_of(path) == [{"line": 1, "reason": "r", "custom_id": None, "text": "t"}]


def test_an_unwritable_rejects_file_is_an_output_error(tmp_path: Path) -> None:
    folder = tmp_path / "taken.jsonl"
    folder.mkdir()
    with RejectsWriter(folder) as rw, pytest.raises(OutputError, match="cannot write"):
        rw.write(Reject(line=1, reason="r", text="t"))
