"""Rate limits an endpoint announced, remembered between runs (``limits.json`` in the cache).

A run sends its first request alone and opens the pool when the answer is back (``Limits``'s
probe), so the server's ``x-ratelimit-limit-*`` headers are known before a pool's worth goes
out. That costs one latency a run: 0.2 s against a fast server, half a small run against a
model that answers in 30 s. The limits (or that there were none) seen in an endpoint's first
ok answer are kept here, by URL (``disk_cache``), and a later run to the same URL within
``MAX_AGE_S`` starts with them, its pool open at once.

They are only a start: each run re-learns them. What its server announces replaces them, and
a limit its first ok answer does not announce is dropped (from the run and from this file), so
a limit seen once, by mistake or long ago, does not pace later runs. A 429 meanwhile is
handled as always (pause, back off). Figures no server would announce (``limit_checks``) are
not used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from batcher.disk_cache import JsonCache, cache_dir, without_secrets
from batcher.limits.limit_checks import implausible

#: How long what a server announced is used as a start (each run re-learns it anyway).
MAX_AGE_S = 24 * 3600.0
FILE_NAME = "limits.json"


@dataclass(frozen=True, slots=True)
class Announced:
    """What a server announced in its rate-limit headers (``None``: no such limit)."""

    rpm: float | None
    tpm: float | None


class KnownLimits:
    """The ``limits.json`` cache file."""

    def __init__(self, file: JsonCache, *, now: float | None = None) -> None:
        """``now`` fixes the time (tests); by default the clock's."""
        self._file = file
        self._now = now

    @classmethod
    def default(cls) -> KnownLimits | None:
        folder = cache_dir()
        return None if folder is None else cls(JsonCache(folder / FILE_NAME))

    def get(self, base_url: str) -> Announced | None:
        """What ``base_url`` announced on a run within ``MAX_AGE_S``; ``None`` if unknown."""
        entry = self._file.read().get(without_secrets(base_url))
        if not isinstance(entry, dict) or not self._fresh(entry.get("at")):
            return None
        rpm, tpm = entry.get("rpm"), entry.get("tpm")
        if not all(
            v is None or (isinstance(v, int | float) and implausible(kind, v, None) is None)
            for kind, v in (("requests", rpm), ("tokens", tpm))
        ):
            return None
        return Announced(rpm=rpm, tpm=tpm)

    def put(self, base_url: str, announced: Announced) -> None:
        """Remember what ``base_url`` announced; entries past ``MAX_AGE_S`` are dropped."""
        entries = {
            url: entry
            for url, entry in self._file.read().items()
            if isinstance(entry, dict) and self._fresh(entry.get("at"))
        }
        entries[without_secrets(base_url)] = {
            "rpm": announced.rpm,
            "tpm": announced.tpm,
            "at": self._time(),
        }
        self._file.write(entries)

    def _time(self) -> float:
        return time.time() if self._now is None else self._now

    def _fresh(self, at: object) -> bool:
        return isinstance(at, int | float) and 0 <= self._time() - at <= MAX_AGE_S
