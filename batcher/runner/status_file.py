"""The status file a run keeps beside its output (``OUTPUT.status.json``) for ``batcher status``.

The journal holds what each finished request was; only the running process knows the rest:
how many lines the input has, what is in flight, a 429 pause or an outage in force, its pid,
when it started, and how it ended. That goes in one small JSON object, rewritten whole (a
temporary file renamed over it, so a reader never sees half of one) every ``WRITE_EVERY_S``
from a thread of its own, and once more when the run ends. It is written only while the run
holds the journal's lock, so a second run refused by that lock never overwrites it.

Fields (``STATUS_VERSION`` 1): ``batcher_status`` (the version), ``state`` (``running``,
``finished`` or ``stopped``), ``job``, ``mode`` (``online`` or ``batch``), ``pid``, ``host``,
``started_at``/``updated_at``/``ended_at`` (Unix seconds), ``total`` (input lines times passes,
``null`` when unknown: stdin), ``rejected``, ``in_flight``, ``rate_limited`` and ``overloaded``
(429s this run: all, and those from a busy server), ``paused_s`` (seconds left of a 429 pause in
force), ``outage`` (names of endpoints waited out as unreachable), ``exit_code`` and
``stop_reason`` (once ended). Never a key, a URL or the command line: names and counts only.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batcher import jsonfast
from batcher.errors import BatcherError
from batcher.output.journal import journal_path

if TYPE_CHECKING:
    from batcher.engine.endpoints import Endpoint
    from batcher.runner.stats import RunStats

STATUS_SUFFIX = ".status.json"
STATUS_VERSION = 1
#: Seconds between two writes of a running job's status file.
WRITE_EVERY_S = 2.0


def status_path(output: Path) -> Path:
    """The status file beside an output: ``OUTPUT.status.json``."""
    return output.with_name(output.name + STATUS_SUFFIX)


def read_status_file(output: Path) -> dict[str, Any] | None:
    """The status file beside ``output`` as written, or ``None`` when there is none or it
    cannot be read (a run of an older version, or a file cut short by a power loss)."""
    try:
        data = jsonfast.loads_exact(status_path(output).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("batcher_status") != STATUS_VERSION:
        return None
    return data


class RunStatus:
    """The status file of one run: ``running()`` around the run, ``follow`` once its stats
    and endpoints exist, ``total`` once the input is counted."""

    def __init__(
        self,
        output: Path,
        *,
        job: str,
        mode: str,
        input_path: Path | None = None,
        passes: int = 1,
        every_s: float = WRITE_EVERY_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``input_path``: counted (``passes`` times) in the writing thread for ``total``."""
        self.path = status_path(output)
        self._output = output
        self._job = job
        self._mode = mode
        self._input = input_path
        self._passes = passes
        self._every_s = every_s
        self._clock = clock
        self._started_at = clock()
        self._stats: RunStats | None = None
        self._endpoints: Sequence[Endpoint] = ()
        self.total: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ended = False

    def follow(self, stats: RunStats, endpoints: Sequence[Endpoint] = ()) -> None:
        """What the file reports from now on: this run's stats and endpoints."""
        self._stats = stats
        self._endpoints = endpoints

    @contextlib.contextmanager
    def running(self) -> Iterator[RunStatus]:
        """Write ``running`` now and every ``every_s`` until the block ends; then how it
        ended (``finished`` or ``stopped``, the exit code), or remove the file when the run
        left no journal behind (it stopped before recording anything)."""
        self._write(self._fields("running"))
        thread = threading.Thread(target=self._keep_writing, name="batcher-status", daemon=True)
        thread.start()
        try:
            yield self
        except BaseException as exc:
            self._end(thread, _ending_of(exc))
            raise
        self._end(thread, self._ending())

    def _keep_writing(self) -> None:
        if self._input is not None and self.total is None:
            from batcher.input.sources import count_lines

            lines = count_lines(self._input)
            if lines is not None and self.total is None:
                self.total = lines * self._passes
                self._write(self._fields("running"))
        while not self._stop.wait(self._every_s):
            self._write(self._fields("running"))

    def _end(self, thread: threading.Thread, ending: tuple[str, int, str | None]) -> None:
        self._stop.set()
        thread.join(timeout=5)
        state, code, reason = ending
        with self._lock:
            self._ended = True
            if not journal_path(
                self._output
            ).exists():  # nothing recorded, nothing to show: leave nothing
                self.path.unlink(missing_ok=True)
                return
        fields = self._fields(state)
        fields.update(exit_code=code, stop_reason=reason, ended_at=self._clock(), in_flight=0)
        self._write(fields, final=True)

    def _ending(self) -> tuple[str, int, str | None]:
        stats = self._stats
        if stats is None:
            return "finished", 0, None
        state = "stopped" if stats.stopped_early else "finished"
        return state, stats.exit_code, stats.stop_reason

    def _fields(self, state: str) -> dict[str, Any]:
        stats, now = self._stats, self._clock()
        limits = [e.limits for e in self._endpoints]
        return {
            "batcher_status": STATUS_VERSION,
            "state": state,
            "job": self._job,
            "mode": self._mode,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": self._started_at,
            "updated_at": now,
            "ended_at": None,
            "total": self.total,
            "rejected": stats.rejected if stats is not None else 0,
            "in_flight": sum(x.in_flight_requests for x in limits),
            "rate_limited": sum(x.rate_limited for x in limits),
            "overloaded": sum(x.overloaded for x in limits),
            "paused_s": round(max((x.paused_s for x in limits), default=0.0), 1),
            "outage": [e.name for e in self._endpoints if e.limits.outage],
            "exit_code": None,
            "stop_reason": None,
        }

    def _write(self, fields: dict[str, Any], *, final: bool = False) -> None:
        """Replace the file whole; a failure to write it never troubles the run."""
        with self._lock:
            if self._ended and not final:
                return
            partial = self.path.with_name(self.path.name + ".partial")
            try:
                partial.write_bytes(jsonfast.dumps(fields) + b"\n")
                os.replace(partial, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    partial.unlink(missing_ok=True)


def _ending_of(exc: BaseException) -> tuple[str, int, str | None]:
    """How a run that raised ``exc`` ended: stopped, with the exit code the command gives."""
    if isinstance(exc, BatcherError):
        return "stopped", exc.exit_code, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "stopped", 3, "interrupted"
    return "stopped", 1, f"stopped by an unexpected {type(exc).__name__}"
