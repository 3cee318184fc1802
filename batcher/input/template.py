"""``[template]`` text: ``{column}`` placeholders parsed once, then rendered for each row.

A placeholder is the whole text between ``{`` and ``}`` (spaces and dots included: a column
may be named ``"first name"``); ``{{`` and ``}}`` stand for literal braces. Nothing else is
special, so a value holding braces is put in as it is and never read as a placeholder.
Values are rendered as text: a string as is, ``null`` (and a float NaN, a missing number
in pandas) as the empty string, a boolean as
``true``/``false``, a number as Python prints it, a list or an object as JSON text.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batcher.errors import ConfigError


class MissingColumn(Exception):
    """A row lacks a column the template names (internal: becomes a ``Reject``)."""

    def __init__(self, column: str, field: str) -> None:
        super().__init__(f"missing column {column!r} ({field})")
        self.column = column


@dataclass(frozen=True)
class Template:
    """A parsed template: literal texts and column names, alternating.

    ``parts`` holds ``(literal, column)`` pairs (``column`` ``None`` for the last literal);
    ``field`` names the job field the text came from, for error messages.
    """

    parts: tuple[tuple[str, str | None], ...]
    field: str

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns the template names, in order of first use."""
        return tuple(dict.fromkeys(c for _, c in self.parts if c is not None))

    def render(self, row: Mapping[str, Any]) -> str:
        """The text for ``row``; ``MissingColumn`` when the row lacks a named column."""
        out: list[str] = []
        for literal, column in self.parts:
            out.append(literal)
            if column is not None:
                if column not in row:
                    raise MissingColumn(column, self.field)
                out.append(value_text(row[column]))
        return "".join(out)


def parse_template(text: str, field: str) -> Template:
    """Parse ``text`` (the value of job field ``field``); ``ConfigError`` naming the field
    and the character when a brace is unmatched or a placeholder is empty."""
    parts: list[tuple[str, str | None]] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char in "{}" and text.startswith(char * 2, i):
            literal.append(char)
            i += 2
        elif char == "}":
            raise ConfigError(field, f"unmatched '}}' at character {i + 1} (write '}}}}')")
        elif char == "{":
            end = text.find("}", i + 1)
            inner = text[i + 1 : end] if end != -1 else ""
            if end == -1 or "{" in inner:
                raise ConfigError(field, f"unclosed '{{' at character {i + 1} (write '{{{{')")
            if not inner.strip():
                raise ConfigError(field, f"empty placeholder '{{}}' at character {i + 1}")
            parts.append(("".join(literal), inner))
            literal = []
            i = end + 1
        else:
            literal.append(char)
            i += 1
    parts.append(("".join(literal), None))
    return Template(parts=tuple(parts), field=field)


def escape(text: str) -> str:
    """``text`` as a template that renders to itself (braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


def value_text(value: Any) -> str:
    """A cell as the text put in a message (see the module's docstring)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return ""  # a missing value, as pandas writes one
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)  # Decimal, timedelta, ...
