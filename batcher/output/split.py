"""A run's output files: the output, and with ``split_errors`` its failed requests apart in
``OUTPUT.errors.jsonl`` (Batch API lines, as OpenAI's error file), the successes staying in the
output (Parquet or JSONL).

The errors file is made on the first failure; an output written without one (no failure, or
no split) removes the errors file an earlier run left, so the two always come from one run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from batcher.output.formats import errors_path
from batcher.output.rows import PLAIN
from batcher.output.shape import OutputShape
from batcher.output.writers import DEFAULT_ROW_GROUP_SIZE, JsonlWriter, Writer, open_writer
from batcher.records import Result


class OutputFiles:
    """The output's writer, and the errors file's when failures are split off."""

    def __init__(
        self,
        main: Writer,
        errors: Path,
        *,
        split_errors: bool,
        shape: OutputShape = PLAIN,
    ) -> None:
        self._main = main
        self._shape = shape
        self._errors_path = errors
        self._split = split_errors
        self._errors: JsonlWriter | None = None

    @property
    def rows_written(self) -> int:
        """Results written, in either file."""
        errors = 0 if self._errors is None else self._errors.rows_written
        return self._main.rows_written + errors

    def write(self, result: Result) -> None:
        """Write a result to the output, or a failure to the errors file when split."""
        if not self._split or result.status == "ok":
            self._main.write(result)
            return
        self._errors_writer().write(result)

    def row(self, result: Result) -> tuple[bool, Any]:
        """A result's row, converted, for ``write_row``: whether it goes to the errors file,
        and its row there (``Writer.row``)."""
        if not self._split or result.status == "ok":
            return False, self._main.row(result)
        return True, self._errors_writer().row(result)

    def write_row(self, row: tuple[bool, Any]) -> None:
        """Write a row made by ``row`` to its file."""
        in_errors, values = row
        if in_errors:
            self._errors_writer().write_row(values)
        else:
            self._main.write_row(values)

    def _errors_writer(self) -> JsonlWriter:
        if self._errors is None:
            self._errors = JsonlWriter(self._errors_path, shape=self._shape)
        return self._errors

    def add_metadata(self, metadata: Mapping[str, str]) -> None:
        """Metadata known only at the end, in the output (the errors file is JSONL: none)."""
        self._main.add_metadata(metadata)

    def close(self) -> None:
        """Finish both files; a stale errors file goes when this run wrote none."""
        try:
            self._main.close()
        except BaseException:
            self._abort_errors()
            raise
        if self._errors is not None:
            self._errors.close()
        else:
            self._errors_path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop both unfinished files; what was there before stays."""
        self._main.abort()
        self._abort_errors()

    def _abort_errors(self) -> None:
        if self._errors is not None:
            self._errors.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.close()
        else:
            self.abort()


def open_outputs(
    output: Path,
    *,
    metadata: Mapping[str, str] | None = None,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    split_errors: bool = False,
    shape: OutputShape = PLAIN,
) -> OutputFiles:
    """The writers of ``output`` (see ``writers.open_writer``) with ``shape``'s typed columns,
    failures apart when ``split_errors``."""
    main = open_writer(output, metadata=metadata, row_group_size=row_group_size, shape=shape)
    return OutputFiles(main, errors_path(output), split_errors=split_errors, shape=shape)
