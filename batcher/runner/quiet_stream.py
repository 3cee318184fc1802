"""A text stream that a reader may close: writes that fail are dropped, and the run goes on.

batcher's progress, notes and summary go to stderr. When that is a pipe whose reader has gone
(``batcher run ... 2>&1 | head -1``, a ``tee`` that died, a closed terminal) a write raises
``BrokenPipeError``; unguarded, the first log line after that killed the run, its answers
unwritten. Messages are for the user, the output file is the product: once a write to a stream
fails, nothing more is written to it, silently, and the run ends as it would have.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import IO, cast


class QuietStream(io.TextIOBase):
    """``stream``, whose first failed write (or flush) silences it for good."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self._stream = stream
        self.broken = False  # a write failed: nothing more is written

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self._stream.write(text)
            except (OSError, ValueError):  # ValueError: the stream was closed
                self._break()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._break()

    def isatty(self) -> bool:
        try:
            return not self.broken and self._stream.isatty()
        except (AttributeError, OSError, ValueError):
            return False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        """The stream's file descriptor: the terminal's width is read from it (tqdm)."""
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", None) or "utf-8"

    def _break(self) -> None:
        self.broken = True
        silence(self._stream)


def quiet(stream: IO[str]) -> IO[str]:
    """``stream`` wrapped in a ``QuietStream`` (once: a wrapped one is returned as it is)."""
    if isinstance(stream, QuietStream):
        return cast(IO[str], stream)
    return cast(IO[str], QuietStream(stream))


def silence(stream: IO[str]) -> None:
    """Point a standard stream whose reader is gone at ``/dev/null``, so what is still in its
    buffer, flushed by the interpreter at exit, does not raise again (and change the exit
    code to 120). Other streams are left alone."""
    if stream not in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        return
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def flush_standard_streams() -> None:
    """Flush stdout and stderr before the interpreter does, silencing one whose reader is gone
    (for a process about to exit)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            silence(stream)
