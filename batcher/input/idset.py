"""A set of ids, for duplicate detection over inputs of millions of lines, in flat memory.

Only a 64-bit fingerprint of each id is kept (the process's own ``hash()`` of it). The first
``SPILL_AFTER`` (65,536) live in an open-addressing table of machine integers, about 16 bytes an
id (1 MiB at most); past that they move to a private temporary SQLite database, which keeps a
2 MiB page cache in memory and the rest in SQLite's temporary file (``$SQLITE_TMPDIR``,
``$TMPDIR``, ``/var/tmp`` or ``/tmp``; about 20 MB a million ids, deleted when the set is closed
or the process ends, however it ends). A Python ``set`` of ids costs about 90 bytes an id, the
table alone 16-32 (16 MB at a million); this way memory does not grow with the input.
An add costs about 0.6 µs in memory and 2-4 µs on disk.

Two different ids share a fingerprint with probability about n²/2⁶⁵ (3·10⁻⁸ for a million ids);
the cost of that is a line wrongly rejected as a duplicate, which the rejects file shows, never
a lost or duplicated request. Should the temporary database fail (no writable temporary folder,
a full disk), the fingerprints move back into memory and the set carries on there.
"""

from __future__ import annotations

import sqlite3
from array import array

from batcher.errors import InputError

_EMPTY = 0
_MIN_SLOTS = 1 << 10
#: Ids kept in memory before the set moves to a temporary database.
SPILL_AFTER = 1 << 16
_CACHE_KIB = 2048
_INSERT = "INSERT OR IGNORE INTO ids VALUES (?)"
_NEVER = 1 << 62


class IdSet:
    """Remembers fingerprints of ids; ``add`` says whether an id was new."""

    def __init__(self, *, spill_after: int = SPILL_AFTER) -> None:
        self._slots = array("q", [_EMPTY]) * _MIN_SLOTS
        self._mask = _MIN_SLOTS - 1
        self._count = 0
        self._spill_after = spill_after
        self._db: sqlite3.Connection | None = None

    def __len__(self) -> int:
        return self._count

    @property
    def on_disk(self) -> bool:
        """Whether the fingerprints are in the temporary database."""
        return self._db is not None

    def add(self, key: str) -> bool:
        """Add ``key``; return False if it (or an id with its fingerprint) was already there."""
        fingerprint = hash(key) or 1  # 0 marks an empty slot
        if self._db is not None:
            try:
                new: bool = self._db.execute(_INSERT, (fingerprint,)).rowcount == 1
            except sqlite3.Error:
                self._back_to_memory()
            else:
                self._count += new
                return new
        new = self._add_in_memory(fingerprint)
        if new and self._count >= self._spill_after and self._db is None:
            self._spill()
        return new

    def close(self) -> None:
        """Drop the temporary database, if any (the set is empty afterwards)."""
        if self._db is not None:
            self._db.close()
            self._db = None
        self._slots = array("q", [_EMPTY]) * _MIN_SLOTS
        self._mask = _MIN_SLOTS - 1
        self._count = 0

    def _add_in_memory(self, fingerprint: int) -> bool:
        slots, mask = self._slots, self._mask
        i = fingerprint & mask
        while True:
            current = slots[i]
            if current == _EMPTY:
                break
            if current == fingerprint:
                return False
            i = (i + 1) & mask
        slots[i] = fingerprint
        self._count += 1
        if self._count * 2 > mask:
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._slots
        size = len(old) * 2
        self._slots = slots = array("q", [_EMPTY]) * size
        self._mask = mask = size - 1
        for fingerprint in old:
            if fingerprint != _EMPTY:
                i = fingerprint & mask
                while slots[i] != _EMPTY:
                    i = (i + 1) & mask
                slots[i] = fingerprint

    def _spill(self) -> None:
        """Move the fingerprints to a temporary database; stay in memory if that fails."""
        db = None
        try:
            # "": SQLite's private temporary database, deleted on close. The reading thread
            # changes (anyio's worker threads), calls never overlap: no same-thread check.
            db = sqlite3.connect("", isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
            db.execute("PRAGMA journal_mode = OFF")
            db.execute("PRAGMA synchronous = OFF")
            db.execute("CREATE TABLE ids (fp INTEGER PRIMARY KEY) WITHOUT ROWID")
            db.execute("BEGIN")  # one transaction, never committed: nothing to make durable
            db.executemany(_INSERT, ((f,) for f in self._slots if f != _EMPTY))
        except sqlite3.Error:
            if db is not None:
                db.close()
            self._spill_after = _NEVER  # do not try again
            return
        self._db = db
        self._slots = array("q")
        self._mask = 0

    def _back_to_memory(self) -> None:
        """The database failed: read its fingerprints back into a table in memory."""
        db, self._db = self._db, None
        assert db is not None
        self._spill_after = _NEVER  # do not try again
        size = _MIN_SLOTS
        while size < 2 * (self._count + 1):
            size *= 2
        self._slots = array("q", [_EMPTY]) * size
        self._mask = size - 1
        self._count = 0
        try:
            for (fingerprint,) in db.execute("SELECT fp FROM ids"):
                self._add_in_memory(fingerprint)
        except sqlite3.Error as exc:
            raise InputError(
                f"cannot check the ids for duplicates: the temporary database failed ({exc})"
            ) from None
        finally:
            db.close()
