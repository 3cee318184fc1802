"""What the ``batcher`` command tunes in its own process, and only there.

``console_main`` is the one caller: it owns a process that ends with the command, so settings
that would be wrong for a program using batcher as a library (the collector's thresholds, a
frozen heap, an environment variable, glibc's heap trimmed under its feet) are safe there.
``main``, which tests and other programs call in a process that goes on, applies none of them;
a library run (``batcher.run``, ``run_job``) changes nothing process-wide.

Each tweak says what it buys, measured on ``batcher run`` at N = 50,000 (see DESIGN_NOTES,
*The CLI's process tuning*); tweaks that bought less than 2 % of wall time, CPU or peak RSS
there are not kept.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading

import anyio

from batcher.cost.tokens import loaded_encodings, release_encodings

#: Seconds between two ``malloc_trim`` calls while the run goes and its output is written.
TRIM_EVERY_S = 1.0


class ProcessTuning:
    """The ``batcher`` command's process settings, and the run's housekeeping
    (``batcher.runner.housekeeping.Housekeeping``)."""

    def __init__(self) -> None:
        self._writing_done = threading.Event()
        self._trimmer: threading.Thread | None = None

    def start(self) -> None:
        """Before the command runs (before pyarrow is imported)."""
        # pyarrow reads its allocator's name when first imported; a value the user set is kept.
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
        gc.set_threshold(20_000, 20, 20)

    def tables_loaded(self) -> None:
        """After the token tables a run needs are loaded, before the HTTP stack is imported:
        their Python copy goes while the process is still small."""
        _slim_encodings()
        malloc_trim()

    async def during_run(self) -> None:
        """Beside the requests: freeze what is loaded by now out of the collector's sight,
        then every second give glibc's free heap pages back to the system."""
        _slim_encodings()  # tables loaded since (a limit a server announced)
        gc.freeze()  # modules, token and price tables: walked by every full collection else
        first = True
        while True:
            await anyio.sleep(TRIM_EVERY_S)
            if first:  # the first answers' lazily imported modules and pyarrow's warm-up
                gc.freeze()
                first = False
            _slim_encodings()
            malloc_trim()

    def before_output(self) -> None:
        """After the last request: free the token tables, and trim the heap every second
        while the output is written (until ``finish``)."""
        release_encodings()
        malloc_trim()
        self._trimmer = threading.Thread(
            target=self._trim_until_done, name="batcher-trim", daemon=True
        )
        self._trimmer.start()

    def finish(self) -> None:
        """After the command: stop trimming, and freeze what is left alive, so that the
        interpreter's shutdown collections skip it."""
        self._writing_done.set()
        if self._trimmer is not None:
            self._trimmer.join()
        gc.freeze()

    def _trim_until_done(self) -> None:
        while not self._writing_done.wait(TRIM_EVERY_S):
            malloc_trim()


def _slim_encodings() -> None:
    """Drop the Python copy of each loaded encoding's token table (``_mergeable_ranks``, ~26 MB
    for ``o200k_base``): tiktoken reads it only to pickle the encoding, which batcher never
    does; the Rust tokenizer built from it holds its own."""
    for encoding in loaded_encodings():
        if encoding._mergeable_ranks:
            encoding._mergeable_ranks = {}


def malloc_trim() -> None:
    """Return free heap memory to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)
