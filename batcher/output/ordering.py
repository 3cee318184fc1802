"""The output's row order: the input's, line by line, then each line's variants in the order the
job declares them (``InputOrder``), and the sort that puts journal records in it (``sorted_by``).

A record is placed by one integer, ``line * (variants + 1) + rank``; a record of a variant the
job no longer declares (or of none, in a sweep) ranks after the declared ones. Records of the
same key (a line that changed place between runs) keep the order they were journaled in: the
sort is stable.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batcher.output.journal import Journal
    from batcher.records import Result

#: Offsets handed out at a time by ``sorted_by``: Python ints only for this many.
_CHUNK = 1 << 16


class InputOrder:
    """The order key of a record: its input line, then its variant's rank."""

    def __init__(self, variants: Sequence[str] = ()) -> None:
        """``variants``: the job's variant names, in the order declared (none: ``()``)."""
        self._rank: dict[str | None, int] = {name: i for i, name in enumerate(variants)}
        self._width = len(self._rank) + 1

    def key(self, line: Any, variant: Any) -> int:
        """The key of a record of input line ``line`` (1-based) and ``variant`` (or ``None``)."""
        number = line if isinstance(line, int) and not isinstance(line, bool) and line > 0 else 0
        name = variant if isinstance(variant, str) else None
        return number * self._width + self._rank.get(name, self._width - 1)

    def of(self, result: Result) -> int:
        """The key of a result."""
        return self.key(result.line, result.variant)

    def first(self, line: int) -> int:
        """The lowest key of input line ``line``: every record of an earlier line is below."""
        return line * self._width


def records_in_order(journal: Journal, order: InputOrder) -> Iterator[dict[str, Any]]:
    """The journal's latest records in ``order``: an index of (key, offset) made in one pass,
    sorted, then each record read back by its offset; no record is held."""
    keys, offsets = array("q"), array("q")
    for offset, record in journal.latest():
        keys.append(order.key(record.get("line"), record.get("variant")))
        offsets.append(offset)
    return journal.read_at(sorted_by(keys, offsets))


def sorted_by(keys: array[int], values: array[int]) -> Iterator[int]:
    """``values`` in the order of their ``keys`` (stable: equal keys keep their order).

    Both are ``array("q")``: 16 bytes a record, plus 16 at the sort (its indices, then the
    values taken in order), done by Arrow on the arrays' own buffers. Values come out
    ``_CHUNK`` at a time as Python ints."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(keys)
    by_key = pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(keys)])
    values_ = pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(values)])
    column = pc.take(values_, pc.sort_indices(by_key))
    for start in range(0, n, _CHUNK):
        yield from column.slice(start, _CHUNK).to_pylist()
