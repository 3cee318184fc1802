"""What the ``batcher`` command tunes in its own process, and only there.

``console_main`` is the one caller: it owns a process that ends with the command, so settings
that would be wrong for a program using batcher as a library (the collector's thresholds, an
environment variable, glibc's heap trimmed under its feet, a private attribute of tiktoken's)
are safe there. ``main``, which tests and other programs call in a process that goes on,
applies none of them; a library run (``batcher.run``, ``run_job``) changes nothing
process-wide.

Each tweak names what it buys on ``batcher run`` at N = 50,000 (``bench/run.py``'s batcher
peer with the tweak switched off, medians of 3 interleaved runs: DESIGN_NOTES, *The CLI's
process tuning*). Tweaks that bought less than 2 % of wall time, CPU or peak RSS there are
not kept: ``gc.freeze()`` during the run or before the interpreter's shutdown, and freeing
the token tables before the output is written.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading

import anyio

from batcher.cost.tokens import loaded_encodings

#: Seconds between two ``malloc_trim`` calls while the run goes and its output is written.
TRIM_EVERY_S = 1.0


class ProcessTuning:
    """The ``batcher`` command's process settings, and the run's housekeeping
    (``batcher.runner.housekeeping.Housekeeping``)."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._trimmer: threading.Thread | None = None

    def start(self) -> None:
        """Before the command runs (before pyarrow is imported)."""
        # pyarrow allocates with the system malloc instead of its bundled mimalloc, which keeps
        # more resident: peak RSS 162.6 MB instead of 181.5 (-10 %). Read by pyarrow when first
        # imported; a value the user set is kept.
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
        # Every request leaves garbage that starts a collection every 700 allocations, each
        # walking what the run keeps: CPU 255 µs a request instead of 273 at 0 ms latency (-7 %),
        # 300 instead of 350 at 200 ms.
        gc.set_threshold(20_000, 20, 20)

    def tables_loaded(self) -> None:
        """After the token tables a run needs are loaded, before the HTTP stack is imported:
        their Python copy goes while the process is still small."""
        _slim_encodings()
        malloc_trim()

    async def during_run(self) -> None:
        """Beside the requests: every second, give glibc's free heap pages back to the system
        (and drop the Python copy of a token table loaded meanwhile)."""
        while True:
            await anyio.sleep(TRIM_EVERY_S)
            _slim_encodings()  # a table loaded mid-run, for a limit a server announced
            malloc_trim()

    def before_output(self) -> None:
        """After the last request: keep trimming the heap every second while the output is
        written (until ``finish``)."""
        malloc_trim()
        self._trimmer = threading.Thread(target=self._trim_until_done, daemon=True)
        self._trimmer.start()

    def finish(self) -> None:
        """After the command: stop trimming."""
        self._done.set()
        if self._trimmer is not None:
            self._trimmer.join()

    def _trim_until_done(self) -> None:
        while not self._done.wait(TRIM_EVERY_S):
            malloc_trim()


def _slim_encodings() -> None:
    """Drop the Python copy of each loaded encoding's token table (tiktoken's private
    ``_mergeable_ranks``, read only to pickle the encoding, which batcher never does; the Rust
    tokenizer built from it holds its own): peak RSS 204.3 MB instead of 230.2 (-11 %) with a
    TPM limit."""
    for encoding in loaded_encodings():
        if encoding._mergeable_ranks:
            encoding._mergeable_ranks = {}


def malloc_trim() -> None:
    """Return free heap memory to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Each request allocates and frees a few kB, and glibc's heap keeps the free pages; trimmed
    every second during the run and the output's write: peak RSS 162.6 MB instead of 177.0
    (-8 %).
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)
