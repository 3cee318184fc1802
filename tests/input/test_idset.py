"""The id set: exactly a set of ids, in memory, on disk and when its database fails."""

from __future__ import annotations

import sqlite3
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batcher.errors import InputError
from batcher.input import idset
from batcher.input.idset import IdSet

Connection = TypeVar("Connection", bound=sqlite3.Connection)


class FullDisk(sqlite3.Connection):
    """A connection whose inserts fail once ``full`` is set (a full disk); reads still work."""

    full = False

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if self.full and sql.startswith("INSERT"):
            raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, parameters)


class Unreadable(FullDisk):
    """A full disk whose reads fail too."""

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if self.full and sql.startswith("SELECT"):
            raise sqlite3.DatabaseError("database disk image is malformed")
        return super().execute(sql, parameters)


def connections_of(monkeypatch: pytest.MonkeyPatch, factory: type[Connection]) -> list[Connection]:
    """Make the id set's temporary databases connections of ``factory``; the list fills with
    them as they open."""
    opened: list[Connection] = []
    connect = sqlite3.connect

    def connect_with(*args: Any, **kwargs: Any) -> Connection:
        db = connect(*args, **kwargs, factory=factory)
        opened.append(db)
        return db

    monkeypatch.setattr(sqlite3, "connect", connect_with)
    return opened


# A few ids repeat, so both answers of ``add`` are exercised.
ids_added = st.lists(st.text(max_size=4), max_size=150)


@settings(max_examples=40, deadline=None)
@given(ids=ids_added, spill_after=st.sampled_from([1, 7, 64, idset.SPILL_AFTER]))
def test_add_answers_as_a_set_would(ids: list[str], spill_after: int) -> None:
    seen: set[str] = set()
    found = IdSet(spill_after=spill_after)
    try:
        for key in ids:
            assert found.add(key) == (key not in seen), key
            seen.add(key)
            assert len(found) == len(seen)
        assert found.on_disk == (len(seen) >= spill_after)
    finally:
        found.close()


def test_finds_duplicates_across_growth() -> None:
    ids = IdSet()
    assert all(ids.add(f"id-{i}") for i in range(5000))
    assert len(ids) == 5000
    assert not any(ids.add(f"id-{i}") for i in range(0, 5000, 7))
    assert ids.add("id-5000")


def test_an_id_whose_hash_is_zero_is_remembered() -> None:
    # 0 marks an empty slot in the table: an id hashing to 0 must still count as present.
    class ZeroHash(str):
        def __hash__(self) -> int:
            return 0

    ids = IdSet()
    assert ids.add(ZeroHash("a"))
    assert not ids.add(ZeroHash("a"))
    assert len(ids) == 1


def test_moves_to_a_temporary_database_and_still_finds_duplicates() -> None:
    ids = IdSet(spill_after=1000)
    assert all(ids.add(f"id-{i}") for i in range(999))
    assert not ids.on_disk
    assert ids.add("id-999") and ids.on_disk  # the 1000th id moves the set to disk
    assert all(ids.add(f"id-{i}") for i in range(1000, 5000))
    assert len(ids) == 5000
    assert not any(ids.add(f"id-{i}") for i in range(0, 5000, 7))  # before and after the move
    assert len(ids) == 5000
    ids.close()
    assert len(ids) == 0 and not ids.on_disk and ids.add("id-1")


def test_a_failing_database_hands_its_ids_back_to_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = connections_of(monkeypatch, FullDisk)
    ids = IdSet(spill_after=100)
    assert all(ids.add(f"id-{i}") for i in range(200)) and ids.on_disk
    assert len(opened) == 1 and isinstance(opened[0], FullDisk)
    opened[0].full = True
    assert ids.add("id-200") and not ids.on_disk  # back in memory, with all 200 before it
    assert not any(ids.add(f"id-{i}") for i in range(201))
    assert len(ids) == 201
    assert all(ids.add(f"id-{i}") for i in range(201, 400))  # and it stays there
    assert not ids.on_disk and len(opened) == 1


def test_without_a_database_the_set_stays_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_database(*args: object, **kwargs: object) -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite3, "connect", no_database)
    ids = IdSet(spill_after=100)
    assert all(ids.add(f"id-{i}") for i in range(300)) and not ids.on_disk
    assert not any(ids.add(f"id-{i}") for i in range(300))


def test_a_database_that_cannot_be_read_back_is_an_input_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened = connections_of(monkeypatch, Unreadable)
    ids = IdSet(spill_after=10)
    assert all(ids.add(f"id-{i}") for i in range(20)) and ids.on_disk
    opened[0].full = True
    with pytest.raises(InputError, match="cannot check the ids for duplicates"):
        ids.add("id-20")
