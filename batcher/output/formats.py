"""The output formats, and the rejects file (``rejects_path``, ``RejectsWriter``): the parts
of output writing that need no pyarrow.

``batcher run`` imports these at start and ``batcher.output.writers`` (pyarrow: about 40 MB
resident) only when it writes the output, after the requests are done and their token tables
are freed.
``batcher.output.writers`` re-exports both names.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from batcher.errors import ConfigError, OutputError
from batcher.records import Reject

SUFFIXES = (".jsonl", ".parquet")  # the output formats open_writer accepts

_ENCODE = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), default=str, check_circular=False
).encode


def output_format(path: Path) -> str:
    """The output's format suffix (``.jsonl`` or ``.parquet``); ``ConfigError`` for others."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(
            "output", f"{str(path)!r} must end in .jsonl (OpenAI Batch API lines) or .parquet"
        )
    return suffix


def rejects_path(output: Path) -> Path:
    """Where rejected lines go: ``OUTPUT.rejects.jsonl`` beside the output."""
    return output.with_name(output.name + ".rejects.jsonl")


def errors_path(output: Path) -> Path:
    """Where failed requests go with ``split_errors``: ``OUTPUT.errors.jsonl`` beside the
    output (Batch API lines, as OpenAI's error file)."""
    return output.with_name(output.name + ".errors.jsonl")


class Closing:
    """Context-manager support: ``with`` closes the object, also when the block raises
    (output files override this: they are discarded when the block raises)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RejectsWriter(Closing):
    """Writes ``{"line", "reason", "custom_id", "text"}`` lines for rejected input lines.

    The file is created on the first reject (none when every line is valid) and truncated then,
    so a rerun over the same input does not duplicate the previous run's rejects.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.count = 0
        self._f: IO[str] | None = None

    def write(self, reject: Reject) -> None:
        """Append one reject."""
        if self._f is None:
            try:
                self._f = open(  # noqa: SIM115 - closed in close()
                    self.path, "w", encoding="utf-8", errors="backslashreplace", newline="\n"
                )
            except OSError as exc:
                raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        r = reject
        rec = {"line": r.line, "reason": r.reason, "custom_id": r.custom_id, "text": r.text}
        self._f.write(_ENCODE(rec) + "\n")
        self.count += 1

    def close(self) -> None:
        """Close the file if one was opened; idempotent."""
        if self._f is not None:
            self._f.close()
            self._f = None
