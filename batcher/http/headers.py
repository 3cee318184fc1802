"""Which headers can be sent: a name that is an RFC 9110 token, a value of printable characters
without surrounding whitespace.

Checked before anything is sent (a job's ``headers``: ``job_checks.check_headers``; a
``ChatClient``'s: ``check_headers`` here), so every HTTP client refuses the same headers in the
same words; aiohttp would fail each request on a stray newline, pyreqwest would refuse to start
and quote the value. A value is never quoted here: a header may carry a key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: An HTTP header name (RFC 9110's token).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Why a value is refused (the value itself is not shown).
BAD_VALUE = (
    "the value contains control characters or surrounding whitespace (a stray newline?); "
    "the value is not shown"
)


def is_header_name(name: str) -> bool:
    """Whether ``name`` can name a header."""
    return _HEADER_NAME.fullmatch(name) is not None


def is_header_value(value: str) -> bool:
    """Whether ``value`` can be sent as a header's value as it is."""
    return value.isprintable() and value == value.strip()


def check_headers(headers: Mapping[str, str]) -> None:
    """Raise ``ValueError`` naming the first header that cannot be sent (never its value)."""
    for name, value in headers.items():
        if not is_header_name(name):
            raise ValueError(f"{name!r} is not a valid header name")
        if not is_header_value(value):
            raise ValueError(f"header {name!r}: {BAD_VALUE}")
