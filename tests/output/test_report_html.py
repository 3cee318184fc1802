"""``batcher report --html``: the dashboard's sections and figures for a small known output,
the latency histogram clipped at p99, the variant chart of a sweep, nothing fetched; and
``batcher report`` on a job still running (its journal)."""

from __future__ import annotations

import json
import os
import re
from array import array
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from batcher.output.journal import Journal, journal_path
from batcher.output.provenance import PREFIX, run_record
from batcher.output.report import build_report
from batcher.output.report_charts import bin_width, latency_histogram
from batcher.output.report_html import render_html
from batcher.output.report_text import format_report
from batcher.output.writers import open_writer
from batcher.records import Result, Usage
from tests.helpers import run_batcher

T0 = 1_796_600_000.0  # 2026-12-06 23:33:20 UTC


def answer(i: int, *, latency: float = 0.1, cost: float | None = 0.001, **kw: object) -> Result:
    """An ok answer finishing ``i`` seconds after T0."""
    fields: dict[str, object] = {
        "custom_id": f"r{i}", "line": i, "status": "ok", "model": "m-a", "attempts": 1,
        "latency_s": latency, "started_at": T0 + i - latency, "finished_at": T0 + i,
        "status_code": 200, "usage": Usage(prompt_tokens=10, completion_tokens=5),
        "cost_usd": cost, "body": {"choices": [{"message": {"content": f"answer {i}"}}]},
    }  # fmt: skip
    fields.update(kw)
    return Result(**fields)  # type: ignore[arg-type]


def failure(i: int, code: str, message: str) -> Result:
    return Result(
        custom_id=f"e{i}", line=1000 + i, status="error", model="m-a", attempts=3,
        latency_s=0.05, started_at=T0 + i, finished_at=T0 + i + 0.05, status_code=503,
        error_code=code, error_message=message,
    )  # fmt: skip


def metadata(variants: list[str] | None = None) -> dict[str, str]:
    """Provenance as a finished run writes it: 3 429s, exit code 1."""
    job = {"name": "nightly", "variants": [{"name": v} for v in variants or []]}
    return {
        PREFIX + "job": json.dumps(job),
        PREFIX + "input": "/data/prompts-" + "very-long-name-" * 12 + ".jsonl",
        PREFIX + "version": "9.9",
        **run_record(
            state="finished", exit_code=1, started_at=T0 - 1, ended_at=T0 + 120,
            rate_limited_at={int(T0) + 5: 2, int(T0) + 6: 1},
        ),
    }  # fmt: skip


def write(path: Path, results: list[Result], meta: dict[str, str] | None = None) -> Path:
    with open_writer(path, metadata=meta) as writer:
        for r in results:
            writer.write(r)
    return path


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    """100 ok answers (99 at 0.1 s, one at 1.75 s), 3 http_503 (one message), 2 refusals."""
    results = [answer(i) for i in range(99)] + [answer(99, latency=1.75)]
    results += [failure(i, "http_503", "server busy") for i in range(3)]
    results += [failure(3, "invalid_request", "bad field a"), failure(4, "invalid_request", "b")]
    return write(tmp_path / "o.parquet", results, metadata())


def section(page: str, ident: str) -> str:
    """The HTML of the element with id ``ident`` (up to the next element of that tag closing)."""
    match = re.search(rf"<(\w+)[^>]*\bid='{re.escape(ident)}'", page)
    assert match, f"no element with id {ident!r}"
    end = page.index(f"</{match.group(1)}>", match.end())
    return page[match.start() : end]


def cells(table: str) -> list[list[str]]:
    """The rows of the body of an HTML table, each as its cells' HTML."""
    body = table[table.index("<tbody>") :]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def tile(page: str, label: str) -> str:
    match = re.search(rf"<b>([^<]*)</b><span>{re.escape(label)}</span>", page)
    assert match, f"no tile {label!r}"
    return match.group(1)


def page_of(path: Path) -> str:
    report, series = build_report(path)
    return render_html(report, series)


def test_header_tiles_errors_and_costs_of_a_known_output(plain: Path) -> None:
    page = page_of(plain)
    meta = section(page, "meta")
    for label, value in [
        ("state", "finished"), ("exit code", "1"), ("started (UTC)", "2026-12-06 23:33:19"),
        ("ended (UTC)", "2026-12-06 23:34:59"),  # the answers' span: the last one's end
        ("last run (UTC)", "2026-12-06 23:33:19 to 2026-12-06 23:35:20"),
        ("output", str(plain)), ("models", "m-a"),
    ]:  # fmt: skip
        assert f"<dt>{label}</dt><dd>{value}</dd>" in meta
    assert "very-long-name-" in meta and "<h1>nightly" in page
    assert tile(page, "requests") == "105"
    assert tile(page, "ok") == "100 (95.2%)"
    assert tile(page, "errors") == "5" and tile(page, "429s") == "3"
    assert tile(page, "cost") == "$0.1000" and tile(page, "tokens") == "1,500"
    assert tile(page, "latency p50") == "100 ms" and tile(page, "latency p99") == "100 ms"
    # classes by count, each with its distinct messages
    assert cells(section(page, "errors")) == [
        ["http_503", "3", "server busy"],
        ["invalid_request", "2", "bad field a<br>b"],
    ]
    assert cells(section(page, "cost-by-model")) == [["m-a", "105", "1,000", "500", "$0.1000"]]
    for ident in ("tiles", "charts", "chart-over-time", "chart-latency", "samples", "provenance"):
        section(page, ident)


