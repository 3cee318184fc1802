"""How the simulator behaves (``SimConfig``): latency, limits, faults, answer lengths.

Every value is checked when the config is made, so a bad ``[sim]`` table or ``batcher sim`` flag
fails before the simulator starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from batcher.sim.faults import FAULT_KINDS, is_int


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """How the simulator behaves. Every field has a harmless default: fast, unlimited, no faults.

    ``max_completion_tokens`` is the longest answer the simulated model writes on its own; a
    request's ``max_tokens``/``max_completion_tokens`` below an answer's natural length cuts it
    and gives ``finish_reason: "length"``. ``burst_s`` is how many seconds' worth of ``rpm`` and
    ``tpm`` may be spent at once (see ``batcher.sim.faults.Bucket``). ``error_rate`` is drawn
    per attempt from a ``random.Random(seed)``, so a retried request can succeed and a run with
    requests sent in the same order is reproducible. A ``stream: true`` request gets its first
    chunk after the latency and each later chunk (one word a chunk) ``stream_chunk_ms`` after
    the one before. A request with a ``response_format`` gets JSON made to fit its schema
    (``batcher.sim.json_values``), broken on purpose at ``schema_error_rate`` (drawn per choice).
    ``batch`` holds the Batches API's settings (``[sim.batch]``: the fields of
    ``batcher.sim.batches.BatchSimConfig``, such as ``validating_s``, ``in_progress_s``,
    ``finalizing_s``, ``window_s``, ``error_rate``).
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    error_rate: float = 0.0
    error_kinds: tuple[str, ...] = ("500", "502", "503", "malformed")
    seed: int = 0
    max_completion_tokens: int = 64
    burst_s: float = 1.0
    stream_chunk_ms: float = 0.0
    schema_error_rate: float = 0.0
    fault_retry_after_s: float = 5.0
    batch: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("latency_ms", "latency_jitter_ms", "stream_chunk_ms"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and value >= 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("error_rate", "schema_error_rate"):
            rate = getattr(self, name)
            if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):
                raise ValueError(f"{name} must be within [0, 1], got {rate!r}")
        kinds = tuple(self.error_kinds)
        unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
        if not kinds or unknown or isinstance(self.error_kinds, str):
            known = ", ".join(sorted(FAULT_KINDS))
            raise ValueError(f"error_kinds must be a non-empty tuple of {known}; got {kinds!r}")
        # Frozen: accept a list from a caller but keep the hashable tuple the annotation promises.
        object.__setattr__(self, "error_kinds", kinds)
        if not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not (is_int(self.max_completion_tokens) and self.max_completion_tokens >= 1):
            raise ValueError(
                f"max_completion_tokens must be an integer >= 1, got {self.max_completion_tokens!r}"
            )
        if not (
            isinstance(self.fault_retry_after_s, int | float) and self.fault_retry_after_s >= 0
        ):
            raise ValueError(
                f"fault_retry_after_s must be a number >= 0, got {self.fault_retry_after_s!r}"
            )
        if not (isinstance(self.burst_s, int | float) and 0 < self.burst_s <= 60):
            raise ValueError(f"burst_s must be within (0, 60], got {self.burst_s!r}")
        if not isinstance(self.batch, Mapping):
            raise ValueError(f"batch must be a table, got {self.batch!r}")
        self.batch_config()  # a bad [sim.batch] value fails here

    def batch_config(self) -> Any:
        """The ``BatchSimConfig`` of ``batch`` (``ValueError`` naming a bad or unknown key)."""
        from batcher.sim.batches import BatchSimConfig

        try:
            return BatchSimConfig(**self.batch)
        except TypeError as exc:
            raise ValueError(f"batch: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"batch: {exc}") from None


def unknown_setting(settings: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first key of a ``[sim]`` table (``[sim.batch]`` included) that no simulator
    setting has: its dotted name and why (the names it could be); ``None`` when every key is
    one."""
    from batcher.sim.batches import BatchSimConfig

    for key in settings:
        if key not in _NAMES:
            return f"sim.{key}", f"unknown key (expected one of: {', '.join(sorted(_NAMES))})"
    batch = settings.get("batch")
    if isinstance(batch, Mapping):
        known = {f.name for f in fields(BatchSimConfig)}
        for key in batch:
            if key not in known:
                return (
                    f"sim.batch.{key}",
                    f"unknown key (expected one of: {', '.join(sorted(known))})",
                )
    return None


_NAMES = frozenset(f.name for f in fields(SimConfig))
