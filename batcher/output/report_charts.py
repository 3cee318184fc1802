"""The charts of ``batcher report --html``, drawn by matplotlib as inline SVG strings.

matplotlib is an optional extra (``pip install -e '.[report]'``). Text in the SVG stays text
(``svg.fonttype = none``): the page's own sans-serif font draws it, and no font is embedded
or fetched. Times are on a UTC clock axis; each chart says what it leaves out.
"""

from __future__ import annotations

import io
import math
from array import array
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from batcher.output.report import Report, VariantRow

#: Bin widths of the charts over time (seconds): the smallest that gives at most ``MAX_BINS``.
_WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
MAX_BINS = 60
#: Bins of the latency histogram, between the fastest answer and p99.
LATENCY_BINS = 40
#: How far (a fraction of the whole) cumulative cost may stray from cumulative answers before
#: cost over time gets a chart of its own: closer than this, it tells nothing the answers don't.
COST_APART = 0.1
_OK, _ERR, _429, _COST, _P90 = "#4c72b0", "#c44e52", "#dd8452", "#55a868", "#8172b3"


@dataclass(frozen=True)
class Histogram:
    """The latency histogram's figures: what is drawn up to p99, and what is left out."""

    shown: list[float]
    p99: float
    outliers: int  # answers slower than p99, counted, not drawn
    slowest: float


def latency_histogram(latencies: array[float], p99: float | None) -> Histogram | None:
    """Latencies clipped at ``p99``; ``None`` when there are none."""
    if not latencies or p99 is None:
        return None
    shown = [x for x in latencies if x <= p99]
    return Histogram(shown, p99, len(latencies) - len(shown), max(latencies))


def bin_width(span_s: float) -> int:
    """The bin width for a span of time: the smallest of ``_WIDTHS`` giving ``MAX_BINS`` or
    fewer bins."""
    for width in _WIDTHS:
        if span_s / width <= MAX_BINS:
            return width
    return _WIDTHS[-1]


def cost_apart(finished_at: array[float], costs: array[float]) -> float | None:
    """How far cumulative cost strays from cumulative answers over time: the largest gap
    between the two as fractions of their totals (0: cost came in step with answers).
    ``None`` when no answer has a cost."""
    pairs = sorted(zip(finished_at, costs, strict=True))
    total = sum(c for _, c in pairs if not math.isnan(c))
    if not pairs or total <= 0:
        return None
    done = spent = 0.0
    widest = 0.0
    for _, cost in pairs:
        done += 1
        spent += 0.0 if math.isnan(cost) else cost
        widest = max(widest, abs(spent / total - done / len(pairs)))
    return widest


