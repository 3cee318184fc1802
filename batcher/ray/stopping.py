"""Stopping a Ray run: SIGINT and SIGTERM on the driver, and the flag the workers poll.

On a first Ctrl+C or SIGTERM while the blocks run, the driver sets the stop flag (a small
actor, ``StopFlag``) that every worker polls: their engines send no new request and give those
in flight the job's ``grace_s``, as a local run does; the driver keeps writing the blocks that
come back (partial ones too) for up to ``grace_s`` plus ``STOP_MARGIN_S``, then ends, exit 3.
A second interrupt stops at once.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from batcher.runner.progress import Progress

#: How long past ``grace_s`` an interrupted driver waits for the workers' last blocks.
STOP_MARGIN_S = 5.0


class StopFlag:
    """The driver's word to the workers (a Ray actor): the reason to stop, once it is set."""

    def __init__(self) -> None:
        self._reason: str | None = None

    def set(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason

    def reason(self) -> str | None:
        return self._reason


class Stopper:
    """SIGINT and SIGTERM on the driver (with ``handling(True)``, in the main thread).

    Before the blocks run (``arm``), an interrupt raises ``KeyboardInterrupt``: nothing was
    sent. While they run, the first one sets the stop flag (from a helper thread: no Ray call
    in a signal handler) and the driver goes on writing what comes back; a second one, or
    ``grace_s`` + ``STOP_MARGIN_S`` without the run ending, raises ``KeyboardInterrupt``.
    """

    def __init__(self, progress: Progress, grace_s: float) -> None:
        self._progress = progress
        self._grace_s = grace_s
        self._flag: Any = None
        self._asked = threading.Event()  # set by the first interrupt (or by disarm)
        self._over = threading.Event()  # the run ended
        self._helper: threading.Thread | None = None
        self._enabled = False
        self.reason: str | None = None

    @contextlib.contextmanager
    def handling(self, enabled: bool) -> Iterator[None]:
        """The signals handled here while the block runs (``enabled``), then given back."""
        if not enabled:
            yield
            return
        previous = self._install()
        self._enabled = True
        try:
            yield
        finally:
            self._over.set()  # the helper interrupts no more
            self._enabled = False
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _install(self) -> dict[int, Any]:
        return {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }

    def reinstall(self) -> None:
        """Take the signals back: ``ray.init`` puts its own SIGTERM handler in (exit 15)."""
        if self._enabled:
            self._install()

    def arm(self, flag: Any) -> None:
        """The blocks are about to run: a first interrupt now asks ``flag`` to stop them."""
        if flag is None:
            return
        self._flag = flag
        self._helper = threading.Thread(target=self._tell, name="batcher-stop", daemon=True)
        self._helper.start()

    def disarm(self) -> None:
        """The run is over: the helper thread ends without a word to the workers."""
        self._over.set()
        self._asked.set()
        if self._helper is not None:
            self._helper.join(timeout=5)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._flag is None or self.reason is not None or self._over.is_set():
            raise KeyboardInterrupt
        self.reason = f"interrupted by {signal.Signals(signum).name}"
        self._asked.set()

    def _tell(self) -> None:
        self._asked.wait()
        if self._over.is_set() or self.reason is None:
            return
        self._flag.set.remote(self.reason)
        self._progress.note(
            f"batcher: {self.reason}: the workers send no new requests; waiting up to "
            f"{self._grace_s:g} s for those in flight (press Ctrl+C again to stop at once)"
        )
        if not self._over.wait(self._grace_s + STOP_MARGIN_S):
            self._progress.note("batcher: the workers did not finish in time")
            _thread.interrupt_main()  # the handler raises KeyboardInterrupt: it was asked once
