"""The input opened: a file, a ``.gz`` file or standard input (``open_input``), once per pass
over it (``open_sources``: standard input spooled to a temporary file when read more than
once), and its lines (or a table's rows) counted for the progress total (``count_lines``)."""

from __future__ import annotations

import gzip
import shutil
import stat
import sys
import tempfile
import zlib
from pathlib import Path
from typing import IO, cast

from batcher.errors import ConfigError, InputError


def open_input(path: Path) -> IO[bytes]:
    """Open the input for binary reading: a file, a ``.gz`` file, or ``-`` for stdin."""
    if str(path) == "-":
        return sys.stdin.buffer
    try:
        stream = _gzip_checked(path) if path.suffix == ".gz" else path.open("rb")
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot open input {path}: {exc.strerror or exc}") from None
    if path.is_file():  # not a pipe: a peek there would wait for its writer
        _refuse_utf16(path, stream)
    return stream


#: The byte-order marks a UTF-16 file starts with (Windows PowerShell's ``>`` writes one).
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _refuse_utf16(path: Path, stream: IO[bytes]) -> None:
    """A UTF-16 file is one ``InputError`` before anything is sent, not every line rejected
    as invalid UTF-8."""
    peek = getattr(stream, "peek", None)
    try:
        head = peek(2)[:2] if peek is not None else b""
    except (OSError, EOFError, zlib.error):
        return  # unreadable: the reader says so, with the line
    if head in _UTF16_BOMS:
        from batcher.storage import origin_of  # standard input's copy is named as "-"

        stream.close()
        shown = origin_of(path)
        raise InputError(
            f"input {'(standard input)' if shown == '-' else shown} is UTF-16 (it starts with "
            "a UTF-16 byte-order mark): save it as UTF-8"
        )


def _gzip_checked(path: Path) -> IO[bytes]:
    """``path`` opened through gzip, its header and first block read now: a ``.gz`` that is
    not gzip is an ``InputError`` before anything is sent, not a stop after line 0."""
    stream = gzip.open(path, "rb")  # noqa: SIM115 (returned open, for the caller to close)
    if not path.is_file():  # a pipe: a peek would wait for its writer
        return cast(IO[bytes], stream)
    try:
        stream.peek(1)
    except (OSError, EOFError, zlib.error) as exc:
        stream.close()
        if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError):
            raise
        raise InputError(f"cannot read input {path}: not a gzip file ({exc})") from None
    return cast(IO[bytes], stream)


def count_lines(path: Path) -> int | None:
    """Count the non-blank lines of a file, or a table's rows (for the progress total).

    ``None`` for stdin, a pipe or a FIFO (reading them twice would consume the input) and for
    a file that cannot be read to the end (the reader reports that, with the line number).
    A Parquet file's rows come from its metadata: its data is not read.
    """
    from batcher.input.columns import count_rows
    from batcher.input.table_files import input_form

    if str(path) == "-":
        return None
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return None
        if input_form(path) != "jsonl":
            return count_rows(path)
        total = 0
        with open_input(path) as f:
            for raw in f:
                if raw.strip():
                    total += 1
    except (OSError, EOFError, zlib.error, InputError, ConfigError):
        return None
    return total


def open_sources(path: Path, count: int) -> list[IO[bytes]]:
    """The input opened ``count`` times (once per variant: each reads it through).

    Standard input cannot be read twice, so with several readers it is first copied to a
    temporary file (unlinked at once: it lives as long as the open handles).
    """
    if count == 1 or str(path) != "-":
        sources: list[IO[bytes]] = []
        try:
            for _ in range(count):
                sources.append(open_input(path))
        except BaseException:
            for source in sources:
                source.close()
            raise
        return sources
    with tempfile.NamedTemporaryFile(prefix="batcher-stdin-", suffix=".jsonl") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool)
        spool.flush()
        return open_sources(Path(spool.name), count)
