"""Property tests of the reader: whatever the bytes, it never crashes and loses no line."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batcher.input.reader import Reader
from batcher.output.writers import open_writer, read_results
from batcher.records import Reject, Request, Result

DEFAULTS = {"model": "m"}
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text()}
)
plausible = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(), "custom_id": st.text()}),
    st.fixed_dictionaries(
        {"messages": st.lists(message, max_size=3)},
        optional={
            "temperature": json_values,
            "n": json_values,
            "custom_id": json_values,
            "metadata": json_values,
            "stop": json_values,
        },
    ),
    st.fixed_dictionaries(
        {
            "body": st.fixed_dictionaries({"messages": st.lists(message, max_size=2)}),
            "url": st.sampled_from(["/v1/chat/completions", "/v1/embeddings", 3]),
            "method": st.sampled_from(["POST", "GET"]),
        },
    ),
    st.dictionaries(st.text(), json_values, max_size=5),
)


def non_blank_lines(data: bytes) -> int:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    count = 0
    for i, raw in enumerate(lines):
        if i == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw.strip():
            count += 1
    return count


def check(data: bytes) -> list[Request | Reject]:
    items = list(Reader(io.BytesIO(data), DEFAULTS))
    assert len(items) == non_blank_lines(data)  # accepted + rejected = lines read
    for item in items:
        if isinstance(item, Reject):
            assert item.reason and "\n" not in item.reason
        else:
            assert item.body["messages"] and item.custom_id
    ids = [i.custom_id for i in items if isinstance(i, Request)]
    assert len(ids) == len(set(ids))
    return items


@SETTINGS
@given(st.binary(max_size=2000))
def test_random_bytes(data: bytes) -> None:
    check(data)


@pytest.mark.slow
@SETTINGS
@given(st.lists(json_values, max_size=8))
def test_random_json_values(values: list[object]) -> None:
    check(b"".join(json.dumps(v).encode() + b"\n" for v in values))


@pytest.mark.slow
@SETTINGS
@given(st.lists(plausible, max_size=8), st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_plausible_lines_with_crlf_and_bom(lines: list[object], newline: bytes, bom: bool) -> None:
    data = b"".join(json.dumps(line).encode() + newline for line in lines)
    check((b"\xef\xbb\xbf" if bom else b"") + data)


@SETTINGS
@given(st.text(max_size=50), st.sampled_from(["\x00", "\ud800", "\udfff", "\ufeff", "\u2028"]))
def test_odd_characters_in_prompts(text: str, odd: str) -> None:
    line = json.dumps({"prompt": text + odd + text})  # ensure_ascii: "\\ud800" escapes survive
    items = check(line.encode() + b"\n")
    assert len(items) == 1


@pytest.mark.slow
def test_huge_line_and_deep_nesting() -> None:
    huge = json.dumps({"prompt": "x" * 5_000_000}).encode()
    deep = b'{"prompt": "p", "metadata": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    items = check(huge + b"\n" + deep + b"\n")
    assert isinstance(items[0], Request)
    assert isinstance(items[1], Reject) and "nested deeper than" in items[1].reason


# Ids built from pieces that collide once a lone surrogate is written as its escape text.
id_pieces = st.sampled_from(["a", "é", "\ud800", "\udfff", "\\ud800", "\\udfff", "\\", "u"])
ids = st.lists(id_pieces, min_size=1, max_size=4).map("".join)


@pytest.mark.slow
@SETTINGS
@given(st.lists(ids, min_size=1, max_size=8, unique=True))
@example(["a\ud800", "a\\ud800"])
@example(["\ud800", "\udfff"])
def test_distinct_accepted_ids_stay_distinct_in_the_outputs(custom_ids: list[str]) -> None:
    """An id with a lone surrogate is rejected with its line; the ids accepted come back
    from a Parquet and a JSONL output exactly, each once."""
    data = b"".join(
        json.dumps({"custom_id": cid, "prompt": "p"}).encode() + b"\n" for cid in custom_ids
    )
    items = check(data)
    accepted = [i for i in items if isinstance(i, Request)]
    for item in items:
        if isinstance(item, Reject):
            assert "lone surrogate" in item.reason, item.reason
            assert any(0xD800 <= ord(c) <= 0xDFFF for c in custom_ids[item.line - 1])
    results = [
        Result(custom_id=r.custom_id, line=r.line, status="ok", model="m", attempts=1,
               latency_s=0.0, started_at=0.0, finished_at=0.0, body={"choices": []})
        for r in accepted
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for name in ("out.parquet", "out.jsonl"):
            path = Path(folder) / name
            with open_writer(path) as writer:
                for result in results:
                    writer.write(result)
            back = [row["custom_id"] for row in read_results(path)]
            assert back == [r.custom_id for r in accepted]


line_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(alphabet=st.characters(exclude_categories=())),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@SETTINGS
@given(line_values, st.sampled_from(["json", "cut", "nan"]))
@example({"n": 12345678901234567890123}, "json")
@example({"x": 1e999}, "json")
@example({"x": "\ud800"}, "json")
def test_a_lines_value_is_what_json_loads_reads(value: object, how: str) -> None:
    """The reader's parse (orjson on the bytes where it can) gives ``json.loads``'s value, or
    refuses the line with the standard library's message."""
    from batcher.input.reader import LineError, _loads

    text = json.dumps(value)  # NaN and Infinity as JSON's extensions; lone surrogates escaped
    if how == "cut":
        text = text[: len(text) // 2]
    elif how == "nan":
        text = f'{{"a": {text}, "b": NaN}}'
    raw = text.encode()

    def refuse(name: str) -> object:
        raise ValueError(name)

    try:
        expected = json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as exc:
        with pytest.raises(LineError, match=f"at column {exc.colno}$"):
            _loads(text, raw)
        return
    except ValueError as exc:  # NaN, Infinity: refused where they are read
        with pytest.raises(LineError, match=f"{exc} is not allowed"):
            _loads(text, raw)
        return
    assert repr(_loads(text, raw)) == repr(expected)
