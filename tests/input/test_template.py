"""The ``[template]`` text: placeholders, escaped braces, errors naming the field, values."""

from __future__ import annotations

import datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.errors import ConfigError
from batcher.input.template import MissingColumn, escape, parse_template, value_text


def test_placeholders_are_replaced_and_doubled_braces_are_literal() -> None:
    template = parse_template("Q: {question} {{not a column}} ({first name})", "template.user")
    assert template.columns == ("question", "first name")
    row = {"question": "2+2?", "first name": "Ada"}
    assert template.render(row) == "Q: 2+2? {not a column} (Ada)"


def test_triple_braces_are_a_literal_brace_around_a_placeholder() -> None:
    assert parse_template("{{{x}}}", "template.user").render({"x": "v"}) == "{v}"


def test_a_value_holding_braces_is_put_in_as_it_is() -> None:
    template = parse_template("{a}{b}", "template.user")
    assert template.render({"a": "{b}", "b": "}}"}) == "{b}}}"


def test_a_missing_column_names_the_column_and_the_field() -> None:
    template = parse_template("{question} / {context}", "template.system")
    with pytest.raises(MissingColumn) as caught:
        template.render({"question": "q"})
    assert str(caught.value) == "missing column 'context' (template.system)"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a } b", "unmatched '}' at character 3"),
        ("a { b", "unclosed '{' at character 3"),
        ("a {b {c}", "unclosed '{' at character 3"),
        ("x {} y", "empty placeholder '{}' at character 3"),
        ("x {  } y", "empty placeholder '{}' at character 3"),
    ],
)
def test_bad_templates_are_config_errors_naming_the_field(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_template(text, "template.user")
    assert caught.value.field == "template.user"
    assert reason in caught.value.reason


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("x", "x"),
        (None, ""),
        (True, "true"),
        (False, "false"),
        (3, "3"),
        (0.5, "0.5"),
        (float("nan"), ""),  # a missing number (pandas' NaN), as null
        ([1, "é"], '[1, "é"]'),
        ({"a": None}, '{"a": null}'),
        (b"bytes", "bytes"),
        (datetime.date(2024, 1, 2), "2024-01-02"),
        (datetime.datetime(2024, 1, 2, 3, 4, 5), "2024-01-02T03:04:05"),
        (Decimal("1.50"), "1.50"),
    ],
)
def test_values_render_as_text(value: object, text: str) -> None:
    assert value_text(value) == text


_columns = st.text(min_size=1).filter(lambda c: "{" not in c and "}" not in c and c.strip())


@given(st.lists(st.tuples(st.text(), _columns, st.text()), max_size=5), st.text())
def test_rendering_escaped_text_and_placeholders_gives_the_text_and_the_values(
    segments: list[tuple[str, str, str]], tail: str
) -> None:
    """Any literal text survives escaping, and any value (braces included) is put in verbatim,
    placeholders never read inside it."""
    source = "".join(escape(lit) + "{" + col + "}" for lit, col, _ in segments) + escape(tail)
    row = {col: value for _, col, value in segments}
    expected = "".join(lit + row[col] for lit, col, _ in segments) + tail
    template = parse_template(source, "template.user")
    assert template.render(row) == expected
    assert set(template.columns) == set(row)


@given(st.text())
def test_escaped_text_renders_to_itself_with_no_columns(text: str) -> None:
    template = parse_template(escape(text), "template.user")
    assert template.columns == ()
    assert template.render({}) == text
