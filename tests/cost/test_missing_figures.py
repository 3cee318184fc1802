"""What the answers lacked is reported as unknown, not zero: usage, prices, choices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

import batcher
from batcher.api import RunResult
from batcher.output.report import build_report
from batcher.output.report_html import write_html
from batcher.output.report_text import format_report
from tests.helpers import run_batcher

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


class Server:
    """A MockTransport handler: ``choices`` choices per answer, usage on the first
    ``with_usage`` answers only (a server that ignores ``stream_options.include_usage``)."""

    def __init__(self, *, with_usage: int, choices: int = 1) -> None:
        self.with_usage = with_usage
        self.choices = choices
        self.answered = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.answered += 1
        choices = [
            {"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": "x"}}
            for i in range(self.choices)
        ]
        body: dict[str, Any] = {"model": json.loads(request.content)["model"], "choices": choices}
        if self.answered <= self.with_usage:
            body["usage"] = USAGE
        return httpx.Response(200, json=body)


def run(tmp_path: Path, server: Server, *, lines: int = 6, **request: Any) -> RunResult:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(lines)))
    return batcher.run(
        {
            "job": {"input": str(src), "output": str(tmp_path / "o.jsonl")},
            "endpoint": {"base_url": "http://mock.test/v1"},
            "request": {"model": "gpt-4o-mini", **request},
            "limits": {"concurrency": 1},  # the first answers are those with usage
        },
        transport=httpx.MockTransport(server),
    )


def test_answers_without_usage_are_counted_and_warned_about_once(tmp_path: Path) -> None:
    result = run(tmp_path, Server(with_usage=2))
    stats = result.stats
    assert result.exit_code == 0 and stats.usage_missing == 4 and stats.unpriced == 4
    assert "  tokens    20 prompt + 10 completion = 30 (usage missing for 4 answers)" in (
        result.summary
    )
    assert "  cost      at least $" in result.summary
    assert "; 4 answers unpriced (no known price or no usage)" in result.summary
    assert result.log.count("the server sent no usage for 4 of 6 answers") == 1
    report, _ = build_report(result.output)
    group = report.groups["gpt-4o-mini"]["ok"]
    assert (report.usage_missing, report.unpriced, group.prompt_tokens) == (4, 4, 20)
    assert report.cost_usd is not None and report.cost_usd > 0
    text = format_report(report)
    assert "  tokens    20 prompt + 10 completion (usage missing for 4 answers)" in text
    assert "  cost      at least $" in text


@pytest.mark.slow
def test_no_usage_at_all_is_unknown_not_zero(tmp_path: Path) -> None:
    result = run(tmp_path, Server(with_usage=0), stream=False)
    assert result.stats.cost_usd is None and not result.stats.tokens_known
    assert "  tokens    unknown (the server sent no usage for any of the 6 answers)" in (
        result.summary
    )
    assert "  cost      unknown: none of the 6 answers has a price" in result.summary
    assert "0 prompt" not in result.summary and "$0" not in result.summary
    report, series = build_report(result.output)
    text = format_report(report)
    assert "  tokens    unknown (no usage in any of the 6 ok answers)" in text
    assert "  cost      unknown: none of the 6 ok answers has a cost" in text
    assert "tokens unknown (no usage), cost unknown" in text
    assert "$0" not in text
    proc = run_batcher("report", str(result.output), "--json")
    figures = json.loads(proc.stdout)
    assert (figures["cost_usd"], figures["usage_missing"], figures["unpriced"]) == (None, 6, 6)
    group = figures["groups"]["gpt-4o-mini"]["ok"]
    assert (group["prompt_tokens"], group["completion_tokens"], group["cost_usd"]) == (
        None,
        None,
        None,
    )
    page = tmp_path / "r.html"
    write_html(report, series, page)
    html = page.read_text()
    assert "<b>unknown</b><span>cost</span>" in html and "$0" not in html


def test_unpriced_model_cost_is_unknown_in_the_summary_and_report(tmp_path: Path) -> None:
    result = run(tmp_path, Server(with_usage=6), model="house-model-7b")
    assert result.stats.cost_usd is None
    assert "  tokens    60 prompt + 30 completion = 90" in result.summary
    assert "  cost      unknown: none of the 6 answers has a price" in result.summary
    assert "the server sent no usage" not in result.log
    report, _ = build_report(result.output)
    assert report.cost_usd is None and report.unpriced == 6 and report.usage_missing == 0


@pytest.mark.parametrize(("choices", "few"), [(1, 6), (2, 0)])
def test_fewer_choices_than_n_asked_are_counted(tmp_path: Path, choices: int, few: int) -> None:
    result = run(tmp_path, Server(with_usage=6, choices=choices), n=2)
    assert result.stats.few_choices == few
    report, _ = build_report(result.output)
    assert report.few_choices == few
    warning = "answers had fewer choices than their n asked for"
    if few:
        assert f"  choices   {few} answers had fewer choices than their n asked" in result.summary
        assert result.log.count(warning) == 1
        assert f"  choices   {few} answers had fewer choices" in format_report(report)
    else:
        assert "  choices  " not in result.summary and warning not in result.log


def test_a_cost_below_a_hundredth_of_a_cent_is_shown_not_rounded_to_zero(tmp_path: Path) -> None:
    # gpt-4o-mini: 6 answers of 10 prompt and 5 completion tokens cost $0.000027 in all
    result = run(tmp_path, Server(with_usage=6))
    assert result.stats.cost_usd == pytest.approx(0.000027)
    assert "  cost      $0.000027 (gpt-4o-mini $0.000027)" in result.summary
    report, _ = build_report(result.output)
    assert "$0.000027" in format_report(report) and "$0.0000 " not in format_report(report)
