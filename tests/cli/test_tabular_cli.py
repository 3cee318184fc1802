"""The request flags (``--template-*``, ``--id-column``, ``--system``, ``--max-tokens``,
``--temperature``, ``-p``, ``--split-errors``) and a CSV run end to end over loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batcher.cli.main import _job
from batcher.cli.parser import build_parser
from batcher.config import TemplateConfig
from batcher.output.formats import rejects_path
from batcher.sim.answers import expected_content
from tests.helpers import jsonl, run_batcher, sim_process, sim_stats


def job_of(*argv: str) -> object:
    return _job(build_parser().parse_args(["run", "-i", "q.csv", "-o", "o.parquet", *argv]))


def test_request_flags_become_the_jobs_template_system_and_request_defaults() -> None:
    job = _job(
        build_parser().parse_args(
            ["run", "-i", "q.csv", "-o", "o.parquet", "-m", "m1",
             "--template-user", "Q: {question}", "--template-system", "In {lang}.",
             "--id-column", "id", "--system", "Be brief.", "--max-tokens", "30",
             "--temperature", "0.2", "-p", "seed=7", "-p", 'stop=["\\n"]', "--param",
             "user=me", "-p", "logit_bias={}", "-p", "note=a=b", "--split-errors"]
        )
    )  # fmt: skip
    assert job.template == TemplateConfig(user="Q: {question}", system="In {lang}.", id_column="id")
    assert job.system == "Be brief."
    assert job.split_errors is True
    assert dict(job.request) == {
        "model": "m1",
        "max_tokens": 30,
        "temperature": 0.2,
        "seed": 7,  # JSON: a number
        "stop": ["\n"],
        "user": "me",  # not JSON: the text
        "logit_bias": {},
        "note": "a=b",  # the first = splits
    }


def test_estimate_takes_the_same_request_flags() -> None:
    args = build_parser().parse_args(
        ["estimate", "-i", "q.csv", "--template-user", "{q}", "-p", "seed=1"]
    )
    job = _job(args)
    assert job.template is not None and job.template.user == "{q}"
    assert job.request == {"seed": 1}
    assert job.split_errors is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", "seed"], "expected KEY=VALUE, got 'seed'"),
        (["-p", "=3"], "expected KEY=VALUE"),
        (["--temperature", "nan"], "expected a finite number"),
        (["--max-tokens", "0"], "must be >= 1"),
    ],
)
def test_bad_request_flags_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["run", *argv])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_a_request_field_of_the_wrong_type_names_the_field() -> None:
    from batcher.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        job_of("-p", "seed=1.5")
    assert caught.value.field == "request.seed"


def test_a_csv_run_renders_each_row_through_the_template(tmp_path: Path) -> None:
    src = tmp_path / "q.csv"
    src.write_text(
        'id,question,gold\nq1,What is 2+2?,4\nq2,"Name a colour, any colour",red\nq3,,x\n'
        "q4,only two fields\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.parquet"
    with sim_process() as url:
        proc = run_batcher(
            "run", "-i", str(src), "-o", str(out), "-m", "sim-model", "--base-url", url,
            "--template-user", "Q: {question} (gold: {gold}) {{ok}}", "--id-column", "id",
            "--system", "Be brief.", "--max-tokens", "12", "--temperature", "0.5",
            "-p", "seed=3", "--no-progress",
        )  # fmt: skip
        stats = sim_stats(url)
    assert proc.returncode == 1, proc.stderr  # one row rejected
    assert stats["requests_received"] == 3
    rows = {r["custom_id"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(rows) == ["q1", "q2", "q3"]
    questions = {
        "q1": "What is 2+2? (gold: 4)",
        "q2": "Name a colour, any colour (gold: red)",
        "q3": " (gold: x)",
    }
    for cid, text in questions.items():
        sent = {
            "model": "sim-model",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Q: {text} {{ok}}"},
            ],
            "max_tokens": 12,
            "temperature": 0.5,
            "seed": 3,
        }
        assert rows[cid]["status"] == "ok"
        assert rows[cid]["content"] == expected_content(sent), cid  # the rendered prompt
    (reject,) = jsonl(rejects_path(out))
    assert reject["line"] == 4
    assert "missing column 'gold' (template.user)" in json.dumps(reject)


def test_a_csv_without_a_template_sends_nothing(tmp_path: Path) -> None:
    src = tmp_path / "q.csv"
    src.write_text("question\nhi\n", encoding="utf-8")
    out = tmp_path / "out.parquet"
    with sim_process() as url:
        proc = run_batcher(
            "run", "-i", str(src), "-o", str(out), "-m", "sim-model", "--base-url", url
        )
        stats = sim_stats(url)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("batcher: error: template.user: the input is a table")
    assert "Traceback" not in proc.stderr
    assert stats["requests_received"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.csv"]  # no journal, no output


def test_a_template_the_input_cannot_fill_is_a_usage_error(tmp_path: Path) -> None:
    src = tmp_path / "q.csv"
    src.write_text("question,gold\nhi,1\n", encoding="utf-8")
    rows = tmp_path / "q.jsonl"
    rows.write_text('{"q": "a"}\n{"q": "b", "gold": "B"}\n', encoding="utf-8")
    cases = [
        (src, ["--template-user", ""], "template.user: empty"),
        (src, ["--template-user", "{nope}"], "template.user: no column 'nope' in the input"),
        (src, ["--template-user", "{question}", "--id-column", "nope"], "template.id_column"),
        (rows, ["--template-user", "{nope}"], "its columns: 'q', 'gold'"),
    ]
    with sim_process() as url:
        for given, flags, message in cases:
            out = tmp_path / "out.parquet"
            proc = run_batcher(
                "run", "-i", str(given), "-o", str(out), "-m", "sim-model", "--base-url", url,
                *flags,
            )  # fmt: skip
            assert proc.returncode == 2, (flags, proc.stderr)
            assert message in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
            assert not out.exists()
        assert sim_stats(url)["requests_received"] == 0


def test_standard_input_is_read_like_a_file_of_its_declared_form(tmp_path: Path) -> None:
    """A CSV on stdin with --input-format csv, and JSONL rows on stdin: both have the
    ``input`` column with every column (a later row's key too); --input-format with a file
    is a usage error."""
    csv_out, rows_out = tmp_path / "csv.parquet", tmp_path / "rows.parquet"
    with sim_process() as url:
        common = ["-m", "sim-model", "--base-url", url, "--no-progress", "-i", "-"]
        from_csv = run_batcher(
            "run", *common, "-o", str(csv_out), "--input-format", "csv",
            "--template-user", "Q: {question}", "--id-column", "id",
            stdin="id,question,gold\nq1,What is 2+2?,4\nq2,Red or blue?,red\n",
        )  # fmt: skip
        from_rows = run_batcher(
            "run", *common, "-o", str(rows_out), "--template-user", "Q: {q}",
            stdin='{"q": "a"}\n{"q": "b", "gold": "B"}\n',
        )  # fmt: skip
        src = tmp_path / "q.jsonl"
        src.write_text('{"q": "a"}\n', encoding="utf-8")
        refused = run_batcher(
            "run", *common[:-2], "-i", str(src), "-o", str(tmp_path / "x.parquet"),
            "--input-format", "csv", "--template-user", "{q}",
        )  # fmt: skip
        assert sim_stats(url)["requests_received"] == 4
    assert from_csv.returncode == 0, from_csv.stderr
    table = pq.read_table(csv_out)
    assert table.column("input").to_pylist() == [
        {"id": "q1", "question": "What is 2+2?", "gold": "4"},
        {"id": "q2", "question": "Red or blue?", "gold": "red"},
    ]
    assert [m[-1]["content"] for m in table.column("messages").to_pylist()] == [
        "Q: What is 2+2?",
        "Q: Red or blue?",
    ]
    assert pq.read_metadata(csv_out).metadata[b"batcher.input"] == b"-"
    assert from_rows.returncode == 0, from_rows.stderr
    assert pq.read_table(rows_out).column("input").to_pylist() == [
        {"q": "a", "gold": None},
        {"q": "b", "gold": "B"},
    ]
    assert refused.returncode == 2
    assert "job.input_format: only for standard input" in refused.stderr
    assert not list(tmp_path.glob("x.parquet*"))


def test_estimate_reads_a_table_on_standard_input_as_run_does() -> None:
    """It said "a table on standard input needs the local engine: save it to a file"."""
    table = "id,question,gold\nq1,What is 2+2?,4\nq2,Red or blue?,red\n"
    common = ["estimate", "-i", "-", "--input-format", "csv", "-m", "gpt-4o-mini", "--json"]
    proc = run_batcher(*common, "--template-user", "Q: {question}", stdin=table)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["requests"] == 2
    wrong = run_batcher(*common, "--template-user", "Q: {nope}", stdin=table)
    assert wrong.returncode == 2 and "template.user: no column 'nope'" in wrong.stderr


def test_the_shipped_dataset_job_answers_every_question(tmp_path: Path) -> None:
    import dataclasses

    from batcher.job_file import load_job
    from batcher.runner.run import run_job
    from batcher.sim import sim_server
    from tests.helpers import ROOT

    job = load_job(ROOT / "jobs" / "dataset.toml")
    job = dataclasses.replace(job, output=tmp_path / "dataset.parquet", progress=False)
    report = run_job(job, sim=sim_server)
    assert report.exit_code == 0, report.summary
    rows = pq.read_table(report.output).to_pylist()
    assert sorted(r["custom_id"] for r in rows) == [f"q{i:02d}" for i in range(1, 21)]
    q11 = next(r for r in rows if r["custom_id"] == "q11")
    sent = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Answer with the answer alone."},
            {"role": "user", "content": 'Question: Spell the word "necessary" backwards.'},
        ],
        "max_tokens": 32,
        "temperature": 0,
    }
    assert q11["content"] == expected_content(sent)
