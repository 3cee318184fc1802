"""A request body's content hash (``request_hash``): how resume notices a line that changed.

The hash is blake2b-128 of the body's canonical JSON (sorted keys, compact, non-ASCII as is),
the standard library's form, so journals written by any version keep their hashes; orjson
writes the same bytes several times faster wherever it cannot differ.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import orjson

#: Fields that change how an answer is delivered, not what is asked: turning streaming on
#: after a partial run must not re-send (and pay for) what is done.
_DELIVERY_FIELDS = ("stream", "stream_options")


def request_hash(body: Mapping[str, Any]) -> str:
    """A content hash of a request body (canonical JSON), to notice a line that changed.

    The delivery fields (``stream``, ``stream_options``) are left out. The canonical form is the
    standard library's (``json.dumps`` with sorted keys, compact, non-ASCII as is): journals
    written by any version keep their hashes. orjson writes the same bytes several times faster
    (``_fast_canonical``), except where the two may differ: then the standard library writes it.
    """
    if "stream" in body or "stream_options" in body:  # _DELIVERY_FIELDS
        body = {k: v for k, v in body.items() if k not in _DELIVERY_FIELDS}
    data = _fast_canonical(body)
    if data is None:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        data = canonical.encode("utf-8", "backslashreplace")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


#: orjson refuses (raises ``TypeError``) what it would write otherwise than the standard
#: library: subclasses of str, int, dict and list, dataclasses, dates and times (the standard
#: library refuses the last two); also lone surrogates, integers beyond 64 bits, keys that are
#: not strings and nesting deeper than 254 levels.
_FAST_OPTIONS = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)
#: A digit then ``e-``: a float's negative exponent (see ``_may_differ``).
_NEGATIVE_EXPONENT = re.compile(rb"\de-").search


def _may_differ(data: bytes) -> bool:
    """Whether orjson's canonical form ``data`` may differ from the standard library's: a
    float below 1e-4 (written ``0.00001`` or ``1e-7`` where ``repr`` gives ``1e-05`` and
    ``1e-07``: a digit then ``e-``, or ``0.0000``), or ``null``, which orjson writes for NaN
    and infinity (the standard library: ``NaN``, ``Infinity``). Every other float has one
    shortest form, and both write ``repr``'s exponent (``1e+16``). A match in a string's text
    only sends that body to the standard library. Substring tests first: a regex scan alone
    costs ten times as much."""
    if b"null" in data or b"0.0000" in data:
        return True
    return b"e-" in data and _NEGATIVE_EXPONENT(data) is not None


def _fast_canonical(body: Mapping[str, Any]) -> bytes | None:
    """``body``'s canonical JSON in UTF-8, by orjson; ``None`` where it could differ from the
    standard library's (see ``_may_differ``)."""
    try:
        data = orjson.dumps(body, option=_FAST_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return None
    return None if _may_differ(data) else data
