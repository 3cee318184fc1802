"""``batcher report OUTPUT``: totals, latency percentiles, throughput and error classes.

Reads a finished output (Parquet or JSONL) as a stream. ``--json`` prints the same figures for
scripts; ``--html FILE`` writes a self-contained page with charts (matplotlib, an optional
extra: ``pip install -e '.[report]'``) drawn as inline SVG, so no network is needed to view.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batcher.output.provenance import read_provenance
from batcher.output.writers import read_results

_TOKEN_FIELDS = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")


@dataclass(kw_only=True)
class Group:
    """Totals for one (model, status).

    Token counts are summed over the answers that had usage (``None`` when no ok answer had
    any: unknown, not 0); ``cost_usd`` over the priced ones (``None`` when ok answers came and
    none had a cost; with ``unpriced`` answers it is a lower bound).
    """

    requests: int = 0
    prompt_tokens: int | None = 0
    cached_tokens: int | None = 0
    completion_tokens: int | None = 0
    reasoning_tokens: int | None = 0
    cost_usd: float | None = 0.0
    unpriced: int = 0  # ok answers without a cost (no known price, or no usage)
    usage_missing: int = 0  # ok answers without usage
    priced: int = 0


@dataclass(kw_only=True)
class VariantRow:
    """One variant's figures, for the side-by-side comparison of a sweep."""

    models: list[str] = field(default_factory=list)
    requests: int = 0
    ok: int = 0
    error: int = 0
    error_rate: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0  # None: none of its ok answers had a cost
    unpriced: int = 0
    priced: int = 0
    usage_missing: int = 0
    latency_p50_s: float | None = None
    latency_p90_s: float | None = None
    finish_reasons: dict[str, int] = field(default_factory=dict)  # of ok answers, first choice


