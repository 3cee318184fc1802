"""Tables as input: CSV, TSV, Parquet and JSONL rows through ``[template]``; ids, rejects,
the ``input`` column's schema, the progress total, the job's system message."""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.config import JobConfig, TemplateConfig, VariantConfig
from batcher.errors import ConfigError, InputError
from batcher.input.columns import count_rows, input_schema
from batcher.input.reader import Reader
from batcher.input.sources import count_lines, open_input
from batcher.input.table_files import input_form
from batcher.input.tabular import TableReader, check_input, reader_for
from batcher.records import Reject, Request


def job_for(path: Path, user: str = "Q: {question}", **template: Any) -> JobConfig:
    return JobConfig(
        input=path,
        request={"model": "m", "temperature": 0},
        template=TemplateConfig(user=user, **template),
    )


def read(
    job: JobConfig, variant: VariantConfig | None = None, *, path: Path | None = None
) -> list[Request | Reject]:
    source = job.input if path is None else path
    assert isinstance(source, Path)
    with open_input(source) as stream:
        reader = reader_for(job, stream, path=path, variant=variant, count_tokens=False)
        return list(reader)


def users(items: list[Request | Reject]) -> list[str]:
    return [i.body["messages"][-1]["content"] for i in items if isinstance(i, Request)]


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# --- CSV and TSV ---------------------------------------------------------------------------


def test_csv_quoting_embedded_newlines_and_a_bom(tmp_path: Path) -> None:
    src = write(
        tmp_path / "q.csv",
        b'\xef\xbb\xbfquestion,gold\r\n"a, b",1\r\n"two\nlines ""quoted""",2\r\nplain,3\r\n',
    )
    items = read(job_for(src))
    assert all(isinstance(i, Request) for i in items)
    assert users(items) == ["Q: a, b", 'Q: two\nlines "quoted"', "Q: plain"]
    assert [i.custom_id for i in items] == ["1", "2", "3"]  # the row number
    assert [i.line for i in items] == [1, 2, 3]  # data rows, whatever the file's lines
    first = items[0]
    assert isinstance(first, Request)
    assert first.input == {"question": "a, b", "gold": "1"}  # the BOM is not in the name
    assert first.body == {
        "model": "m",
        "temperature": 0,
        "messages": [{"role": "user", "content": "Q: a, b"}],
    }


def test_tsv_and_a_gzipped_csv(tmp_path: Path) -> None:
    tsv = write(tmp_path / "q.tsv", "question\tgold\nwhat, exactly?\tx\n")
    assert users(read(job_for(tsv))) == ["Q: what, exactly?"]
    gz = tmp_path / "q.csv.gz"
    gz.write_bytes(gzip.compress(b"question\nfrom gzip\n"))
    assert input_form(gz) == "csv"
    assert users(read(job_for(gz))) == ["Q: from gzip"]


def test_blank_rows_are_skipped_and_not_numbered(tmp_path: Path) -> None:
    src = write(tmp_path / "q.csv", "question\n\nfirst\n\n\nsecond\n")
    items = read(job_for(src))
    assert [(i.custom_id, i.line) for i in items] == [("1", 1), ("2", 2)]


def test_a_missing_column_is_a_reject_naming_it(tmp_path: Path) -> None:
    src = write(tmp_path / "q.csv", "question,gold\nfine,1\nshort\n")
    items = read(job_for(src, user="{question} (gold {gold})"))
    ok, short = items
    assert isinstance(ok, Request)
    assert isinstance(short, Reject)
    assert short.line == 2
    assert short.reason == "missing column 'gold' (template.user)"
    assert json.loads(short.text) == {"question": "short", "gold": None}


def test_a_template_naming_a_column_the_table_lacks_is_refused_before_reading(
    tmp_path: Path,
) -> None:
    src = write(tmp_path / "q.csv", "prompt,gold\na,1\nb,2\n")
    for template, field in (
        ({"user": "Q: {prompt}", "system": "Use {context}."}, "template.system"),
        ({"user": "Q: {nope}"}, "template.user"),
        ({"user": "Q: {prompt}", "id_column": "key"}, "template.id_column"),
    ):
        job = job_for(src, **template)
        with pytest.raises(ConfigError) as caught:
            check_input(job)
        assert caught.value.field == field
        assert "its columns: 'prompt', 'gold'" in str(caught.value)
        with pytest.raises(ConfigError):  # the reader checks first: no row is rejected
            read(job)
    # a row the template cannot render is still a reject, when the column is in the header
    with open_input(src) as stream:
        rows = list(TableReader(stream, "csv", TemplateConfig(user="{context}")))
    assert {r.reason for r in rows if isinstance(r, Reject)} == {
        "missing column 'context' (template.user)"
    }


