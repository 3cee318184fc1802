"""The exception tree of batcher.

Errors that end a command are ``BatcherError`` subclasses; the CLI turns each into one line on
stderr and an exit code, never a traceback. Errors of a single request are *data* (an ``error``
record in the output), not exceptions.

    BatcherError
    ├── ConfigError        a bad flag or job file: nothing was sent (exit 2)
    ├── InputError         the input cannot be opened or read at all (exit 2)
    └── OutputError        the journal or output cannot be written once sending began (exit 3:
                           what was recorded is kept, and a re-run resumes)
"""

from __future__ import annotations


class BatcherError(Exception):
    """Base of every error that ends a batcher command."""

    exit_code = 2


class ConfigError(BatcherError):
    """A job file, flag or environment value is invalid; ``field`` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class InputError(BatcherError):
    """The input as a whole cannot be read (missing file, unreadable gzip)."""


#: How an ``InputError`` raised mid-read begins (then the last line read and the cause): the
#: run's stop reason, which says how to go on (``runner.progress.how_to_go_on``).
INPUT_UNREADABLE = "cannot read the input after line"


class OutputError(BatcherError):
    """The output, rejects or journal file cannot be written (checks before sending raise
    ``ConfigError`` instead)."""

    exit_code = 3
