"""What the process that owns a run may do around it: the CLI's process tuning.

A library run (``batcher.run``, ``run_job``) has no housekeeping: it changes nothing
process-wide. The ``batcher`` command ends with its run, so it may tune the process for it
(``batcher.cli.tuning``), through these two calls the runner makes.
"""

from __future__ import annotations

from typing import Protocol


class Housekeeping(Protocol):
    """Work done for the run by the process that owns it."""

    async def during_run(self) -> None:
        """Started beside the requests; cancelled when the last request is done."""

    def before_output(self) -> None:
        """Called after the last request and before the output is written."""
