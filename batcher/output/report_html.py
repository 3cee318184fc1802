"""``batcher report OUTPUT --html FILE``: a self-contained page with charts.

The charts are drawn by matplotlib (an optional extra: ``pip install -e '.[report]'``) as
inline SVG, so no network is needed to view the page.
"""

from __future__ import annotations

import html
import io
import math
from array import array
from pathlib import Path
from typing import Any

from batcher.output.report import Report
from batcher.output.report_text import format_report


def write_html(report: Report, series: dict[str, array[float]], target: Path) -> None:
    """A self-contained HTML page: the figures and three charts as inline SVG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from batcher.errors import ConfigError

        raise ConfigError("--html", "charts need matplotlib: pip install -e '.[report]'") from None

    def svg(fig: Any) -> str:
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", bbox_inches="tight")
        plt.close(fig)
        text = buffer.getvalue()
        return text[text.index("<svg") :]

    charts = []
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.hist(list(series["latency_s"]), bins=40, color="#4c72b0")
    ax.set(title="Latency of ok answers", xlabel="seconds", ylabel="requests")
    charts.append(svg(fig))
    done = sorted(series["finished_s"])
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(done, range(1, len(done) + 1), color="#55a868")
    ax.set(title="Completions over time", xlabel="seconds since start", ylabel="done")
    charts.append(svg(fig))
    charts.append(svg(_cost_chart(plt, series)))
    body = "\n".join(f"<figure>{chart}</figure>" for chart in charts)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>batcher report: {html.escape(report.path)}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "pre{background:#f6f6f6;padding:1em}</style></head><body>"
        f"<h1>batcher report</h1><pre>{html.escape(format_report(report))}</pre>{body}"
        "</body></html>"
    )
    try:
        target.write_text(page, encoding="utf-8")
    except OSError as exc:
        from batcher.errors import ConfigError

        raise ConfigError("--html", f"cannot write {target}: {exc.strerror or exc}") from None


def _cost_chart(plt: Any, series: dict[str, array[float]]) -> Any:
    """Cumulative cost of the priced answers; answers with no cost (NaN) are left out and
    counted in the title, and with none priced the chart says the cost is unknown rather
    than draw a flat $0."""
    pairs = sorted(zip(series["finished_s"], series["cost_usd"], strict=True))
    priced = [(t, cost) for t, cost in pairs if not math.isnan(cost)]
    unknown = len(pairs) - len(priced)
    fig, ax = plt.subplots(figsize=(7, 3))
    title = "Cost over time"
    if priced:
        running, total = [], 0.0
        for _, cost in priced:
            total += cost
            running.append(total)
        ax.plot([t for t, _ in priced], running, color="#c44e52")
        if unknown:
            title += f" (at least: {unknown:,} answers without a cost left out)"
    elif unknown:
        title += " (unknown)"
        ax.text(0.5, 0.5, f"cost unknown: none of the {unknown:,} answers has a cost",
                ha="center", va="center", transform=ax.transAxes)  # fmt: skip
        ax.set_yticks([])
    ax.set(title=title, xlabel="seconds since start", ylabel="USD")
    return fig