def test_latency_histogram_stops_at_p99_and_counts_the_rest(plain: Path) -> None:
    report, series = build_report(plain)
    histogram = latency_histogram(series["latency_s"], report.latency_p99_s)
    assert histogram is not None
    # 100 latencies: p99 (nearest rank 99) is 0.1 s; the one 1.75 s answer is counted, not drawn
    assert (histogram.p99, histogram.outliers, histogram.slowest) == (0.1, 1, 1.75)
    assert max(histogram.shown) == 0.1 and len(histogram.shown) == 99
    figure = section(render_html(report, series), "chart-latency")
    assert "1 slower not drawn (slowest 1.75 s)" in figure
    assert latency_histogram(array("d"), None) is None


def test_charts_over_time_are_on_a_utc_clock(plain: Path) -> None:
    page = page_of(plain)
    figure = section(page, "chart-over-time")
    assert "time (UTC)" in figure and "seconds since start" not in page
    assert "2026-Dec-06" in figure  # the clock's date, not an offset from the start
    assert "429s not recorded" not in figure
    assert (bin_width(30), bin_width(600), bin_width(8 * 3600)) == (1, 10, 600)


def test_an_output_without_run_record_says_what_it_lacks(tmp_path: Path) -> None:
    path = write(tmp_path / "o.jsonl", [answer(i) for i in range(10)])
    report, series = build_report(path)
    assert report.state is None and report.rate_limited is None
    assert report.started_at == "2026-12-06T23:33:19+00:00"  # the first answer's start
    page = render_html(report, series)
    assert "429s not recorded in this output" in section(page, "chart-over-time")
    assert tile(page, "429s") == "-" and "state not recorded" in section(page, "state")


def test_variant_chart_for_a_sweep_and_none_without(tmp_path: Path, plain: Path) -> None:
    results = [
        answer(i, variant=v, latency=0.1 * (k + 1), cost=0.001 * (k + 1))
        for i in range(20)
        for k, v in enumerate(["small", "big"])
    ]
    sweep = write(tmp_path / "sweep.parquet", results, metadata(["small", "big"]))
    page = page_of(sweep)
    figure = section(page, "chart-variants")
    assert "ok answers (%)" in figure and "tokens per ok answer" in figure
    assert "cost (USD)" in figure and "latency of ok answers" in figure
    assert cells(section(page, "variants")) == [  # in the job's order
        ["small", "m-a", "20", "20", "0.0%", "100 ms / 100 ms", "200 + 100", "$0.0200"],
        ["big", "m-a", "20", "20", "0.0%", "200 ms / 200 ms", "200 + 100", "$0.0400"],
    ]
    plain_page = page_of(plain)
    assert "chart-variants" not in plain_page and "id='variants'" not in plain_page


def test_cost_over_time_gets_a_chart_only_when_it_departs_from_the_answers(
    tmp_path: Path, plain: Path
) -> None:
    page = page_of(plain)  # every answer costs the same: the cost line is the answers' line
    assert "chart-cost-over-time" not in page and "id='cost-note'" in page
    # the first half free, the second half paying: cost and answers tell different things
    results = [answer(i, cost=0.0 if i < 50 else 0.01) for i in range(100)]
    page = page_of(write(tmp_path / "late.parquet", results, metadata()))
    assert "Cost over time" in section(page, "chart-cost-over-time")
    assert "cost-note" not in page


