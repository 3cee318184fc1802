"""``batcher report OUTPUT`` as text: the figures of a ``Report``, the same as a run's summary,
with the variants of a sweep side by side."""

from __future__ import annotations

from pathlib import Path

from batcher.cost.money import usd
from batcher.output.formats import rejects_path
from batcher.output.report import Report, VariantRow


def format_report(report: Report) -> str:
    """The report as text (the same figures as a run's summary)."""
    lines = [f"batcher report: {report.path}"]
    if report.source == "journal" and report.left_out:
        lines[0] += " (its output is gone: what its journal still holds)"
    elif report.source == "journal":
        lines[0] += " (not written yet: what its journal holds so far)"
    lines.append(f"  run       {_run_line(report)}")
    if report.left_out:
        lines.append(f"  note      {left_out_note(report)}")
    lines += [
        f"  requests  {report.requests:,}: {report.ok:,} ok, {report.error:,} error; "
        f"{report.attempts:,} attempts",
        f"  cost      {_cost(report.cost_usd, report.unpriced)}",
        f"  tokens    {_tokens(report)}",
        f"  latency   p50 {_s(report.latency_p50_s)}, p90 {_s(report.latency_p90_s)}, "
        f"p99 {_s(report.latency_p99_s)} (ok answers, last attempt)",
        f"  speed     {report.requests_per_s:,.1f} requests/s over {report.wall_s:,.1f} s",
    ]
    if report.rejected:
        lines.append(
            f"  rejects   {report.rejected:,} input lines rejected "
            f"({rejects_path(Path(report.path))}: each with its line number and reason)"
        )
    if report.rate_limited is not None:
        lines.append(f"  429s      {report.rate_limited:,} answers (a rate limit or a busy server)")
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
            cost = "cost unknown" if g.cost_usd is None else usd(g.cost_usd, grouped=True)
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


def left_out_note(report: Report) -> str:
    """Why some requests of a running (or stopped) job are not in its report."""
    return (
        f"{report.left_out:,} requests answered before are left out: their answers were "
        "written to the output, which is gone (its journal keeps no answers once compacted)"
    )


def _run_line(report: Report) -> str:
    """The job's name, its last run's state and exit code, the span of its answers and its
    last run's start and end in UTC, as far as they are known."""
    parts = [report.job_name or "job", report.state or "state not recorded"]
    if report.exit_code is not None:
        parts.append(f"exit code {report.exit_code}")
    span = f"answers {report.started_at or '?'} to {report.ended_at or '…'} UTC"
    if report.last_run_ended_at is not None:
        span += f"; last run {report.last_run_started_at or '?'} to {report.last_run_ended_at} UTC"
    return f"{parts[0]}: {', '.join(parts[1:])}; {span}"


def _variant_table(variants: dict[str, VariantRow]) -> list[str]:
    """The variants side by side, one row each, columns aligned."""
    header = ["variant", "model", "requests", "ok", "error rate", "prompt", "completion", "cost",
              "p50", "p90", "finish reasons"]  # fmt: skip
    rows = [header]
    for name, v in variants.items():
        cost = (
            "?"
            if v.cost_usd is None
            else usd(v.cost_usd, grouped=True) + ("+?" if v.unpriced else "")
        )
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
            f"at least {usd(total, grouped=True)}; {unpriced:,} ok answers unpriced "
            "(no known price or no usage)"
        )
    return usd(total, grouped=True)


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
