"""What the caller of a run chooses beside its job (``RunOptions``): gathered once from
``run_job``'s and ``arun_job``'s keyword options, and handed to the run's steps whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from batcher.output.resume import RetryErrors

if TYPE_CHECKING:
    import httpx

    from batcher.runner.housekeeping import Housekeeping
    from batcher.runner.wiring import SimServer


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The caller's choices for one run of a job."""

    #: Forget the journal and start over (else a re-run resumes from it).
    restart: bool = False
    #: Which errors recorded by earlier runs are sent again: none, ``"all"``, ``"retryable"``.
    retry_errors: RetryErrors = "none"
    #: Replaces the HTTP transport (tests).
    transport: httpx.AsyncBaseTransport | None = None
    #: Stop on SIGINT/SIGTERM with what was answered recorded (the CLI; a library leaves
    #: the host's signals alone).
    handle_signals: bool = False
    #: Where the progress and the summary go (stderr when ``None``).
    stream: IO[str] | None = None
    #: What the process that owns the run does around it (the CLI's tuning); a library run
    #: has none and changes nothing process-wide.
    housekeeping: Housekeeping | None = None
    #: Starts the simulator behind ``base_url = "sim"`` (without it such an endpoint is a
    #: ``ConfigError``).
    sim: SimServer | None = None
    #: Batch mode only: return once every batch is created.
    detach: bool = False
    #: Batch mode only: cancel the job's batches.
    cancel: bool = False
