"""Structured outputs: answers checked against the request's JSON schema, invalid ones re-asked.

Unit tests of ``check_answer`` and ``reask_body``; end-to-end runs against the simulator, whose
JSON answers fit the schema except at ``schema_error_rate``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from batcher.engine.validation import (
    REASK_INSTRUCTION,
    Verdict,
    check_answer,
    expected_format,
    reask_body,
)
from batcher.errors import ConfigError
from batcher.job_file import job_from_dict
from batcher.output.writers import read_results
from batcher.runner.run import RunReport, run_job
from batcher.sim.config import SimConfig
from batcher.sim.serve import running_sim
from tests.helpers import run_batcher

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "population": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["coast", "capital", "river"]}},
    },
    "required": ["city", "population", "tags"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}


def answer(*contents: str | None, finish: str = "stop", refusal: str | None = None) -> Any:
    choices = [
        {"index": i, "finish_reason": finish,
         "message": {"role": "assistant", "content": c, "refusal": refusal}}
        for i, c in enumerate(contents)
    ]  # fmt: skip
    return {"choices": choices}


EXPECTED = expected_format({"response_format": FORMAT})


def test_expected_format_of_requests() -> None:
    assert ("json_schema", json.dumps(SCHEMA, sort_keys=True)) == EXPECTED
    assert expected_format({"response_format": {"type": "json_object"}}) == ("json_object", None)
    assert expected_format({"response_format": {"type": "text"}}) is None
    assert expected_format({}) is None


@pytest.mark.parametrize(
    ("contents", "valid", "needle"),
    [
        (['{"city": "Oslo", "population": 700000, "tags": ["capital"]}'], True, None),
        (['{"city": "Oslo", "population": 1, "tags": []}', '{"city": "Oslo"}'], False,
         "choice 1 does not match the schema: 'population' is a required property"),
        (['{"city": "Oslo", "population": -5, "tags": []}'], False, "at /population"),
        (['{"city": "Oslo", "population": 1, "tags": ["moon"]}'], False, "at /tags/0"),
        (['{"city": "Oslo", "population": 1, "tags": [], "x": 1}'], False, "Additional"),
        (['{"city": "Os'], False, "choice 0 is not JSON"),
        ([None], False, "choice 0 has no text content"),
    ],
)  # fmt: skip
def test_check_answer(contents: list[str | None], valid: bool, needle: str | None) -> None:
    assert EXPECTED is not None
    verdict = check_answer(answer(*contents), EXPECTED)
    assert verdict.valid is valid
    if needle is None:
        assert verdict.error is None
    else:
        assert verdict.error is not None and needle in verdict.error and verdict.reask


def test_cut_off_json_says_so_and_refusals_are_not_reasked() -> None:
    assert EXPECTED is not None
    cut = check_answer(answer('{"city": "Os', finish="length"), EXPECTED)
    assert cut.error is not None and "cut off" in cut.error and not cut.reask
    refused = check_answer(answer(None, refusal="I can't help with that."), EXPECTED)
    assert not refused.valid and not refused.reask and "refused" in (refused.error or "")


def test_json_object_and_a_broken_schema() -> None:
    obj = ("json_object", None)
    assert check_answer(answer('{"a": 1}'), obj).valid
    assert not check_answer(answer("[1]"), obj).valid
    bad_schema = expected_format(
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}}
    )
    assert bad_schema is not None
    verdict = check_answer(answer("{}"), bad_schema)
    assert (
        not verdict.valid
        and not verdict.reask
        and "not a valid JSON schema" in (verdict.error or "")
    )


def test_what_is_not_reasked_and_what_is_not_checked() -> None:
    assert EXPECTED is not None
    unresolvable = expected_format(
        {"response_format": {"type": "json_schema",
                             "json_schema": {"schema": {"$ref": "#/$defs/Missing"}}}}
    )  # fmt: skip
    assert unresolvable is not None
    verdict = check_answer(answer("{}"), unresolvable)
    assert (
        verdict.valid is False and not verdict.reask and "cannot be used" in (verdict.error or "")
    )
    filtered = check_answer(answer("", finish="content_filter"), EXPECTED)
    assert filtered.valid is False and not filtered.reask
    tool = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c", "type": "function"}],
                },
            }
        ]
    }
    assert check_answer(tool, EXPECTED).valid is None  # nothing to check


def test_reask_quotes_the_choice_that_failed() -> None:
    assert EXPECTED is not None
    good = '{"city": "Oslo", "population": 1, "tags": []}'
    verdict = check_answer(answer(good, '{"city": 2}'), EXPECTED)
    assert verdict.choice == 1
    again = reask_body(
        {"messages": [{"role": "user", "content": "?"}]}, answer(good, '{"city": 2}'), verdict
    )
    assert again["messages"][1]["content"] == '{"city": 2}'
    assert "choice 1" in again["messages"][2]["content"]


def test_reask_body_quotes_the_reply_and_the_problem() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Oslo?"}],
        "response_format": FORMAT,
    }
    verdict = Verdict(False, "at /city: 1 is not of type 'string'")
    again = reask_body(body, answer('{"city": 1}'), verdict)
    assert again["messages"][:1] == body["messages"] and again["response_format"] == FORMAT
    assert again["messages"][1] == {"role": "assistant", "content": '{"city": 1}'}
    assert again["messages"][2]["role"] == "user"
    assert "at /city: 1 is not of type 'string'" in again["messages"][2]["content"]
    assert again["messages"][2]["content"].endswith(REASK_INSTRUCTION)
    assert body["messages"] == [{"role": "user", "content": "Oslo?"}]  # not modified


def run_structured(
    tmp_path: Path,
    config: SimConfig,
    n: int,
    *,
    response_format: dict[str, Any] = FORMAT,
    limits: dict[str, Any] | None = None,
    **validate: Any,
) -> RunReport:
    src = tmp_path / "in.jsonl"
    with src.open("w") as f:
        for i in range(n):
            f.write(
                json.dumps({"custom_id": f"c{i}", "prompt": f"Describe city {i} as JSON"}) + "\n"
            )
    with running_sim(config) as sim:
        job = job_from_dict(
            {
                "job": {
                    "input": str(src),
                    "output": str(tmp_path / "o.parquet"),
                    "progress": False,
                },
                "endpoint": {"base_url": sim.base_url},
                "request": {
                    "model": "gpt-4o-mini",
                    "response_format": response_format,
                    "max_tokens": 100,
                },
                "limits": {"concurrency": 8, **(limits or {})},
                "validate": validate,
            }
        )
        report = run_job(job, stream=io.StringIO())
    return report


def test_every_answer_is_checked_and_invalid_ones_reasked(tmp_path: Path) -> None:
    report = run_structured(
        tmp_path, SimConfig(schema_error_rate=0.3, seed=4), 40, json_schema=True, max_reasks=3
    )
    rows = list(read_results(report.output))
    assert report.exit_code == 0 and len(rows) == 40
    validator = Draft202012Validator(SCHEMA)
    for row in rows:
        assert row["schema_valid"] is validator.is_valid(json.loads(row["content"])), row
        assert (row["schema_error"] is None) is row["schema_valid"]
    reasked = [r for r in rows if r["attempts"] > 1]
    assert reasked and report.stats.reasks == sum(r["attempts"] - 1 for r in rows)
    for row in reasked:  # the record adds up every ask
        body = json.loads(row["response"])
        assert row["completion_tokens"] > body["usage"]["completion_tokens"]
        assert row["prompt_tokens"] > body["usage"]["prompt_tokens"]
    assert report.stats.schema_valid + report.stats.schema_invalid == 40
    assert report.stats.retries == 0
    assert f"{report.stats.schema_valid} valid" in report.summary


def test_without_reasks_invalid_answers_are_kept_and_marked(tmp_path: Path) -> None:
    report = run_structured(
        tmp_path, SimConfig(schema_error_rate=1.0), 5, json_schema=True, max_reasks=0
    )
    rows = list(read_results(report.output))
    assert {(r["status"], r["schema_valid"], r["attempts"]) for r in rows} == {("ok", False, 1)}
    assert all("'city' is a required property" in r["schema_error"] for r in rows)


def test_validation_is_off_unless_asked(tmp_path: Path) -> None:
    report = run_structured(tmp_path, SimConfig(schema_error_rate=1.0), 3)
    rows = list(read_results(report.output))
    assert {(r["schema_valid"], r["schema_error"], r["attempts"]) for r in rows} == {
        (None, None, 1)
    }


def test_bad_validate_table_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"validate\.max_reasks"):
        job_from_dict({"validate": {"max_reasks": -1}})
    with pytest.raises(ConfigError, match=r"validate\.strict"):
        job_from_dict({"validate": {"strict": True}})
    with pytest.raises(ConfigError, match=r"validate\.json_schema"):
        job_from_dict({"validate": {"json_schema": "yes"}})


@pytest.mark.slow
def test_structured_example_job_streams_validates_and_reports(tmp_path: Path) -> None:
    """jobs/structured.toml from the command line: streamed, checked, re-asked, reported."""
    out = tmp_path / "s.parquet"
    proc = run_batcher("run", "jobs/structured.toml", "--output", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows = list(read_results(out))
    valid = sum(bool(r["schema_valid"]) for r in rows)
    # 20 % broken, two re-asks: about 1 in 125 stays invalid, after all three asks
    assert len(rows) == 200 and valid >= 190
    assert all(r["schema_valid"] or r["attempts"] == 3 for r in rows)
    assert all(r["ttft_s"] is not None and r["ttft_s"] <= r["latency_s"] for r in rows)
    assert any(r["attempts"] > 1 for r in rows)  # the simulator broke some: they were re-asked
    assert f"schema    {valid} valid, {200 - valid} invalid" in proc.stderr
    report = run_batcher("report", str(out))
    assert "1st token p50" in report.stdout
    assert f"{valid} valid, {200 - valid} invalid" in report.stdout
    # no re-asks: the broken answers stay, marked invalid
    off = run_batcher("run", "jobs/structured.toml", "--output", str(tmp_path / "n.parquet"),
                      "--no-progress", "--max-reasks", "0")  # fmt: skip
    assert off.returncode == 0, off.stderr
    invalid = [r for r in read_results(tmp_path / "n.parquet") if not r["schema_valid"]]
    assert invalid and all(r["attempts"] == 1 and r["schema_error"] for r in invalid)


@pytest.mark.slow
def test_negative_max_reasks_flag_is_refused_before_sending() -> None:
    proc = run_batcher("run", "jobs/structured.toml", "--max-reasks", "-1")
    assert proc.returncode == 2 and "--max-reasks: must be >= 0" in proc.stderr


def test_unusable_schema_does_not_stop_the_run(tmp_path: Path) -> None:
    broken = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/No"}}}
    report = run_structured(
        tmp_path, SimConfig(), 3, response_format=broken, json_schema=True, max_reasks=2
    )
    rows = list(read_results(report.output))
    assert report.exit_code == 0 and len(rows) == 3
    assert {(r["schema_valid"], r["attempts"]) for r in rows} == {(False, 1)}
    assert all("cannot be used" in r["schema_error"] for r in rows)


def test_budget_spent_during_reasks_says_so_and_counts_every_ask(tmp_path: Path) -> None:
    """The cap stops the re-asks: the record says they were not sent; cost adds up each ask."""
    report = run_structured(
        tmp_path, SimConfig(schema_error_rate=1.0), 3, limits={"concurrency": 1,
        "max_cost_usd": 0.00012}, json_schema=True, max_reasks=5,
    )  # fmt: skip
    assert report.exit_code == 3 and report.stats.stopped_early
    rows = list(read_results(report.output))
    assert rows and all(r["schema_valid"] is False for r in rows)
    assert any("not asked again: the run stopped" in r["schema_error"] for r in rows)
    assert sum(r["cost_usd"] for r in rows) <= 0.00012
    assert report.stats.reasks == sum(r["attempts"] - 1 for r in rows)
