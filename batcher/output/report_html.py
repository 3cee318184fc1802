"""``batcher report OUTPUT --html FILE``: a dashboard page read in two minutes.

A header (job, state, start and end in UTC, exit code, input, output, models) and the key
figures; then charts in a grid (answers, errors and 429s over UTC time; latency up to p99;
cost over time only when it does not follow the answers); a sweep's variants side by side
(chart and table); then error classes with sample messages, sample prompts and answers,
cost by model and how the output was made. Self-contained: inline CSS and SVG
(``report_charts``), no script, no font or image fetched, so it opens offline.
"""

from __future__ import annotations

import html
import json
from array import array
from collections.abc import Sequence
from pathlib import Path

from batcher.cost.money import usd
from batcher.output.report import Report
from batcher.output.report_charts import COST_APART, Charts, cost_apart, latency_histogram
from batcher.output.report_text import format_report, left_out_note

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;
  margin:0 auto;padding:1.2rem 1.5rem;max-width:96rem;background:#fafafa}
h1{font-size:1.5rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:1.6rem 0 .6rem}
.state{display:inline-block;padding:.1rem .6rem;border-radius:1rem;font-size:.85rem;
  font-weight:600;background:#e3ecf7;color:#1f4e89;vertical-align:middle}
.state.bad{background:#f8e1e1;color:#8a1f1f}.state.warn{background:#fbeccb;color:#6e4a00}.state.good{background:#e1f3e6;color:#1d6b35}
dl.meta{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:.15rem 1rem;
  margin:.6rem 0}
dl.meta dt{color:#666}dl.meta dd{margin:0;overflow-wrap:anywhere}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(9.5rem,1fr));gap:.6rem}
.tile{background:#fff;border:1px solid #e3e3e3;border-radius:.4rem;padding:.5rem .7rem}
.tile b{display:block;font-size:1.25rem}.tile span{color:#666;font-size:.85rem}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,34rem),1fr));
  gap:1rem}
.pair{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
.pair>figure{flex:1 1 28rem}.pair>.wide{flex:1 1 42rem}
figure{margin:0;background:#fff;border:1px solid #e3e3e3;border-radius:.4rem;padding:.5rem;
  min-width:0}
figure svg{width:100%;height:auto;display:block}
table{border-collapse:collapse;width:100%;background:#fff;table-layout:auto}
th,td{border:1px solid #e3e3e3;padding:.3rem .5rem;text-align:left;vertical-align:top;
  overflow-wrap:break-word}
th{background:#f0f0f0}td.n{text-align:right;white-space:nowrap}
.k{white-space:nowrap}td.t{overflow-wrap:anywhere}
.note{color:#666}
pre{background:#fff;border:1px solid #e3e3e3;padding:.7rem;white-space:pre-wrap;
  overflow-wrap:anywhere;font-size:12px}
"""


def write_html(report: Report, series: dict[str, array[float]], target: Path) -> None:
    """Write the dashboard page of ``report`` (its ``series`` for the charts) to ``target``."""
    page = render_html(report, series)
    try:
        target.write_text(page, encoding="utf-8")
    except OSError as exc:
        from batcher.errors import ConfigError

        raise ConfigError("--html", f"cannot write {target}: {exc.strerror or exc}") from None


def render_html(report: Report, series: dict[str, array[float]]) -> str:
    """The dashboard page as one self-contained HTML string."""
    charts = Charts()
    figures = [_chart(charts.over_time(report, series), "over-time")]
    histogram = latency_histogram(series["latency_s"], report.latency_p99_s)
    if histogram is not None:
        figures.append(_chart(charts.latency(histogram, report), "latency"))
    apart = cost_apart(series["finished_at"], series["cost_usd"])
    cost_note = ""
    if apart is not None and apart > COST_APART:
        figures.append(_chart(charts.cost_over_time(series), "cost-over-time"))
    elif apart is not None:
        cost_note = (
            "<p class='note' id='cost-note'>Cost came in step with the answers (cumulative "
            f"cost within {apart:.0%} of cumulative answers throughout): no chart of its own.</p>"
        )
    title = html.escape(report.job_name or Path(report.path).name)
    left_out = ""
    if report.left_out:
        left_out = f"<p class='note' id='left-out'>{html.escape(left_out_note(report))}.</p>"
    body = [
        _header(report),
        left_out,
        "<h2>Over time and latency</h2>",
        f"<div class='grid' id='charts'>{''.join(f for f in figures if f)}</div>",
        cost_note,
        _variants(report, charts),
        "<div class='grid'>",
        f"<section id='errors'><h2>Errors</h2>{_errors(report)}</section>",
        f"<section id='cost-by-model'><h2>Cost by model</h2>{_cost_by_model(report)}</section>",
        "</div>",
        f"<section id='samples'><h2>Sample prompts and answers</h2>{_samples(report)}</section>",
        _made(report),
    ]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>batcher report: {title}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>"
    )


def _chart(svg: str | None, name: str) -> str:
    return "" if svg is None else f"<figure id='chart-{name}'>{svg}</figure>"


def _header(report: Report) -> str:
    """The job's name and state, where and when it ran, and the key figures as tiles."""
    state = report.state or "state not recorded"
    tones = {0: "good", 1: "warn"}  # 1: finished with failures; 2, 3: stopped
    tone = "" if report.exit_code is None else tones.get(report.exit_code, "bad")
    made = report.provenance
    models = ", ".join(sorted(report.groups)) or "-"
    journal = report.source == "journal"
    rows = [
        ("state", state),
        ("exit code", "-" if report.exit_code is None else str(report.exit_code)),
        ("started (UTC)", _utc(report.started_at)),
        ("ended (UTC)", _utc(report.ended_at)),
        ("last run (UTC)", _last_run(report)),
        ("input", made.get("input") or "-"),
        ("output", report.path + _from_journal(report) if journal else report.path),
        ("models", models),
    ]  # fmt: skip
    meta = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in rows)
    name = html.escape(report.job_name or Path(report.path).name)
    return (
        f"<header><h1>{name} <span class='state {tone}' id='state'>{html.escape(state)}</span>"
        f"</h1><dl class='meta' id='meta'>{meta}</dl>{_tiles(report)}</header>"
    )


def _last_run(report: Report) -> str:
    """When the last run started and ended ("-" when the output does not say)."""
    if report.last_run_ended_at is None:
        return "-"
    return f"{_utc(report.last_run_started_at)} to {_utc(report.last_run_ended_at)}"


def _tiles(report: Report) -> str:
    """The figures a reader looks for first."""
    ok_rate = f"{report.ok / report.requests:.1%}" if report.requests else "-"
    tokens = sum(
        (g.prompt_tokens or 0) + (g.completion_tokens or 0)
        for statuses in report.groups.values()
        for g in statuses.values()
    )
    tiles = [
        ("requests", f"{report.requests:,}"),
        ("ok", f"{report.ok:,} ({ok_rate})"),
        ("errors", f"{report.error:,}"),
        ("429s", "-" if report.rate_limited is None else f"{report.rate_limited:,}"),
        ("cost", _usd(report.cost_usd, report.unpriced)),
        ("tokens", f"{tokens:,}"),
        ("latency p50", _s(report.latency_p50_s)),
        ("latency p90", _s(report.latency_p90_s)),
        ("latency p99", _s(report.latency_p99_s)),
        (f"requests/s over {_duration(report.wall_s)}", f"{report.requests_per_s:,.1f}"),
    ]  # fmt: skip
    cells = "".join(
        f"<div class='tile'><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>"
        for k, v in tiles
    )
    return f"<div class='tiles' id='tiles'>{cells}</div>"


def _variants(report: Report, charts: Charts) -> str:
    """A sweep's variants side by side: the chart, and the table beside it."""
    if not report.variants:
        return ""
    head = ("variant", "model", "requests", "ok", "error rate", "latency p50 / p90",
            "tokens prompt + completion", "cost")  # fmt: skip
    rows = [
        (name, ", ".join(v.models), f"{v.requests:,}", f"{v.ok:,}", f"{v.error_rate:.1%}",
         f"{_s(v.latency_p50_s)} / {_s(v.latency_p90_s)}",
         f"{v.prompt_tokens:,} + {v.completion_tokens:,}", _usd(v.cost_usd, v.unpriced))
        for name, v in report.variants.items()
    ]  # fmt: skip
    chart = _chart(charts.variants(report.variants), "variants")
    return (
        # the chart beside the table while the table has its width, else above it
        f"<section id='variants'><h2>Variants</h2><div class='pair'>{chart}"
        f"<div class='wide'>{_table(head, rows, 'wwnnnnnn')}</div></div></section>"
    )


def _errors(report: Report) -> str:
    if not report.error_classes:
        return "<p class='note'>No errors.</p>"
    rows = [
        (code, f"{n:,}", "\n".join(report.error_samples.get(code, [])))
        for code, n in report.error_classes.items()
    ]
    return _table(("class", "count", "sample messages"), rows, "wnt")


def _cost_by_model(report: Report) -> str:
    rows = []
    for model, statuses in sorted(report.groups.items()):
        costs = [g.cost_usd for g in statuses.values()]
        unpriced = sum(g.unpriced for g in statuses.values())
        known = [c for c in costs if c is not None]
        total = sum(known) if known else None
        requests = sum(g.requests for g in statuses.values())
        prompt = sum(g.prompt_tokens or 0 for g in statuses.values())
        completion = sum(g.completion_tokens or 0 for g in statuses.values())
        rows.append((model, f"{requests:,}", f"{prompt:,}", f"{completion:,}",
                     _usd(total, unpriced)))  # fmt: skip
    head = ("model", "requests", "prompt tokens", "completion tokens", "cost")
    return _table(head, rows, "wnnnn")


def _samples(report: Report) -> str:
    if not report.samples:
        return "<p class='note'>No answers yet.</p>"
    if all(s.prompt is None for s in report.samples):
        note = "<p class='note'>The output keeps no prompts (no messages column).</p>"
        rows = [(s.custom_id, s.variant or "-", s.status, s.answer) for s in report.samples]
        return note + _table(("id", "variant", "status", "answer"), rows, "kkkt")
    rows5 = [
        (s.custom_id, s.variant or "-", s.status, "-" if s.prompt is None else s.prompt, s.answer)
        for s in report.samples
    ]
    head = ("id", "variant", "status", "prompt (last user message)", "answer")
    return _table(head, rows5, "kkktt")


def _made(report: Report) -> str:
    """How the output was made (the job in full, folded) and the text report."""
    made = report.provenance
    parts = ["<section id='provenance'><h2>How this output was made</h2>"]
    if made:
        sha = made.get("input_sha256") or "-"
        parts.append(
            f"<p>batcher {html.escape(made.get('version', '?'))}, written "
            f"{html.escape(_utc(made.get('written_at')))}; input sha256 "
            f"<code>{html.escape(sha)}</code></p>"
        )
        try:
            job = json.dumps(json.loads(made.get("job") or "{}"), indent=2, sort_keys=True)
        except ValueError:
            job = made.get("job") or ""
        parts.append(f"<details><summary>the job</summary><pre>{html.escape(job)}</pre></details>")
    else:
        parts.append("<p class='note'>Not recorded (a JSONL output, or a journal).</p>")
    text = html.escape(format_report(report))
    parts.append(f"<details><summary>the text report</summary><pre>{text}</pre></details>")
    parts.append("</section>")
    return "".join(parts)


def _table(head: tuple[str, ...], rows: Sequence[Sequence[str]], kinds: str) -> str:
    """An HTML table; ``kinds`` has a letter per column: ``n`` a number (right-aligned),
    ``k`` a short key (never broken), ``w`` words (broken between them), ``t`` free text
    (broken anywhere, so a long message never widens the page). Newlines become breaks."""
    top = "".join(
        f"<th class='{kind}'>{html.escape(h)}</th>" for h, kind in zip(head, kinds, strict=True)
    )
    lines = []
    for row in rows:
        cells = "".join(
            f"<td class='{kind}'>{html.escape(value).replace(chr(10), '<br>')}</td>"
            for value, kind in zip(row, kinds, strict=True)
        )
        lines.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{top}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def _usd(total: float | None, unpriced: int) -> str:
    if total is None:
        return "unknown"
    return usd(total, grouped=True) + (f" (+{unpriced:,} unpriced)" if unpriced else "")


def _s(value: float | None) -> str:
    """Seconds, in ms below one."""
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:,.2f} s"


def _utc(iso: str | None) -> str:
    """An ISO-8601 time as ``YYYY-MM-DD HH:MM:SS`` (UTC); ``-`` when unknown."""
    if not iso:
        return "-"
    return iso.replace("T", " ").removesuffix("+00:00").removesuffix("Z")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.1f} s"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s"


def _from_journal(report: Report) -> str:
    """Why the page was made from the journal: no output yet, or the output gone."""
    if report.left_out:
        return " (gone: from its journal)"
    return " (not written yet: from its journal)"
