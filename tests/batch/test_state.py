"""The chunk-state journal: latest state per chunk, a torn last line survived and cut off, a
broken line elsewhere named."""

from __future__ import annotations

from pathlib import Path

import pytest

from batcher.batch.api import RequestCounts
from batcher.batch.state import StateJournal, read_states, state_path
from batcher.errors import OutputError


def test_latest_state_per_chunk_survives_reopening(tmp_path: Path) -> None:
    path = state_path(tmp_path / "out.parquet")
    assert path.name == "out.parquet.batches.jsonl"
    with StateJournal(path) as journal:
        journal.record("c1", status="uploaded", file_id="file-1")
        journal.record("c2", status="uploaded", file_id="file-2")
        journal.record("c1", status="validating", batch_id="batch_1")
        counts = RequestCounts(total=3, completed=2, failed=1)
        journal.record("c1", status="completed", request_counts=counts)
    states = read_states(path)
    assert states["c1"].file_id == "file-1"  # earlier fields are kept
    assert (states["c1"].batch_id, states["c1"].status) == ("batch_1", "completed")
    assert states["c1"].request_counts == counts
    assert states["c2"].status == "uploaded" and states["c2"].batch_id is None
    with StateJournal(path) as journal:
        assert journal.states == states


def test_a_torn_last_line_is_ignored_and_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    with StateJournal(path) as journal:
        journal.record("c1", status="uploaded", file_id="file-1")
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"chunk":"c1","status":"valid')  # died mid-write
    assert read_states(path)["c1"].status == "uploaded"
    with StateJournal(path) as journal:
        assert path.read_bytes() == whole
        journal.record("c1", status="validating", batch_id="batch_1")
    assert read_states(path)["c1"].batch_id == "batch_1"
    assert len(path.read_bytes().splitlines()) == 2


def test_a_whole_record_without_its_newline_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    with StateJournal(path) as journal:
        journal.record("c1", status="uploaded")
        journal.record("c1", status="validating", batch_id="b")
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    assert read_states(path)["c1"].status == "uploaded"


def test_a_broken_line_before_the_last_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    with StateJournal(path) as journal:
        journal.record("c1", status="uploaded")
    path.write_bytes(b"garbage\n" + path.read_bytes() + path.read_bytes())
    with pytest.raises(OutputError, match="line 1 is not a chunk state"):
        read_states(path)
    with pytest.raises(OutputError, match="line 1"):
        StateJournal(path)


def test_no_journal_is_no_state(tmp_path: Path) -> None:
    assert read_states(tmp_path / "absent.jsonl") == {}
