"""The output's typed columns beyond the fixed ``SCHEMA``: which a job's output has, and their
types (``OutputShape``, made by ``shape_for`` from the job and its input's schema).

``messages`` is in every output; ``input`` holds a tabular input's row; ``parsed`` a
``json_schema`` answer, typed from the schema; ``tool_calls`` the tool calls of the first
choice, their arguments typed from the tool's ``parameters``. The types come from
``typed.arrow_type``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pyarrow as pa

from batcher.config import JobConfig
from batcher.output.typed import JSON_TEXT, arrow_type

#: The ``messages`` column's type: the messages as sent, content as text (a list of parts as
#: JSON text).
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


@dataclass(frozen=True, kw_only=True)
class OutputShape:
    """The typed columns a job's output has beyond ``SCHEMA``.

    ``input``: the type of the ``input`` column (a tabular input's row), ``None`` for none;
    ``parsed``: the type of the ``parsed`` column (the answer of a ``json_schema``
    response format), ``None`` for none; ``tool_arguments``: the type of a tool call's
    ``arguments`` in the ``tool_calls`` column, ``None`` when the job asks with no tools.
    """

    input: pa.StructType | None = None
    parsed: pa.DataType | None = None
    tool_arguments: pa.DataType | None = None

    def fields(self) -> list[pa.Field]:
        """The columns after ``SCHEMA``'s, in order."""
        fields = [pa.field("messages", MESSAGES)]
        if self.input is not None:
            fields.append(pa.field("input", self.input))
        if self.parsed is not None:
            fields.append(pa.field("parsed", self.parsed))
        if self.tool_arguments is not None:
            fields.append(pa.field("tool_calls", tool_calls_type(self.tool_arguments)))
        return fields


@lru_cache(maxsize=16)
def tool_calls_type(arguments: pa.DataType) -> pa.DataType:
    """The ``tool_calls`` column's type, its calls' ``arguments`` of type ``arguments``."""
    call = pa.struct([("id", pa.string()), ("name", pa.string()), ("arguments", arguments)])
    return pa.list_(call)


def shape_for(
    job: JobConfig,
    input_schema: pa.Schema | None,
    line_asks: Sequence[Mapping[str, Any]] = (),
) -> OutputShape:
    """The output shape of ``job`` whose input rows have ``input_schema`` (``None``: the input
    is request lines), its lines asking ``line_asks`` (``input.line_formats.line_asks``: the
    distinct ``response_format``/``tools`` the lines set; empty: none read).

    ``parsed`` is typed from the schema when every request of the job asks for the same
    ``json_schema``, as sent: the line's own over the ``[request]`` default, each variant's
    over both; when lines or variants ask for different ones, or only some ask for one, it is
    JSON text. ``tool_calls``' arguments likewise, from the ``parameters`` of the one function
    tool (JSON text with several tools). What does not fit the types is null (the answer
    stays in ``content``).
    """
    requests = _requests(job, line_asks)
    row = None if input_schema is None else pa.struct(list(input_schema))
    schemas = [_answer_schema(r.get("response_format")) for r in requests]
    tools = [_tools(r.get("tools")) for r in requests]
    return OutputShape(input=row, parsed=_typed(schemas), tool_arguments=_typed(tools))


def _requests(job: JobConfig, line_asks: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The requests as each variant sends them, for each distinct ask of the lines
    (``[request]`` < line < variant)."""
    overrides = [variant.request for variant in job.variants] or [{}]
    return [{**job.request, **ask, **over} for ask in line_asks or [{}] for over in overrides]


_NONE = object()  # the request asks for nothing of the kind


def _typed(schemas: Sequence[Any]) -> pa.DataType | None:
    """The column type for these requests' schemas: ``None`` if none asks, the schema's type
    if all ask the same, else JSON text."""
    asked = [s for s in schemas if s is not _NONE]
    if not asked:
        return None
    if len(asked) < len(schemas) or any(s != asked[0] for s in asked):
        return JSON_TEXT
    return arrow_type(asked[0])


def _answer_schema(response_format: Any) -> Any:
    """The JSON schema a ``response_format`` asks for, ``True`` (anything) for one without a
    schema, or ``_NONE`` for no ``json_schema`` format."""
    if not isinstance(response_format, Mapping) or response_format.get("type") != "json_schema":
        return _NONE
    spec = response_format.get("json_schema")
    return spec.get("schema", True) if isinstance(spec, Mapping) else True


def _tools(tools: Any) -> Any:
    """The arguments' schema of a request's tools: the one function tool's ``parameters``,
    ``True`` (anything) for several tools, ``_NONE`` for none."""
    if not isinstance(tools, list) or not tools:
        return _NONE
    if len(tools) != 1 or not isinstance(tools[0], Mapping):
        return True
    function = tools[0].get("function")
    if not isinstance(function, Mapping):
        return True
    return function.get("parameters", True)


def output_shape(job: JobConfig) -> OutputShape:
    """The output shape of ``job``, read from its input: a tabular input's columns, or what
    its request lines ask for (``line_formats``)."""
    from pathlib import Path

    from batcher.input.columns import input_schema
    from batcher.input.line_formats import line_asks
    from batcher.input.table_files import input_form

    asks: list[dict[str, Any]] = []
    path = job.input
    if job.template is None and isinstance(path, Path) and input_form(path) == "jsonl":
        asks = line_asks(path)
    return shape_for(job, input_schema(job), asks)
