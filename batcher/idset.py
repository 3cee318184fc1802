"""A compact set of ids, for duplicate detection over inputs of millions of lines.

A Python ``set`` of id strings costs about 90 bytes an id; this keeps only a 64-bit fingerprint
(the process's own ``hash()`` of the id) in an open-addressing table of machine integers, about
16 bytes an id. Two different ids share a fingerprint with probability about n²/2⁶⁵ (3·10⁻⁸ for a
million ids); the cost of that is a line wrongly rejected as a duplicate, which the rejects file
shows, never a lost or duplicated request.
"""

from __future__ import annotations

from array import array

_EMPTY = 0
_MIN_SLOTS = 1 << 10


class IdSet:
    """Remembers fingerprints of ids; ``add`` says whether an id was new."""

    def __init__(self) -> None:
        self._slots = array("q", [_EMPTY]) * _MIN_SLOTS
        self._mask = _MIN_SLOTS - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, key: str) -> bool:
        """Add ``key``; return False if it (or an id with its fingerprint) was already there."""
        fingerprint = hash(key) or 1  # 0 marks an empty slot
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
