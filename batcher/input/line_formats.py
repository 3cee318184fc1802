"""What the input's request lines ask for their answers' shape: each line's own
``response_format`` and ``tools`` (a Batch API line's ``body.response_format``...), read ahead
so the output's ``parsed`` and ``tool_calls`` columns can be typed from them (``output.shape``).

One pass over the file before the output is begun: once a request line asking for neither
is known, a line that names neither field (no ``"response_format"`` or ``"tools"`` in its
bytes) is not parsed; the others are, and only their distinct asks are kept (by their JSON
text), so memory stays small however long the input. A line that is no request (the reader
rejects it) counts for nothing. The result is cached per file (path, size, modification time).
"""

from __future__ import annotations

import stat
import zlib
from pathlib import Path
from typing import Any

from batcher import jsonfast
from batcher.errors import InputError
from batcher.input.reader import _BOM, LineError, _body_of, _checked
from batcher.input.sources import open_input

#: The request fields that shape the output's typed columns.
SHAPING = ("response_format", "tools")
_NEEDLES = tuple(f'"{name}"'.encode() for name in SHAPING)
#: Distinct asks kept at most: past this many the lines differ anyway (JSON text).
MAX_DISTINCT = 64

_CACHE: dict[tuple[Path, int, int], list[dict[str, Any]]] = {}


def line_asks(path: Path) -> list[dict[str, Any]]:
    """The distinct asks of the input's lines: each a dict of the ``SHAPING`` fields a line
    sets (``{}`` for a line that sets none), in first-seen order; ``[]`` for stdin, a pipe
    or a FIFO (reading ahead would consume it), a file that cannot be read to its end (a
    truncated ``.gz``: the reader reports it, with the line), or one with no request line.
    At most ``MAX_DISTINCT + 1``."""
    if str(path) == "-":
        return []
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return []
        key = (path.resolve(), info.st_size, info.st_mtime_ns)
        if key not in _CACHE:
            if len(_CACHE) >= 8:
                _CACHE.clear()
            _CACHE[key] = _scan(path)
        return list(_CACHE[key])
    except (OSError, EOFError, zlib.error, InputError):
        return []


def _scan(path: Path) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    with open_input(path) as stream:
        for raw in _checked(stream):
            if not raw.strip():
                continue
            if "{}" in seen and not any(needle in raw for needle in _NEEDLES):
                continue  # a line asking nothing is known already: no need to parse this one
            ask = _ask(raw)
            if ask is None:
                continue  # not a request line: the reader rejects it
            seen.setdefault(jsonfast.dumps_text(ask), ask)
            if len(seen) > MAX_DISTINCT:
                break
    return list(seen.values())


def _ask(raw: bytes) -> dict[str, Any] | None:
    """The ``SHAPING`` fields of one line's request body; ``None`` when it is no request."""
    try:
        obj = jsonfast.loads_exact(raw.removeprefix(_BOM))
        if not isinstance(obj, dict):
            return None
        body, _ = _body_of(obj)
    except (ValueError, RecursionError, LineError):
        return None
    return {name: body[name] for name in SHAPING if name in body}
