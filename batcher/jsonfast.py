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


def loads_answer(data: bytes | str) -> Any:
    """Parse a server's JSON; raises ``ValueError`` (or ``RecursionError``) when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)  # NaN or deep nesting: or a real error


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
