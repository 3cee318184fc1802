"""Sanity checks of the rate limits a server announces, and of the limits remembered from
earlier runs.

A server's ``x-ratelimit-limit-*`` headers set the meters' pace, so one wrong header could stall
a run: ``x-ratelimit-limit-requests: 0.0001`` spaces requests a week apart. A limit below
``MIN_RPM`` requests or ``MIN_TPM`` tokens a minute, or one that drops more than ``MAX_DROP``
times below the highest this run has seen, is not a limit any real service sets: it is
ignored (with the rest of that answer's figures of that kind), with one warning naming the
header and its value. A server whose limits really are that low answers 429s, which pause and
slow the pool as always.

Limits remembered from an earlier run (``known_limits``) are only a start: this run's first ok
answer confirms them or, when its server announces no such limit, they are dropped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

#: The lowest limits taken from a server: a request, and a thousand tokens, a minute.
MIN_RPM = 1.0
MIN_TPM = 1_000.0
#: How many times below the highest limit seen this run a new one may be before it is doubted.
MAX_DROP = 100.0

_KINDS = ("requests", "tokens")


def implausible(kind: str, limit: float, highest: float | None) -> str | None:
    """Why a ``limit`` a server announced (per minute) cannot be right, or ``None``.

    ``highest`` is the highest limit of that kind announced earlier in the run.
    """
    floor = MIN_RPM if kind == "requests" else MIN_TPM
    if limit < floor:
        return f"below {floor:g} {kind} a minute"
    if highest is not None and limit * MAX_DROP < highest:
        return f"more than {MAX_DROP:g}x below the {highest:g} announced earlier"
    return None


def _stderr_warning(message: str) -> None:
    from batcher.runner.quiet_stream import quiet

    print(message, file=quiet(sys.stderr), flush=True)


@dataclass
class LimitChecks:
    """One pool's record of announced limits: the highest of each kind this run, the kinds
    warned about, and the kinds started from memory and not yet confirmed by this run's server.

    ``warn`` shows a warning (the run's progress notes; stderr by default).
    """

    warn: Callable[[str], object] = _stderr_warning
    highest: dict[str, float] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    unconfirmed: set[str] = field(default_factory=set)

    def accept(self, kind: str, limit: float) -> bool:
        """Whether the announced (whole-key) ``limit`` of ``kind`` may steer the meters;
        warns once per kind when not."""
        why = implausible(kind, limit, self.highest.get(kind))
        if why is not None:
            if kind not in self.warned:
                self.warned.add(kind)
                self.warn(
                    f"batcher: warning: ignored x-ratelimit-limit-{kind}: {limit:g} ({why}); "
                    "the server's 429s still slow the run if it is right"
                )
            return False
        self.highest[kind] = max(limit, self.highest.get(kind, 0.0))
        self.unconfirmed.discard(kind)
        return True

    def remembered(self, kinds: set[str]) -> None:
        """The limits of ``kinds`` were started from an earlier run's: not this run's server's
        word (so neither a yardstick for a drop), until it announces them."""
        self.unconfirmed |= kinds & set(_KINDS)
        for kind in kinds:
            self.highest.pop(kind, None)

    def take_unconfirmed(self) -> set[str]:
        """The remembered kinds this run's server has not announced (then forgotten here)."""
        kinds, self.unconfirmed = self.unconfirmed, set()
        return kinds