def test_an_empty_user_template_is_refused(tmp_path: Path) -> None:
    src = write(tmp_path / "q.csv", "question\na\n")
    for user in ("", "  "):
        with pytest.raises(ConfigError) as caught:
            check_input(job_for(src, user=user))
        assert caught.value.field == "template.user"
        assert "empty" in str(caught.value)


def test_jsonl_rows_columns_are_every_rows_keys_in_first_seen_order(tmp_path: Path) -> None:
    src = write(tmp_path / "q.jsonl", '{"q": "a"}\n[1]\n{"q": "b", "gold": "B"}\n{"x": 1}\n')
    job = job_for(src, user="{q}")
    assert input_schema(job) == pa.schema(
        [("q", pa.string()), ("gold", pa.string()), ("x", pa.string())]
    )
    ok = [i for i in read(job) if isinstance(i, Request)]
    assert [i.input for i in ok] == [
        {"q": "a", "gold": None, "x": None},
        {"q": "b", "gold": "B", "x": None},
    ]
    check_input(job_for(src, user="{gold}"))  # a column of some rows is known
    with pytest.raises(ConfigError, match="no column 'nope' in the input; its columns: 'q'"):
        check_input(job_for(src, user="{nope}"))


def test_a_row_with_more_fields_than_the_header_is_a_reject(tmp_path: Path) -> None:
    src = write(tmp_path / "q.csv", "question\nok\na,b\n")
    items = read(job_for(src))
    assert isinstance(items[1], Reject)
    assert items[1].reason == "row has 2 fields, the header has 1"


def test_id_column_gives_the_ids_empty_or_missing_ids_are_rejects(tmp_path: Path) -> None:
    src = write(tmp_path / "q.csv", "id,question\nq1,a\n,b\nq1,c\nq4,d\n")
    items = read(job_for(src, id_column="id"))
    assert [(i.line, i.custom_id) for i in items if isinstance(i, Request)] == [
        (1, "q1"),
        (4, "q4"),
    ]
    rejects = {i.line: i.reason for i in items if isinstance(i, Reject)}
    assert rejects == {
        2: "empty id in column 'id' (template.id_column)",
        3: "duplicate id 'q1' (ids must be unique)",
    }


def test_invalid_utf8_and_duplicate_header_names_are_input_errors(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.csv", b"question\nok\n\xff\xfe\n")
    with pytest.raises(InputError, match="invalid UTF-8 on line 3 of the input, at byte 1"):
        read(job_for(bad))
    twice = write(tmp_path / "twice.csv", "q,q\n1,2\n")
    with pytest.raises(InputError, match="names column 'q' twice"):
        read(job_for(twice))


def test_the_template_system_and_the_job_system(tmp_path: Path) -> None:
    src = write(tmp_path / "q.csv", "question,lang\nhi,French\n")
    own = read(job_for(src, system="Answer in {lang}."))
    assert isinstance(own[0], Request)
    assert own[0].body["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Q: hi"},
    ]
    job = JobConfig(
        input=src,
        request={"model": "m"},
        system="Be brief.",
        template=TemplateConfig(user="{question}"),
    )
    plain = read(job)
    assert isinstance(plain[0], Request)
    assert plain[0].body["messages"][0] == {"role": "system", "content": "Be brief."}
    both = read(
        JobConfig(
            input=src,
            request={"model": "m"},
            system="Be brief.",
            template=TemplateConfig(user="{question}", system="In {lang}."),
        )
    )
    assert isinstance(both[0], Request)
    assert both[0].body["messages"][0]["content"] == "In French."  # the template's wins


def test_variants_read_the_rows_again_each_with_its_overrides(tmp_path: Path) -> None:
    src = write(tmp_path / "q.csv", "question\na\nb\n")
    job = job_for(src)
    for name, temperature in (("cold", 0.0), ("hot", 1.0)):
        variant = VariantConfig(name=name, request={"temperature": temperature}, system="S")
        items = [i for i in read(job, variant) if isinstance(i, Request)]
        assert [(i.custom_id, i.variant, i.body["temperature"]) for i in items] == [
            ("1", name, temperature),
            ("2", name, temperature),
        ]
        assert all(i.body["messages"][0] == {"role": "system", "content": "S"} for i in items)