def test_the_page_fetches_nothing(plain: Path) -> None:
    page = page_of(plain)
    assert not re.search(r"""\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "url(http" not in page and "@font-face" not in page


def test_samples_show_the_prompt_from_messages_else_say_none_is_kept(
    tmp_path: Path, plain: Path
) -> None:
    samples = section(page_of(plain), "samples")
    assert "The output keeps no prompts" in samples and "answer 0" in samples
    assert "prompt (last user message)" not in samples
    output = tmp_path / "live.parquet"
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is <b>2+2</b>?"},
    ]
    with Journal(journal_path(output)) as journal:
        journal.append(answer(0, messages=messages), "h")
    page = page_of(output)
    samples = section(page, "samples")
    assert "what is &lt;b&gt;2+2&lt;/b&gt;?" in samples and "be brief" not in samples
    assert "prompt (last user message)" in samples


def test_report_of_a_running_job_reads_its_journal(tmp_path: Path) -> None:
    output = tmp_path / "o.parquet"
    with Journal(journal_path(output)) as journal:
        journal.append(failure(0, "http_503", "busy"), "h0")
        journal.append(answer(1), "h1")
        journal.append(answer(0, custom_id="e0", line=1000), "h0")  # e0 again: now ok
        journal.sync()
        with journal_path(output).open("ab") as f:
            f.write(b'{"custom_id": "half')  # a record still being written
        report, series = build_report(output)
        assert report.source == "journal"
        assert report.state == f"running (pid {os.getpid()})"
        assert (report.requests, report.ok, report.error) == (2, 2, 0)
        assert len(series["finished_at"]) == 2
        assert "not written yet" in format_report(report)
        page = render_html(report, series)
        assert "running (pid" in section(page, "state")
    report, _ = build_report(output)
    assert report.state is not None and report.state.startswith("not finished")
    # a resumed run: the output of the earlier one is there, the journal says more
    write(output, [answer(1)])
    with Journal(journal_path(output)) as journal:
        journal.append(answer(2), "h2")
        assert build_report(output)[0].requests == 3
    assert build_report(output)[0].requests == 1  # the run over: the output is the report


@pytest.mark.slow
def test_cli_report_on_a_running_job_and_html(tmp_path: Path) -> None:
    output = tmp_path / "o.parquet"
    page = tmp_path / "r.html"
    with Journal(journal_path(output)) as journal:
        for i in range(3):
            journal.append(answer(i), f"h{i}")
        journal.sync()
        proc = run_batcher("report", str(output), "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    assert "not written yet" in proc.stdout and "3: 3 ok, 0 error" in proc.stdout
    assert "running (pid" in page.read_text()
    missing = run_batcher("report", str(tmp_path / "none.parquet"))
    assert missing.returncode == 2 and "no such output" in missing.stderr


def _chromium() -> str | None:
    from tests.chromium import chromium_path

    return chromium_path()


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
@pytest.mark.parametrize("width", [1400, 1280, 1024, 700])
def test_chromium_renders_a_sweep_offline_and_nothing_is_cut_off(
    tmp_path: Path, width: int
) -> None:
    from tests.chromium import render

    results = [
        answer(i, variant=v, latency=0.05 * (k + 1) + 0.001 * i, cost=0.001 * (k + 1))
        for i in range(60)
        for k, v in enumerate(["small", "big", "huge"])
    ] + [failure(i, "http_503", "busy " + "x" * 300) for i in range(4)]
    sweep = write(tmp_path / "sweep.parquet", results, metadata(["small", "big", "huge"]))
    page = tmp_path / "report.html"
    page.write_text(page_of(sweep), encoding="utf-8")
    seen = render(page, width=width)
    assert seen.console_errors == []
    assert seen.requests == [page.resolve().as_uri()]  # the page itself, nothing else
    assert seen.overflowing == []  # no chart, table or long path wider than its box
    assert seen.title == "batcher report: nightly"
    assert seen.png.startswith(b"\x89PNG")


def test_samples_of_rows_without_line_numbers_stay_few(tmp_path: Path) -> None:
    path = tmp_path / "foreign.jsonl"  # another tool's batch output: no line numbers
    lines = [
        {"custom_id": f"x{i}", "response": {"status_code": 200, "body": {
            "choices": [{"message": {"content": f"hi {i}"}}]}}}
        for i in range(50)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report, _ = build_report(path)
    assert report.requests == 50 and len(report.samples) == 12
    assert [s.answer for s in report.samples[:2]] == ["hi 0", "hi 1"]


@pytest.mark.slow
def test_report_on_a_job_running_in_another_process_then_on_its_output(tmp_path: Path) -> None:
    import subprocess
    import time

    from tests.helpers import batcher_cmd, write_input, write_job

    src = write_input(tmp_path / "in.jsonl", 30)
    output = tmp_path / "o.parquet"
    job = write_job(
        tmp_path / "job.toml",
        f"""
[job]
name = "slow"
input = "{src}"
output = "{output}"
progress = false
[endpoint]
base_url = "sim"
[limits]
concurrency = 2
[request]
model = "gpt-4o-mini"
[sim]
latency_ms = 150
""",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    run = subprocess.Popen(batcher_cmd("run", str(job)), stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        journal = journal_path(output)
        while not (journal.is_file() and journal.read_bytes().count(b"\n") > 4):
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.05)
        proc = run_batcher("report", str(output), "--json")
        assert proc.returncode == 0, proc.stderr
        during = json.loads(proc.stdout)
        assert during["source"] == "journal" and during["state"] == f"running (pid {run.pid})"
        assert 4 <= during["requests"] < 30 and during["exit_code"] is None
    finally:
        _, log = run.communicate(timeout=60)
    assert run.returncode == 0, log
    after = json.loads(run_batcher("report", str(output), "--json").stdout)
    assert (after["source"], after["state"], after["exit_code"]) == ("output", "finished", 0)
    assert "30 done: 30 ok, 0 error" in log and after["requests"] == after["ok"] == 30