@dataclass(kw_only=True)
class Report:
    """Everything ``batcher report`` shows."""

    path: str
    requests: int = 0
    ok: int = 0
    error: int = 0
    cost_usd: float | None = 0.0  # None: answers came and none had a cost (see Group)
    unpriced: int = 0  # ok answers without a cost
    usage_missing: int = 0  # ok answers without usage (their tokens are unknown)
    few_choices: int = 0  # ok answers with fewer choices than their n asked for
    groups: dict[str, dict[str, Group]] = field(default_factory=dict)  # model -> status -> Group
    latency_p50_s: float | None = None
    latency_p90_s: float | None = None
    latency_p99_s: float | None = None
    ttft_p50_s: float | None = None  # streamed answers only
    ttft_p90_s: float | None = None
    ttft_p99_s: float | None = None
    schema_valid: int = 0
    schema_invalid: int = 0
    by_endpoint: dict[str, int] = field(default_factory=dict)
    variants: dict[str, VariantRow] = field(default_factory=dict)  # empty without variants
    wall_s: float = 0.0
    requests_per_s: float = 0.0
    error_classes: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    provenance: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def build_report(path: Path) -> tuple[Report, dict[str, array[float]]]:
    """The report of an output file, and its raw series (latencies, times, costs) for charts."""
    report = Report(path=str(path), provenance=read_provenance(path))
    latencies = array("d")
    ttfts = array("d")
    finished = array("d")
    costs = array("d")
    errors: Counter[str] = Counter()
    first_start = math.inf
    last_end = -math.inf
    variant_latencies: dict[str, array[float]] = {}
    for row in read_results(path):
        status = row.get("status") or "error"
        model = row.get("model") or "?"
        group = report.groups.setdefault(model, {}).setdefault(status, Group())
        group.requests += 1
        report.requests += 1
        report.attempts += row.get("attempts") or 0
        for name in _TOKEN_FIELDS:
            setattr(group, name, getattr(group, name) + (row.get(name) or 0))
        cost = row.get("cost_usd")
        if cost is None:
            group.unpriced += status == "ok"
        else:
            group.priced += 1
            group.cost_usd = (group.cost_usd or 0.0) + cost
        if status == "ok":
            report.ok += 1
            if row.get("prompt_tokens") is None and row.get("completion_tokens") is None:
                group.usage_missing += 1
            asked = row.get("choices_asked")
            if asked and len(row.get("choices") or ()) < asked:
                report.few_choices += 1
            if row.get("latency_s") is not None:
                latencies.append(row["latency_s"])
            if row.get("ttft_s") is not None:
                ttfts.append(row["ttft_s"])
        else:
            report.error += 1
            errors[row.get("error_code") or "unknown"] += 1
        if row.get("variant") is not None:
            _count_variant(report, variant_latencies, row, status, model, cost)
        if row.get("endpoint") is not None:
            report.by_endpoint[row["endpoint"]] = report.by_endpoint.get(row["endpoint"], 0) + 1
        valid = row.get("schema_valid")
        if valid is not None:
            report.schema_valid += valid is True
            report.schema_invalid += valid is False
        started, ended = row.get("started_at"), row.get("finished_at")
        if started is not None and ended is not None:
            first_start = min(first_start, started.timestamp())
            last_end = max(last_end, ended.timestamp())
            finished.append(ended.timestamp())
            costs.append(math.nan if cost is None else cost)  # unknown is not $0
    ordered = sorted(latencies)
    report.latency_p50_s = _percentile(ordered, 50)
    report.latency_p90_s = _percentile(ordered, 90)
    report.latency_p99_s = _percentile(ordered, 99)
    ordered = sorted(ttfts)
    report.ttft_p50_s = _percentile(ordered, 50)
    report.ttft_p90_s = _percentile(ordered, 90)
    report.ttft_p99_s = _percentile(ordered, 99)
    if last_end > first_start:
        report.wall_s = last_end - first_start
        report.requests_per_s = report.requests / report.wall_s
    report.error_classes = dict(errors.most_common())
    _mark_unknowns(report)
    report.variants = _in_job_order(report.variants, report.provenance.get("job"))
    for name, row_of in report.variants.items():
        ordered = sorted(variant_latencies[name])
        row_of.latency_p50_s = _percentile(ordered, 50)
        row_of.latency_p90_s = _percentile(ordered, 90)
        row_of.error_rate = row_of.error / row_of.requests if row_of.requests else 0.0
        row_of.finish_reasons = dict(
            sorted(row_of.finish_reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        )
    offset = first_start if math.isfinite(first_start) else 0.0
    series = {
        "latency_s": latencies,
        "finished_s": array("d", (t - offset for t in finished)),
        "cost_usd": costs,
    }
    return report, series


def _mark_unknowns(report: Report) -> None:
    """Totals of what is known; ``None`` where nothing was: the tokens of ok answers none of
    which had usage, the cost of answers none of which had a cost."""
    priced = 0
    for statuses in report.groups.values():
        for status, g in statuses.items():
            report.unpriced += g.unpriced
            report.usage_missing += g.usage_missing
            priced += g.priced
            if status == "ok" and g.usage_missing >= g.requests:
                for name in _TOKEN_FIELDS:
                    setattr(g, name, None)
            if g.unpriced and not g.priced:
                g.cost_usd = None
    total = sum(g.cost_usd or 0.0 for s in report.groups.values() for g in s.values())
    report.cost_usd = None if report.unpriced and not priced else total
    for v in report.variants.values():
        if v.unpriced and not v.priced:
            v.cost_usd = None


def _in_job_order(variants: dict[str, VariantRow], job: str | None) -> dict[str, VariantRow]:
    """The variants in the order the job lists them (Parquet keeps the job), else by name."""
    order: list[str] = []
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        order = [v["name"] for v in json.loads(job or "{}").get("variants", [])]
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(variants.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def _count_variant(
    report: Report,
    latencies: dict[str, array[float]],
    row: dict[str, Any],
    status: str,
    model: str,
    cost: float | None,
) -> None:
    name = row["variant"]
    v = report.variants.get(name)
    if v is None:
        v = report.variants[name] = VariantRow()
        latencies[name] = array("d")
    v.requests += 1
    if model not in v.models:
        v.models.append(model)
    v.prompt_tokens += row.get("prompt_tokens") or 0
    v.completion_tokens += row.get("completion_tokens") or 0
    if cost is not None:
        v.cost_usd = (v.cost_usd or 0.0) + cost
        v.priced += 1
    if status == "ok":
        v.ok += 1
        v.unpriced += cost is None
        v.usage_missing += row.get("prompt_tokens") is None and row.get("completion_tokens") is None
        if row.get("latency_s") is not None:
            latencies[name].append(row["latency_s"])
        reason = row.get("finish_reason") or "-"
        v.finish_reasons[reason] = v.finish_reasons.get(reason, 0) + 1
    else:
        v.error += 1


def _percentile(ordered: list[float], pct: float) -> float | None:
    """Nearest-rank percentile."""
    if not ordered:
        return None
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def format_report(report: Report) -> str:
    """The report as text (the same figures as a run's summary)."""
    lines = [
        f"batcher report: {report.path}",
        f"  requests  {report.requests:,}: {report.ok:,} ok, {report.error:,} error; "
        f"{report.attempts:,} attempts",
        f"  cost      {_cost(report.cost_usd, report.unpriced)}",
        f"  tokens    {_tokens(report)}",
        f"  latency   p50 {_s(report.latency_p50_s)}, p90 {_s(report.latency_p90_s)}, "
        f"p99 {_s(report.latency_p99_s)} (ok answers, last attempt)",
        f"  speed     {report.requests_per_s:,.1f} requests/s over {report.wall_s:,.1f} s",
    ]
    if report.ttft_p50_s is not None:
        lines.append(
            f"  1st token p50 {_s(report.ttft_p50_s)}, p90 {_s(report.ttft_p90_s)}, "
            f"p99 {_s(report.ttft_p99_s)} (streamed ok answers)"
        )
    if report.few_choices:
        lines.append(
            f"  choices   {report.few_choices:,} answers had fewer choices than their n asked"
        )
    if report.schema_valid or report.schema_invalid:
        lines.append(
            f"  schema    {report.schema_valid:,} valid, {report.schema_invalid:,} invalid "
            "(answers checked against their JSON schema)"
        )
    if len(report.by_endpoint) > 1:
        parts = ", ".join(f"{name} {n:,}" for name, n in sorted(report.by_endpoint.items()))
        lines.append(f"  endpoints {parts}")
    lines.append("  by model and status:")
    for model, statuses in sorted(report.groups.items()):
        for status, g in sorted(statuses.items()):
            cost = "cost unknown" if g.cost_usd is None else f"${g.cost_usd:,.4f}"
            cost += f" ({g.unpriced:,} unpriced)" if g.unpriced and g.cost_usd is not None else ""
            if g.prompt_tokens is None:
                tokens = "tokens unknown (no usage)"
            else:
                tokens = (
                    f"{g.prompt_tokens:,} prompt ({g.cached_tokens:,} cached), "
                    f"{g.completion_tokens:,} completion ({g.reasoning_tokens:,} reasoning) tokens"
                )
                if g.usage_missing:
                    tokens += f" (usage missing for {g.usage_missing:,})"
            lines.append(f"    {model} {status}: {g.requests:,} requests, {tokens}, {cost}")
    if report.error_classes:
        top = ", ".join(f"{code} ×{n:,}" for code, n in report.error_classes.items())
        lines.append(f"  errors    {top}")
    if report.variants:
        lines.append("  by variant (latency of ok answers; finish reasons of their first choice):")
        lines.extend("    " + line for line in _variant_table(report.variants))
    made = report.provenance
    if made:
        sha = made.get("input_sha256") or "-"
        lines.append(
            f"  made by   batcher {made.get('version', '?')} on {made.get('written_at', '?')} "
            f"from {made.get('input', '?')} (sha256 {sha[:16]}); job in the file's metadata"
        )
    return "\n".join(lines)


def _variant_table(variants: dict[str, VariantRow]) -> list[str]:
    """The variants side by side, one row each, columns aligned."""
    header = ["variant", "model", "requests", "ok", "error rate", "prompt", "completion", "cost",
              "p50", "p90", "finish reasons"]  # fmt: skip
    rows = [header]
    for name, v in variants.items():
        cost = "?" if v.cost_usd is None else f"${v.cost_usd:,.4f}" + ("+?" if v.unpriced else "")
        reasons = ", ".join(f"{r} {n:,}" for r, n in v.finish_reasons.items()) or "-"
        unknown = "+?" if v.usage_missing else ""
        rows.append([
            name, ",".join(v.models), f"{v.requests:,}", f"{v.ok:,}", f"{v.error_rate:.1%}",
            f"{v.prompt_tokens:,}" + unknown, f"{v.completion_tokens:,}" + unknown, cost,
            _s(v.latency_p50_s), _s(v.latency_p90_s), reasons,
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    numeric = {2, 3, 4, 5, 6, 7, 8, 9}  # right-aligned

    def cell(i: int, text: str) -> str:
        return text.rjust(widths[i]) if i in numeric else text.ljust(widths[i])

    return ["  ".join(cell(i, t) for i, t in enumerate(row[:-1])) + "  " + row[-1] for row in rows]


def _cost(total: float | None, unpriced: int) -> str:
    """A cost total: exact, a lower bound when some ok answers had no cost, or unknown."""
    if total is None:
        return (
            f"unknown: none of the {unpriced:,} ok answers has a cost (no known price or no usage)"
        )
    if unpriced:
        return (
            f"at least ${total:,.4f}; {unpriced:,} ok answers unpriced (no known price or no usage)"
        )
    return f"${total:,.4f}"


def _tokens(report: Report) -> str:
    """Prompt and completion tokens of the answers that had usage; unknown when none had."""
    groups = [g for statuses in report.groups.values() for g in statuses.values()]
    if report.ok and report.usage_missing >= report.ok:
        return f"unknown (no usage in any of the {report.ok:,} ok answers)"
    prompt = sum(g.prompt_tokens or 0 for g in groups)
    completion = sum(g.completion_tokens or 0 for g in groups)
    text = f"{prompt:,} prompt + {completion:,} completion"
    if report.usage_missing:
        text += f" (usage missing for {report.usage_missing:,} answers)"
    return text


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


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
