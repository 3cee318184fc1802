"""The reader: the three input forms, defaults merging, and every kind of rejected line."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
from pathlib import Path

import pytest

from batcher.errors import InputError
from batcher.input.reader import Reader, load_first_encoding, parse_line
from batcher.input.sources import count_lines, open_input
from batcher.records import Reject, Request
from tests.helpers import batcher_cmd, run_batcher

DEFAULTS = {"model": "m-default", "temperature": 0.5}


def read(text: str | bytes, defaults: dict[str, object] | None = None) -> list[Request | Reject]:
    raw = text.encode() if isinstance(text, str) else text
    return list(Reader(io.BytesIO(raw), DEFAULTS if defaults is None else defaults))


def one(line: str, defaults: dict[str, object] | None = None) -> Request | Reject:
    items = read(line + "\n", defaults)
    assert len(items) == 1
    return items[0]


def test_batch_api_form() -> None:
    line = {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
    }
    req = one(json.dumps(line))
    assert isinstance(req, Request)
    assert req.custom_id == "r1"
    assert req.body == {
        "model": "gpt-4o",
        "temperature": 0.5,
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert req.metadata is None


def test_body_form_keeps_unknown_fields_and_takes_metadata_out() -> None:
    line = {
        "id": "b7",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0,
        "logprobs": True,
        "some_future_field": {"x": [1, 2]},
        "metadata": {"split": "test"},
    }
    req = one(json.dumps(line))
    assert isinstance(req, Request)
    assert req.custom_id == "b7"
    assert req.metadata == {"split": "test"}
    assert req.body["temperature"] == 0  # the line wins over the default 0.5
    assert req.body["model"] == "m-default"
    assert req.body["logprobs"] is True
    assert req.body["some_future_field"] == {"x": [1, 2]}
    assert "metadata" not in req.body and "id" not in req.body


def test_every_reference_field_passes_through() -> None:
    fields = {
        "model": "gpt-4o",
        "temperature": 1,
        "top_p": 0.9,
        "n": 2,
        "stream": False,
        "stop": ["\n"],
        "max_tokens": 10,
        "presence_penalty": 0.1,
        "frequency_penalty": -0.2,
        "logit_bias": {"50256": -100},
        "user": "u1",
        "response_format": {"type": "json_object"},
        "seed": 42,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "auto",
    }
    req = one(json.dumps({"messages": [{"role": "user", "content": "x"}], **fields}))
    assert isinstance(req, Request)
    for key, value in fields.items():
        assert req.body[key] == value


def test_prompt_form_with_system() -> None:
    req = one(json.dumps({"custom_id": "p", "prompt": "Hello", "system": "Be brief", "n": 3}))
    assert isinstance(req, Request)
    assert req.body["messages"] == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Hello"},
    ]
    assert req.body["n"] == 3


def test_ids_default_to_line_numbers_and_numbers_become_strings() -> None:
    items = read('{"prompt": "a"}\n\n{"prompt": "b"}\n{"id": 5, "prompt": "c"}\n')
    assert [i.custom_id for i in items] == ["line-1", "line-3", "5"]


def test_token_estimate_counts_prompt_with_tiktoken_plus_completion_budget() -> None:
    from batcher.cost.tokens import count_message_tokens

    line = {"prompt": "The quick brown fox jumps over the lazy dog.", "max_tokens": 100, "n": 2}
    req = one(json.dumps(line))
    assert isinstance(req, Request)
    # m-default is not an OpenAI model: cl100k_base; the sentence is 10 tokens there
    assert req.prompt_tokens == 3 + 3 + 10
    assert req.prompt_tokens == count_message_tokens(req.body["messages"], "cl100k_base")
    assert req.est_tokens == req.prompt_tokens + 100 * 2
    default = one(json.dumps({"prompt": "hi"}))
    assert isinstance(default, Request) and default.prompt_tokens is not None
    assert default.est_tokens == default.prompt_tokens + 256  # DEFAULT_COMPLETION_TOKENS
    stream = io.BytesIO(json.dumps({"prompt": "üñï"}).encode() + b"\n")
    forced = next(iter(Reader(stream, DEFAULTS, encoding="o200k_base")))
    assert isinstance(forced, Request)
    assert forced.prompt_tokens == count_message_tokens(forced.body["messages"], "o200k_base")


def test_uncounted_lines_keep_their_completion_budget() -> None:
    line = {"prompt": "The quick brown fox.", "max_tokens": 100, "n": 2}
    stream = io.BytesIO(json.dumps(line).encode() + b"\n")
    req = next(iter(Reader(stream, DEFAULTS, count_tokens=False)))
    assert isinstance(req, Request)
    assert req.prompt_tokens is None
    assert req.completion_budget == 200 and req.est_tokens == 200


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"prompt": "unterminated', "invalid JSON"),
        (b"[1, 2]", "not a JSON object (got an array)"),
        (b'"text"', "not a JSON object (got a string)"),
        (b'{"prompt": "caf\xe9"}', "invalid UTF-8 at byte 15"),
        (b'{"temperature": 1}', "no 'messages', 'prompt' or 'body'"),
        (b'{"messages": []}', "messages: must not be empty"),
        (b'{"messages": "hi"}', "messages: must be a list"),
        (b'{"messages": [{"content": "x"}]}', "no string 'role'"),
        (b'{"prompt": "x", "temperature": "hot"}', "temperature: must be a number"),
        (b'{"prompt": "x", "n": 0}', "n: must be an integer >= 1"),
        (b'{"prompt": "x", "max_tokens": true}', "max_tokens: must be an integer"),
        (b'{"prompt": "x", "seed": 1.5}', "seed: must be an integer"),
        (b'{"prompt": "x", "stop": [1]}', "stop: must be a string or a list of strings"),
        (b'{"prompt": "x", "stream": 1}', "stream: must be true or false"),
        (b'{"prompt": ""}', "prompt must be a non-empty string"),
        (b'{"prompt": "x", "metadata": 3}', "metadata must be an object"),
        (b'{"custom_id": true, "prompt": "x"}', "custom_id must be a string or an integer, got a"),
        # integer ids are taken as text: a fractional one is named, not "got a number"
        (b'{"custom_id": 1.5, "prompt": "x"}', "custom_id must be a string or an integer, got 1.5"),
        (b'{"id": 1e3, "prompt": "x"}', "id must be a string or an integer, got 1000.0"),
        (b'{"body": {"messages": [{"role": "user"}]}, "method": "GET"}', "method must be POST"),
        (b'{"body": {"messages": [{"role": "user"}]}, "url": "/v1/embeddings"}', "not supported"),
        (b'{"body": [], "url": "/v1/chat/completions"}', "body must be an object"),
        (b'{"prompt": "x", "temperature": NaN}', "NaN is not allowed"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 200 levels"),
    ],
)
def test_rejects_name_the_reason(raw: bytes, reason: str) -> None:
    (item,) = read(raw + b"\n")
    assert isinstance(item, Reject)
    assert item.line == 1
    assert reason in item.reason
    assert "\n" not in item.reason


def test_missing_model_is_rejected_without_a_default() -> None:
    item = one('{"prompt": "x"}', defaults={})
    assert isinstance(item, Reject)
    assert "no model" in item.reason


def test_duplicate_id_is_rejected_and_the_run_goes_on() -> None:
    items = read(
        '{"id": "a", "prompt": "1"}\n{"id": "a", "prompt": "2"}\n{"id": "b", "prompt": "3"}\n'
    )
    assert [type(i).__name__ for i in items] == ["Request", "Reject", "Request"]
    dup = items[1]
    assert isinstance(dup, Reject)
    assert dup.line == 2 and "duplicate id 'a'" in dup.reason
    assert dup.text == '{"id": "a", "prompt": "2"}'


def test_bom_and_crlf_are_tolerated() -> None:
    items = read(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    assert all(isinstance(i, Request) for i in items)
    assert len(items) == 2


def test_reject_keeps_the_line_text() -> None:
    item = parse_line(b'{"prompt": 1}\n', 9, DEFAULTS)
    assert isinstance(item, Reject)
    assert item.line == 9 and item.text == '{"prompt": 1}'


def test_gzip_and_counting(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert count_lines(path) == 2
    with open_input(path) as stream:
        items = list(Reader(stream, DEFAULTS))
    assert [i.custom_id for i in items] == ["line-1", "line-3"]


@pytest.mark.parametrize("content", [b"x", b'{"prompt": "plain text, not gzip"}\n'])
def test_a_gz_input_that_is_not_gzip_is_refused_when_opened(tmp_path: Path, content: bytes) -> None:
    """Not a stop "after line 0" once the run has begun (exit 3: resume), but an input error
    before anything is sent (exit 2)."""
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"in\.jsonl\.gz: not a gzip file"):
        open_input(path)
    empty = tmp_path / "empty.jsonl.gz"
    empty.write_bytes(gzip.compress(b""))
    with open_input(empty) as stream:
        assert stream.read() == b""


def test_a_gz_input_that_is_not_gzip_is_exit_2_with_nothing_written(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(b'{"prompt": "hi"}\n')
    out = tmp_path / "o.parquet"
    args = ["-i", str(path), "-o", str(out), "-m", "m", "--base-url", "sim", "--no-progress"]
    proc = run_batcher("run", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().endswith("not a gzip file (Not a gzipped file (b'{\"'))")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl.gz"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_a_utf16_input_is_one_error_not_every_line_rejected(tmp_path: Path, encoding: str) -> None:
    """Windows PowerShell's ``>`` writes UTF-16 with a byte-order mark: each line was
    rejected as invalid UTF-8 (exit 1); it is one input error before anything is sent."""
    text = '{"prompt": "hi"}\n'
    path = tmp_path / "in.jsonl"
    bom = {"utf-16": b"", "utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}[encoding]
    path.write_bytes(bom + text.encode(encoding))
    with pytest.raises(InputError, match=r"in\.jsonl is UTF-16 .*: save it as UTF-8"):
        open_input(path)
    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(InputError, match="is UTF-16"):
        open_input(packed)
    out = tmp_path / "o.parquet"
    args = ["-i", "-", "-o", str(out), "-m", "m", "--base-url", "sim", "--no-progress"]
    proc = subprocess.run(
        batcher_cmd("run", *args), input=path.read_bytes(), capture_output=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert b"error: input (standard input) is UTF-16" in proc.stderr and not out.exists()


def test_missing_input_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        open_input(tmp_path / "nope.jsonl")


def test_sample_messy_file_rejects_and_accepts_the_expected_lines() -> None:
    path = Path(__file__).parents[2] / "sample_data" / "messy.jsonl"
    with open_input(path) as stream:
        items = list(Reader(stream, {"model": "m"}))
    accepted = [i.custom_id for i in items if isinstance(i, Request)]
    rejected = {i.line for i in items if isinstance(i, Reject)}
    assert accepted == ["ok-1", "ok-2", "42"]
    assert rejected == {3, 4, 5, 6, 7, 8, 11, 12}


def test_batches_preserve_order() -> None:
    text = "".join(json.dumps({"id": str(i), "prompt": "p"}) + "\n" for i in range(10))
    reader = Reader(io.BytesIO(text.encode()), DEFAULTS)
    batches = list(reader.batches(4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [i.custom_id for b in batches for i in b] == [str(i) for i in range(10)]


def test_batches_can_start_small_and_double() -> None:
    # the pool opens a few requests at a time (runner.lanes.FIRST_READ_BATCH)
    text = "".join(json.dumps({"id": str(i), "prompt": "p"}) + "\n" for i in range(40))
    reader = Reader(io.BytesIO(text.encode()), DEFAULTS)
    batches = list(reader.batches(8, first=1))
    assert [len(b) for b in batches] == [1, 2, 4, 8, 8, 8, 8, 1]
    assert [i.custom_id for b in batches for i in b] == [str(i) for i in range(40)]
    with pytest.raises(ValueError, match="batch sizes"):
        next(reader.batches(8, first=0))


class EndlessInput:
    """A binary stream that never ends: reading it whole would never return."""

    def __init__(self) -> None:
        self.lines_given = 0

    def __iter__(self) -> EndlessInput:
        return self

    def __next__(self) -> bytes:
        self.lines_given += 1
        return json.dumps({"prompt": f"p{self.lines_given}"}).encode() + b"\n"


def test_reader_streams_line_by_line() -> None:
    source = EndlessInput()
    reader = Reader(source, DEFAULTS)  # type: ignore[arg-type]
    first = [item.custom_id for _, item in zip(range(5), reader, strict=False)]
    assert first == ["line-1", "line-2", "line-3", "line-4", "line-5"]
    assert source.lines_given <= 6  # nothing read ahead beyond what was asked


def test_load_first_encoding_counts_the_first_request_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted: list[tuple[object, str | None]] = []

    def count(body: dict[str, object], encoding: str | None) -> int:
        counted.append((body["model"], encoding))
        return 1

    monkeypatch.setattr("batcher.input.reader.estimate_prompt_tokens", count)
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'\xef\xbb\xbf\n  \n{"prompt": "hi"}\n{"prompt": "b", "model": "x"}\n')
    load_first_encoding(src, {"model": "gpt-4o"}, None)
    assert counted == [("gpt-4o", None)]
    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"prompt": "hi", "model": "gpt-4"}\n'))
    load_first_encoding(packed, {}, "o200k_base")
    assert counted[1:] == [("gpt-4", "o200k_base")]
    load_first_encoding(Path("-"), {"model": "m"}, None)  # stdin: not read
    load_first_encoding(tmp_path / "missing.jsonl", {"model": "m"}, None)
    (tmp_path / "bad.jsonl").write_text("not json\n")
    load_first_encoding(tmp_path / "bad.jsonl", {"model": "m"}, None)
    assert len(counted) == 2
