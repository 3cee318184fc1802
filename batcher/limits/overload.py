"""429s of a busy server versus 429s of a limit reached, and when overload calls for slowing down.

A 429 whose ``x-ratelimit-remaining-*`` headers show capacity (or, without such headers, whose
error says the server is overloaded) is a busy server, not a breached limit (``classify_429``).
Only that request waits its ``retry-after``; the pool slows down only when such answers become
frequent (``OverloadRatio``: AIMD on the rejection ratio, as the client-side throttling of
Google's SRE book does), so a server that sheds 2 % of its requests costs their retries, not
the run's speed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from batcher.limits.headers import parse_number

#: Share of recent answers that were overload 429s above which the pool narrows, and how
#: quickly that share follows the answers (an exponentially weighted mean over about
#: ``1 / OVERLOAD_ALPHA`` answers). A server that sheds 5 % sits far below the threshold (the
#: mean's noise there is about 2 points); one that refuses a quarter of what it gets is
#: overwhelmed by this client, and narrowing is what helps it.
OVERLOAD_RATIO = 0.2
OVERLOAD_ALPHA = 0.02

Verdict429 = Literal["limit", "overload"]

# Words of an error that say the server is busy rather than that a quota was used up.
_OVERLOAD_WORDS = ("overload", "capacity", "busy", "server_error", "unavailable")
_LIMIT_WORDS = ("rate limit", "rate_limit", "ratelimit", "per min", "quota", "too many")
# Limits the per-minute x-ratelimit-* headers do not describe: a 429 naming one is a limit
# whatever those headers show (a day's quota spent, a cap on concurrent requests).
_UNSEEN_LIMIT_WORDS = ("per day", "rpd", "tpd", "daily", "concurren", "quota")
#: A 429's tokens left must cover this many times the request's estimate to show capacity:
#: the estimate can be short of what the server charges at admission (it may leave out the
#: prompt, and tokenizers differ), and a token limit must not pass for a busy server.
TOKEN_MARGIN = 2


def classify_429(
    headers: Mapping[str, str] | None, error: str | None, tokens: int = 0
) -> Verdict429:
    """Whether a 429 says a limit was reached (``"limit"``) or the server is busy
    (``"overload"``).

    The signals, strongest first:

    0. An error that names a limit those headers do not describe (a day's quota, concurrent
       requests) is a limit, whatever the headers show.
    1. The rate-limit headers of the 429 itself. When ``x-ratelimit-remaining-requests`` is at
       least 1 and ``x-ratelimit-remaining-tokens`` covers this request twice over
       (``TOKEN_MARGIN`` × ``tokens``, its estimate), whichever of them came, the key has
       capacity: the refusal is the server's load, not a limit. A remaining figure at 0 (or
       below that) is a limit.
    2. Without those headers, the error's code and message: "overloaded", "capacity", "busy"
       or ``server_error`` without any mention of a rate limit or quota is a busy server.
    3. Otherwise a limit: the safe reading, since treating a real limit as noise would send
       into it at full speed.
    """
    text = (error or "").lower()
    if any(word in text for word in _UNSEEN_LIMIT_WORDS):
        return "limit"
    if headers:
        requests = parse_number(headers.get("x-ratelimit-remaining-requests"))
        remaining_tokens = parse_number(headers.get("x-ratelimit-remaining-tokens"))
        if requests is not None or remaining_tokens is not None:
            room = (requests is None or requests >= 1) and (
                remaining_tokens is None or remaining_tokens >= max(TOKEN_MARGIN * tokens, 1)
            )
            return "overload" if room else "limit"
    if any(word in text for word in _OVERLOAD_WORDS) and not any(
        word in text for word in _LIMIT_WORDS
    ):
        return "overload"
    return "limit"


class OverloadRatio:
    """The share of recent answers that were overload 429s, and when it calls for slowing down.

    An exponentially weighted mean of 1 (an overload 429) and 0 (any other answer). When it
    passes ``OVERLOAD_RATIO`` the pool narrows once (multiplicative decrease) and the mean
    starts again from 0, so the next decision rests on the answers that came after it.
    """

    __slots__ = ("_answers", "ratio")

    def __init__(self) -> None:
        self.ratio = 0.0
        self._answers = 0

    def add(self, overloaded: bool) -> bool:
        """Count one answer; true when the pool should narrow now."""
        self.ratio += OVERLOAD_ALPHA * ((1.0 if overloaded else 0.0) - self.ratio)
        self._answers += 1
        # At least a window's worth of answers before a decision: a run whose first answers
        # happen to be 429s has not shown a rate yet.
        if self.ratio > OVERLOAD_RATIO and self._answers * OVERLOAD_ALPHA >= 1.0:
            self.ratio = 0.0
            self._answers = 0
            return True
        return False