class Charts:
    """matplotlib, imported once; each method returns one chart as an ``<svg>`` string."""

    def __init__(self) -> None:
        """Import matplotlib (``ConfigError`` naming the extra when it is missing)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.dates as mdates
            import matplotlib.pyplot as plt
        except ImportError:
            from batcher.errors import ConfigError

            raise ConfigError(
                "--html", "charts need matplotlib: pip install -e '.[report]'"
            ) from None
        self.plt: Any = plt
        self.mdates: Any = mdates
        self.style = {
            "svg.fonttype": "none",  # text as text, drawn in the page's font
            "svg.hashsalt": "batcher",  # the same page for the same report
            "font.family": "sans-serif",
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": 10,
            "axes.titleweight": "bold",
        }

    def svg(self, fig: Any) -> str:
        """A figure as an ``<svg>`` element, closed."""
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
        self.plt.close(fig)
        text = buffer.getvalue()
        return text[text.index("<svg") :]

    def _figure(self, *args: Any, **kwargs: Any) -> Any:
        with self.plt.rc_context(self.style):
            return self.plt.subplots(*args, **kwargs)

    def _time_axis(self, ax: Any) -> None:
        locator = self.mdates.AutoDateLocator(tz=UTC, maxticks=7)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(self.mdates.ConciseDateFormatter(locator, tz=UTC))
        ax.set_xlabel("time (UTC)")

    def over_time(self, report: Report, series: dict[str, array[float]]) -> str | None:
        """Answers (ok and errors, stacked) and 429s per bin over UTC clock time."""
        finished = series["finished_at"]
        if not finished:
            return None
        start, end = min(finished), max(finished)
        width = bin_width(end - start)
        first = math.floor(start / width) * width
        count = int((end - first) // width) + 1
        ok, err = [0] * count, [0] * count
        for t, good in zip(finished, series["ok"], strict=True):
            (ok if good else err)[min(count - 1, int((t - first) // width))] += 1
        per, unit = (60 / width, "min") if width >= 60 else (1 / width, "s")
        edges = [_dt(first + i * width) for i in range(count)]
        bar = width / 86400  # matplotlib's dates are in days
        with self.plt.rc_context(self.style):
            fig, (top, low) = self.plt.subplots(
                2, 1, figsize=(6.4, 3.8), sharex=True, height_ratios=[3, 1.3]
            )
            ok_rate = [n * per for n in ok]
            top.bar(edges, ok_rate, width=bar, align="edge", color=_OK, label="ok")
            top.bar(edges, [n * per for n in err], width=bar, align="edge", bottom=ok_rate,
                    color=_ERR, label="error")  # fmt: skip
            top.set(title=f"Answers per {unit} ({width} s bins)", ylabel=f"answers/{unit}")
            top.legend(loc="upper right", frameon=False, ncols=2)
            self._rate_limited(low, report, first, width, count, per, unit)
            self._time_axis(low)
            fig.align_ylabels()
            return self.svg(fig)

    def _rate_limited(
        self, ax: Any, report: Report, first: float, width: int, count: int, per: float, unit: str
    ) -> None:
        """The 429s the run met, in the answers' bins; said so when the output has no record."""
        ax.set_ylabel(f"429s/{unit}")
        if report.rate_limited_bins is None:
            ax.text(0.5, 0.5, "429s not recorded in this output", ha="center", va="center",
                    transform=ax.transAxes, color="#666")  # fmt: skip
            ax.set_yticks([])
            return
        counts = [0] * count
        for start, n in report.rate_limited_bins:
            i = int((start - first) // width)
            counts[min(count - 1, max(0, i))] += n
        edges = [_dt(first + i * width) for i in range(count)]
        ax.bar(edges, [n * per for n in counts], width=width / 86400, align="edge", color=_429)
        if not any(counts):
            ax.text(0.5, 0.5, "no 429s", ha="center", va="center", transform=ax.transAxes,
                    color="#666")  # fmt: skip
            ax.set_yticks([])

    def latency(self, histogram: Histogram, report: Report) -> str:
        """The latency histogram up to p99, with p50 and p90 marked and the outliers counted."""
        fig, ax = self._figure(figsize=(6.4, 3.2))
        with self.plt.rc_context(self.style):
            ax.hist(histogram.shown, bins=LATENCY_BINS, color=_OK)
            for value, name, color in (
                (report.latency_p50_s, "p50", "#222"),
                (report.latency_p90_s, "p90", _P90),
            ):
                if value is not None:
                    ax.axvline(value, color=color, linestyle="--", linewidth=1)
                    ax.annotate(
                        f"{name} {value:.3g} s", (value, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -10), textcoords="offset points", color=color,
                    )  # fmt: skip
            title = f"Latency of ok answers, up to p99 ({histogram.p99:.3g} s)"
            if histogram.outliers:
                title += (
                    f"\n{histogram.outliers:,} slower not drawn (slowest {histogram.slowest:.3g} s)"
                )
            ax.set(title=title, xlabel="seconds (last attempt)", ylabel="answers")
            return self.svg(fig)

    def cost_over_time(self, series: dict[str, array[float]]) -> str:
        """Cumulative cost of the priced answers over UTC clock time."""
        pairs = sorted(zip(series["finished_at"], series["cost_usd"], strict=True))
        times, running, total = [], [], 0.0
        for t, cost in pairs:
            if not math.isnan(cost):
                total += cost
                times.append(_dt(t))
                running.append(total)
        unknown = len(pairs) - len(times)
        fig, ax = self._figure(figsize=(6.4, 3.2))
        with self.plt.rc_context(self.style):
            ax.plot(times, running, color=_COST)
            title = "Cost over time (cumulative)"
            if unknown:
                title += f"\nat least: {unknown:,} answers without a cost left out"
            ax.set(title=title, ylabel="USD")
            self._time_axis(ax)
            return self.svg(fig)

    def variants(self, variants: dict[str, VariantRow]) -> str:
        """The variants side by side: ok rate, latency (p50, p90), tokens per ok answer and
        cost; a cost no answer of a variant had is marked unknown, not drawn as $0."""
        names = list(variants)
        rows = list(variants.values())
        y = list(range(len(names)))
        height = 1.2 + 0.35 * len(names)
        fig, axes = self._figure(2, 2, figsize=(7.2, 2 * height), sharey=True)
        with self.plt.rc_context(self.style):
            (rate, lat), (tok, cost) = axes
            bars = rate.barh(
                y, [100 * v.ok / v.requests if v.requests else 0 for v in rows], color=_OK
            )
            rate.bar_label(bars, fmt="%.1f", padding=-28, color="white")
            rate.set(title="ok answers (%)", xlim=(0, 100))
            lat.barh(y, [v.latency_p50_s or 0 for v in rows], color=_OK, label="p50")
            lat.scatter([v.latency_p90_s or 0 for v in rows], y, color=_P90, marker="|", s=120,
                        label="p90", zorder=3)  # fmt: skip
            lat.set(title="latency of ok answers (s): p50 bar, p90 tick")
            prompt = [v.prompt_tokens / v.ok if v.ok else 0 for v in rows]
            completion = [v.completion_tokens / v.ok if v.ok else 0 for v in rows]
            tok.barh(y, prompt, color="#937860", label="prompt")
            tok.barh(y, completion, left=prompt, color=_OK, label="completion")
            tok.set(title="tokens per ok answer")
            tok.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2, frameon=False)
            cost.barh(y, [v.cost_usd or 0 for v in rows], color=_COST)
            for i, v in enumerate(rows):
                if v.cost_usd is None:
                    cost.text(0, i, " unknown", va="center", color="#666")
                elif v.unpriced:
                    cost.text(v.cost_usd, i, " at least", va="center", color="#666")
            cost.set(title="cost (USD)")
            rate.set_yticks(y, names)
            rate.invert_yaxis()
            fig.tight_layout()
            return self.svg(fig)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