def test_a_table_without_a_template_is_refused_naming_template_user(tmp_path: Path) -> None:
    src = write(tmp_path / "q.parquet", b"")
    job = JobConfig(input=src, request={"model": "m"})
    with pytest.raises(ConfigError) as caught:
        check_input(job)
    assert caught.value.field == "template.user"
    with src.open("rb") as stream, pytest.raises(ConfigError):
        reader_for(job, stream)
    with pytest.raises(ConfigError, match="do not gzip"):
        input_form(tmp_path / "q.parquet.gz")


def test_a_bad_template_is_refused_before_reading(tmp_path: Path) -> None:
    src = write(tmp_path / "q.csv", "question\na\n")
    with pytest.raises(ConfigError) as caught:
        check_input(job_for(src, user="Q: {question"))
    assert caught.value.field == "template.user"


# --- Parquet -------------------------------------------------------------------------------


def parquet_table(path: Path, row_group_size: int = 2) -> Path:
    table = pa.table(
        {
            "id": pa.array([7, 8, 9], pa.int64()),
            "question": ["a", None, "c"],
            "score": pa.array([0.5, 1.0, None], pa.float64()),
            "ok": [True, False, True],
            "tags": pa.array([["x"], [], ["y", "z"]], pa.list_(pa.string())),
            "meta": pa.array([{"k": 1}, {"k": 2}, {"k": None}], pa.struct([("k", pa.int32())])),
            "day": pa.array([datetime.date(2024, 1, d) for d in (1, 2, 3)], pa.date32()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_types_render_as_text_and_stay_typed_in_input(tmp_path: Path) -> None:
    src = parquet_table(tmp_path / "t.parquet")
    user = "{question}|{score}|{ok}|{tags}|{meta}|{day}"
    items = read(job_for(src, user=user, id_column="id"))
    assert [i.custom_id for i in items] == ["7", "8", "9"]  # across two row groups
    assert users(items) == [
        'a|0.5|true|["x"]|{"k": 1}|2024-01-01',
        '|1.0|false|[]|{"k": 2}|2024-01-02',
        'c||true|["y", "z"]|{"k": null}|2024-01-03',
    ]
    first = items[0]
    assert isinstance(first, Request)
    assert first.input == {
        "id": 7,
        "question": "a",
        "score": 0.5,
        "ok": True,
        "tags": ["x"],
        "meta": {"k": 1},
        "day": datetime.date(2024, 1, 1),
    }
    assert input_schema(job_for(src)) == pq.read_schema(src).remove_metadata()


def test_a_file_that_is_not_parquet_is_an_input_error(tmp_path: Path) -> None:
    src = write(tmp_path / "t.parquet", "question\nnot parquet\n")
    with pytest.raises(InputError, match="as Parquet"):
        read(job_for(src))


def test_parquet_rows_are_counted_from_the_metadata_alone(tmp_path: Path) -> None:
    src = parquet_table(tmp_path / "t.parquet")
    assert count_lines(src) == 3
    # the data pages spoiled: the footer still gives the count, so no page was read
    data = bytearray(src.read_bytes())
    data[4:200] = b"\0" * 196
    src.write_bytes(bytes(data))
    assert count_rows(src) == 3
    with pytest.raises(InputError):
        read(job_for(src))


def test_csv_rows_are_counted_as_rows_not_lines(tmp_path: Path) -> None:
    src = write(tmp_path / "q.csv", 'question\n"two\nlines"\n\nb\n')
    assert count_lines(src) == 2


# --- JSONL rows ----------------------------------------------------------------------------


def test_with_a_template_every_jsonl_line_is_a_row(tmp_path: Path) -> None:
    src = write(
        tmp_path / "rows.jsonl",
        "not json\n"
        '{"question": "a", "n": 1, "extra": {"x": [1]}}\n'
        '{"question": "b", "messages": "not a request here", "n": null}\n'
        "[1]\n"
        '{"n": 3}\n',
    )
    items = read(job_for(src, user="{question} #{n}"))
    assert users(items) == ["a #1", "b #"]
    ok = [i for i in items if isinstance(i, Request)]
    assert [(i.custom_id, i.line) for i in ok] == [("2", 2), ("3", 3)]  # numbered by line
    assert ok[0].input == {"question": "a", "n": "1", "extra": '{"x":[1]}', "messages": None}
    assert ok[1].input == {  # every row's keys
        "question": "b",
        "n": None,
        "extra": None,
        "messages": "not a request here",
    }
    rejects = {i.line: i.reason for i in items if isinstance(i, Reject)}
    assert rejects == {
        1: "invalid JSON: Expecting value at column 1",
        4: "not a JSON object (got an array)",
        5: "missing column 'question' (template.user)",
    }
    schema = input_schema(job_for(src))
    names = ["question", "n", "extra", "messages"]
    assert schema == pa.schema([(name, pa.string()) for name in names])


def test_input_schema_of_csv_is_its_header_as_strings(tmp_path: Path) -> None:
    src = write(tmp_path / "q.tsv", "\ufeffid\tquestion\tgold\n1\ta\tb\n")
    assert input_schema(job_for(src)) == pa.schema(
        [("id", pa.string()), ("question", pa.string()), ("gold", pa.string())]
    )
    assert input_schema(JobConfig(input=src)) is None  # no template: no rows


def test_input_schema_of_a_glob_or_uri_is_its_first_files_without_reading_rows(
    tmp_path: Path,
) -> None:
    from batcher.output.shape import output_shape

    folder = tmp_path / "noid"
    folder.mkdir()
    write(folder / "b.csv", "question,other\nx,y\n")
    write(folder / "a.csv", "question\nq\n")
    job = job_for(folder / "*.csv")
    assert input_schema(job) == pa.schema([("question", pa.string())])
    assert output_shape(job) == output_shape(job_for(folder / "a.csv"))
    (folder / "c.csv.gz").write_bytes(gzip.compress(b"question,more\nq,r\n"))
    uri = dataclasses.replace(job_for(folder), input=f"file://{folder}/c.csv.gz")
    assert input_schema(uri) == pa.schema([("question", pa.string()), ("more", pa.string())])

    pq.write_table(pa.table({"question": ["q"], "n": [1]}), folder / "1.parquet")
    pq.write_table(pa.table({"question": ["r"]}), folder / "2.parquet")
    expected = pa.schema([("question", pa.string()), ("n", pa.int64())])
    assert input_schema(job_for(folder / "*.parquet")) == expected
    remote = dataclasses.replace(job_for(folder), input=f"file://{folder}/*.parquet")
    assert input_schema(remote) == expected
    with pytest.raises(InputError, match="no file matches"):
        input_schema(job_for(folder / "*.tsv"))


def test_jsonl_requests_without_a_template_are_read_as_before(tmp_path: Path) -> None:
    src = write(tmp_path / "in.jsonl", '{"prompt": "hi"}\n')
    job = JobConfig(input=src, request={"model": "m"}, system="Be brief.")
    with src.open("rb") as stream:
        reader = reader_for(job, stream)
        assert type(reader) is Reader and not isinstance(reader, TableReader)
        (item,) = list(reader)
    assert isinstance(item, Request)
    assert item.input is None
    assert item.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]


# --- every pass over the input reads tables ------------------------------------------------


def test_estimate_and_a_batch_run_read_the_rows(tmp_path: Path) -> None:
    from batcher.batch.prepare import read_all
    from batcher.cost.estimate import estimate
    from batcher.runner.stats import RunStats

    src = write(tmp_path / "q.csv", "question\nfirst\nsecond\n\n")
    job = JobConfig(
        input=src,
        output=tmp_path / "out.jsonl",
        request={"model": "gpt-4o-mini", "max_tokens": 10},
        template=TemplateConfig(user="{question}"),
        variants=(VariantConfig(name="a"), VariantConfig(name="b")),
    )
    est = estimate(job)
    assert est.by_model["gpt-4o-mini"].requests == 4  # two rows, each in two variants
    assert est.rejected == 0
    stats = RunStats()
    requests = read_all(job, src, tmp_path / "out.jsonl", stats)
    assert [(r.custom_id, r.variant, r.input) for r in requests] == [
        ("1", "a", {"question": "first"}),
        ("2", "a", {"question": "second"}),
        ("1", "b", {"question": "first"}),
        ("2", "b", {"question": "second"}),
    ]
    assert stats.lines_read == 2
    with pytest.raises(ConfigError, match=r"template\.user"):
        estimate(JobConfig(input=src, request={"model": "m"}))
