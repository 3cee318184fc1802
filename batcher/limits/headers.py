"""A server's ``x-ratelimit-*`` headers: the limit, what remains and when it resets.

OpenAI's names, which most compatible servers copy: ``x-ratelimit-{limit,remaining,reset}-``
``{requests,tokens}``, the reset a duration such as ``"6m0s"`` or ``"20ms"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateHeaders:
    """The ``x-ratelimit-*`` figures of one answer, for one kind (requests or tokens)."""

    limit: float | None
    remaining: float | None
    reset_s: float | None


#: Each kind's three header names, made once (they are looked up in every answer).
_NAMES = {
    kind: (
        f"x-ratelimit-limit-{kind}",
        f"x-ratelimit-remaining-{kind}",
        f"x-ratelimit-reset-{kind}",
    )
    for kind in ("requests", "tokens")
}


def parse_rate_headers(headers: Mapping[str, str], kind: str) -> RateHeaders | None:
    """Read ``x-ratelimit-{limit,remaining,reset}-{kind}`` (``kind``: ``"requests"`` or
    ``"tokens"``); ``None`` if none is present."""
    limit_name, remaining_name, reset_name = _NAMES[kind]
    limit = parse_number(headers.get(limit_name))
    remaining = parse_number(headers.get(remaining_name))
    reset = parse_duration(headers.get(reset_name))
    if limit is None and remaining is None and reset is None:
        return None
    return RateHeaders(limit, remaining, reset)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """Seconds in an OpenAI reset duration (``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``)."""
    if not text:
        return None
    text = text.strip()
    number = parse_number(text)
    if number is not None:
        return number
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(value + unit for value, unit in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(value) * scale[unit] for value, unit in parts)


def parse_number(text: str | None) -> float | None:
    """A header's figure: a finite number ``>= 0``, else ``None`` (absent or not one)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
