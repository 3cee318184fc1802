"""JSON on the per-request path: orjson, with the standard library for what orjson refuses.

Encoding and decoding request and response bodies, journal records and output lines was the
largest share of batcher's own CPU per request; orjson does it several times faster. It refuses
a few things the standard library accepts, and those go to the standard library instead:
strings with lone surrogates (possible from a ``"\\ud800"`` escape in an input line), integers
beyond 64 bits and non-string keys when writing; ``NaN`` and nesting deeper than 1024 levels
when reading. Both write compact JSON with non-ASCII characters as they are.

orjson reads an integer beyond 64 bits as a float. ``loads_answer`` (servers' answers) accepts
that; ``loads_exact`` (input lines, the journal) goes to the standard library whenever the text
has a run of 19 digits, so every value of an input line (its metadata, say) is kept exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

_STD_ENCODE = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), default=str, check_circular=False
).encode


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; odd values (Decimal, bytes...) as their ``str``.

    A lone surrogate is written as its ``\\uXXXX`` escape, which reads back as the same string.
    """
    try:
        return orjson.dumps(value, default=str)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _STD_ENCODE(value).encode("utf-8", "backslashreplace")


def dumps_text(value: Any) -> str:
    """``dumps`` as text (may hold lone surrogates; write it with ``backslashreplace``)."""
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:
        return _STD_ENCODE(value)


#: How deep ``orjson.dumps`` writes (254 in every release so far: tests/test_jsonfast.py checks
#: it); deeper values fall back to the standard library (see ``dumps``).
ORJSON_MAX_DEPTH = 254
#: The deepest nesting of arrays and objects accepted in an input line or a server's answer.
#: Every later stage handles a value this deep: orjson writes 254 levels, and a journal record
#: or an output line wraps a value in at most 3 more. Past 254 the standard library took over,
#: and a value ~980 levels deep exhausted its recursion (``RecursionError``: the run stopped on
#: that line, every time). Real JSON schemas nest a few tens of levels.
MAX_DEPTH = 200
TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"


def too_deep(value: Any, text: bytes | str, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` (parsed from ``text``) nests arrays and objects deeper than ``limit``.

    A text with at most ``limit`` brackets cannot be deeper: two ``count`` calls settle nearly
    every value. Otherwise orjson, asked to write the value inside ``ORJSON_MAX_DEPTH - limit``
    arrays, fails exactly when it is deeper than ``limit`` (in C: a 140 kB answer with
    logprobs takes ~0.1 ms, a walk in Python 4 ms); when orjson refuses the value for another
    reason (an integer beyond 64 bits), it is walked, without recursion."""
    if isinstance(text, str):
        brackets = text.count("[") + text.count("{")
    else:
        brackets = text.count(b"[") + text.count(b"{")
    if brackets <= limit:
        return False
    wrapped = value
    for _ in range(ORJSON_MAX_DEPTH - limit):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped, default=str)
        return False
    except TypeError:
        pass
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue  # the top value itself: a string full of brackets, say
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def loads_answer(data: bytes | str) -> Any:
    """Parse a server's JSON; raises ``ValueError`` (or ``RecursionError``) when it is not JSON
    or nests deeper than ``MAX_DEPTH``."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        value = json.loads(data)  # NaN or deep nesting: or a real error
    if too_deep(value, data):
        raise ValueError(TOO_DEEP)
    return value


# 19 digits in a row: a number that may not fit in 64 bits (or a long mantissa). Rare in text.
_LONG_NUMBER_STR = re.compile(r"\d{19}").search
# For bytes (journal records, about 1 KB each) a regex scan costs 5 µs; mapping every byte to
# "0" (an ASCII digit) or " " and looking for nineteen "0"s costs 1 µs.
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_NINETEEN_DIGITS = b"0" * 19


def _has_long_number(data: bytes | str) -> bool:
    if isinstance(data, str):
        return _LONG_NUMBER_STR(data) is not None
    return _NINETEEN_DIGITS in data.translate(_DIGITS_AS_ZEROS)


def loads_exact(data: bytes | str, *, parse_constant: Callable[[str], Any] | None = None) -> Any:
    """Parse JSON exactly as ``json.loads`` would (its errors too), faster when orjson can.

    orjson is used unless the text holds a long digit run (see above); whatever it refuses
    (``NaN``, a lone surrogate escape, deep nesting, invalid JSON) is parsed, or refused with
    the standard library's error, by ``json.loads(data, parse_constant=...)``.
    """
    if not _has_long_number(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    if parse_constant is None:
        return json.loads(data)
    return json.loads(data, parse_constant=parse_constant)
