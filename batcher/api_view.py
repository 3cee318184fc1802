"""The dataset view of a run's output (``RunResult.to_pandas``, ``to_polars``, ``to_dataset``):
one row per answer, in input order (line, then variants in the order the job declares them),
the input's own columns first, then the output's columns.

The input's columns come from the output's ``input`` struct column when it has one (tabular
input), else from the in-memory rows ``batcher.run`` was given, matched by the output's
``line`` (the row's 1-based number in the input). A path input without an ``input`` column
gives the output's columns alone.

Name clashes: the output's columns keep their names (``content`` is always the answer), and an
input column named like one of them is renamed ``input_NAME`` (``input_NAME_2``... if that is
taken too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa


def dataset_view(
    output: pa.Table, source: pa.Table | None = None, variants: Sequence[str] = ()
) -> pa.Table:
    """``output`` as a dataset (see the module's docstring); ``source`` the in-memory input's
    rows, ``variants`` the job's variant names in declared order."""
    import pyarrow as pa

    table = in_input_order(output, variants)
    answers = table.drop_columns(["input"]) if "input" in table.column_names else table
    own = _own_columns(table, source)
    if own is None:
        return answers
    taken = set(answers.column_names)
    columns, names = [], []
    for name, column in zip(own.column_names, own.columns, strict=True):
        new = _free_name(name, taken)
        taken.add(new)
        names.append(new)
        columns.append(column)
    return pa.table(columns + answers.columns, names=names + answers.column_names)


def in_input_order(table: pa.Table, variants: Sequence[str] = ()) -> pa.Table:
    """``table`` sorted by line, then by the variant's place in ``variants`` (a stable sort:
    rows already in that order stay as they are)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "line" not in table.column_names or table.num_rows < 2:
        return table
    keys = [("line", "ascending")]
    if variants and "variant" in table.column_names:
        rank = pc.index_in(table["variant"], value_set=pa.array(list(variants), pa.string()))
        table = table.append_column("__variant_rank", rank)
        keys.append(("__variant_rank", "ascending"))
    ordered = table.take(pc.sort_indices(table, sort_keys=keys))
    return ordered.drop_columns(["__variant_rank"]) if len(keys) > 1 else ordered


def _own_columns(table: pa.Table, source: pa.Table | None) -> pa.Table | None:
    """The input's own columns for each row of ``table``, or ``None`` when they are unknown."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "input" in table.column_names and pa.types.is_struct(table.schema.field("input").type):
        flat = table.select(["input"]).flatten()  # parent nulls carried into each child
        return flat.rename_columns([n.removeprefix("input.") for n in flat.column_names])
    if source is None or "line" not in table.column_names:
        return None
    index = pc.subtract(table["line"].cast(pa.int64()), 1)
    in_range = pc.and_(pc.greater_equal(index, 0), pc.less(index, source.num_rows))
    # a row whose line is unknown or out of range gets nulls (take of a null index)
    return source.take(pc.if_else(in_range, index, pa.scalar(None, pa.int64())))


def _free_name(name: str, taken: set[str]) -> str:
    """``name``, or ``input_NAME`` (then ``input_NAME_2``, ...) when it is taken."""
    if name not in taken:
        return name
    candidate, n = f"input_{name}", 1
    while candidate in taken:
        n += 1
        candidate = f"input_{name}_{n}"
    return candidate
