"""``batcher report OUTPUT``, the figures: totals, latency percentiles, throughput, error
classes with sample messages, sample answers and how the run ended, read as a stream from an
output (Parquet or JSONL) or, while its job runs, from its journal (``report_source``).

``batcher.output.report_text`` shows them as text (``--json`` prints ``Report.as_dict()``);
``batcher.output.report_html`` draws them as a self-contained page (``--html FILE``).
"""

from __future__ import annotations

import contextlib
import json
import math
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batcher.output.formats import errors_path, rejects_path
from batcher.output.journal import JOURNAL_SUFFIX
from batcher.output.provenance import read_provenance
from batcher.output.reading import read_results
from batcher.output.report_source import JournalRows, Source, report_source, source_rows
from batcher.runner.status_file import read_status_file

_TOKEN_FIELDS = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")
#: Sample answers kept: every variant's answer to the first ``SAMPLE_IDS`` ids, at most
#: ``MAX_SAMPLES`` rows; sample error messages: ``ERROR_SAMPLES`` distinct ones per class.
SAMPLE_IDS = 4
MAX_SAMPLES = 12
ERROR_SAMPLES = 3
#: Characters of a prompt, answer or error message kept for the samples.
SAMPLE_CHARS = 400


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
class Sample:
    """One request's prompt and answer, for the samples table (texts cut to
    ``SAMPLE_CHARS``; ``prompt`` is ``None`` when the output keeps no messages)."""

    custom_id: str
    variant: str | None
    model: str | None
    status: str
    prompt: str | None
    answer: str


@dataclass(kw_only=True)
class Report:
    """Everything ``batcher report`` shows.

    ``source`` is ``"output"``, or ``"journal"`` for a job whose output is not written yet.
    ``started_at`` and ``ended_at`` (ISO-8601 UTC) span the answers (the first one's start,
    the last one's end; no end while a run holds the journal), over every run that gave
    them; ``last_run_started_at`` and ``last_run_ended_at`` are the last run's, with its
    ``state`` and ``exit_code``, from the output's metadata (a JSONL output's from the status
    file beside it), ``None`` where neither says. ``rate_limited_bins`` holds the 429s the
    runs met (``[start, count]`` per ``rate_limited_bin_s`` seconds, Unix time), ``None``
    when the output does not say.
    """

    path: str
    source: str = "output"
    job_name: str | None = None
    state: str | None = None
    exit_code: int | None = None
    started_at: str | None = None
    ended_at: str | None = None
    last_run_started_at: str | None = None
    last_run_ended_at: str | None = None
    rate_limited: int | None = None
    rate_limited_bin_s: int = 1
    rate_limited_bins: list[list[int]] | None = None
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
    error_samples: dict[str, list[str]] = field(default_factory=dict)  # class -> messages
    samples: list[Sample] = field(default_factory=list)
    attempts: int = 0
    rejected: int = 0  # input lines the last run rejected (OUTPUT.rejects.jsonl), not requests
    left_out: int = 0  # requests of a compacted journal whose output row is gone
    provenance: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    """The output's rows, then those of its errors file (``split_errors``) when there is one:
    the report covers every request of the run."""
    yield from read_results(path)
    errors = errors_path(Path(path))
    if errors.is_file() and errors != Path(path):
        yield from read_results(errors)


def _rejected_lines(output: Path) -> int:
    """The lines of the rejects file beside ``output`` (each run rewrites it, or removes it
    when it rejects nothing): what the run's summary counted as rejected."""
    try:
        with rejects_path(output).open("rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:  # none: nothing rejected
        return 0


def build_report(path: Path) -> tuple[Report, dict[str, array[float]]]:
    """The report of an output (or, with no output yet, of its journal), and its raw series
    for charts: ``latency_s`` of ok answers; per answer with times, ``finished_at`` (Unix
    seconds), ``ok`` (1 or 0) and ``cost_usd`` (NaN: unknown)."""
    source = report_source(path)
    made = read_provenance(path) if source.kind == "output" else {}
    report = Report(path=str(path), source=source.kind, provenance=made)
    latencies = array("d")
    ttfts = array("d")
    finished = array("d")
    oks = array("d")
    costs = array("d")
    errors: Counter[str] = Counter()
    first_start = math.inf
    last_end = -math.inf
    variant_latencies: dict[str, array[float]] = {}
    samples: _Pool = {}
    rows = source_rows(source) if source.kind == "journal" else _rows(source.path)
    for row in rows:
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
            code = row.get("error_code") or "unknown"
            errors[code] += 1
            _sample_error(report, code, row.get("error_message"))
        _sample(samples, row, status)
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
            oks.append(1.0 if status == "ok" else 0.0)
            costs.append(math.nan if cost is None else cost)  # unknown is not $0
    report.left_out = rows.left_out if isinstance(rows, JournalRows) else 0
    report.rejected = _rejected_lines(Path(path))
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
    report.samples = _samples_in_order(samples, list(report.variants))
    _how_it_ended(report, source, first_start, last_end)
    if report.left_out and not (source.state or "").startswith("running"):
        # the run that wrote the output finished; the same command is refused until it is back
        report.state = "its output is gone (put it back, or run with --restart to send again)"
    series = {"latency_s": latencies, "finished_at": finished, "ok": oks, "cost_usd": costs}
    return report, series


def _how_it_ended(report: Report, source: Source, first_start: float, last_end: float) -> None:
    """The job's name, the last run's state, exit code, start and end, and the 429s: from the
    output's metadata where its run recorded them (else the status file beside an output
    without metadata), and the span of the answers."""
    made = report.provenance or _last_run_of(source)
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        report.job_name = json.loads(made.get("job") or "{}").get("name")
    report.state = made.get("state") or source.state
    with contextlib.suppress(ValueError, TypeError):
        report.exit_code = int(made["exit_code"]) if "exit_code" in made else None
    report.last_run_started_at = made.get("started_at")
    report.last_run_ended_at = made.get("ended_at")
    report.started_at = _iso(first_start) or report.last_run_started_at
    running = source.state is not None and source.state.startswith("running")
    report.ended_at = None if running else (_iso(last_end) or report.last_run_ended_at)
    with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
        bins = json.loads(made["rate_limited"])
        counts = [[int(start), int(n)] for start, n in bins["counts"]]
        report.rate_limited_bin_s = max(1, int(bins["bin_s"]))
        report.rate_limited_bins = counts
        report.rate_limited = sum(n for _, n in counts)


def _last_run_of(source: Source) -> dict[str, str]:
    """How the last run of an output without metadata (JSONL) ended, from the status file
    beside it, in the metadata's terms (``provenance.run_record``); empty when there is none,
    only the job's name for a journal (whose state is ``source.state``)."""
    output = source.path
    if source.kind == "journal":
        output = output.with_name(output.name.removesuffix(JOURNAL_SUFFIX))
    info = read_status_file(output)
    if info is None:
        return {}
    last = {"job": json.dumps({"name": info.get("job")})}
    if source.kind != "output" or info.get("state") not in ("finished", "stopped"):
        return last  # the journal's state says more (running, or stopped without a word)
    state = str(info["state"])
    if state == "stopped":
        state = f"stopped early: {info.get('stop_reason') or 'stopped'}"
    last["state"] = state
    if isinstance(info.get("exit_code"), int):
        last["exit_code"] = str(info["exit_code"])
    for name in ("started_at", "ended_at"):
        at = info.get(name)
        if isinstance(at, int | float) and (text := _iso(float(at))) is not None:
            last[name] = text
    return last


def _iso(ts: float) -> str | None:
    if not math.isfinite(ts):
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _sample_error(report: Report, code: str, message: str | None) -> None:
    """Keep a few distinct messages of each error class."""
    kept = report.error_samples.setdefault(code, [])
    text = _cut(message or "(no message)")
    if len(kept) < ERROR_SAMPLES and text not in kept:
        kept.append(text)


#: Sample rows gathered while reading: input line -> that line's answers (every variant's).
_Pool = dict[int, list[Sample]]


def _sample(pool: _Pool, row: dict[str, Any], status: str) -> None:
    """Keep every variant's answer to the first ``SAMPLE_IDS`` input lines: a line after
    them is dropped, one before them takes the place of the last."""
    line = row.get("line") or 0
    if line not in pool:
        if len(pool) >= SAMPLE_IDS:
            last = max(pool)
            if line > last:
                return
            del pool[last]
        pool[line] = []
    if len(pool[line]) >= MAX_SAMPLES:  # rows without a line number (other tools' files)
        return
    if status == "ok":
        answer = row.get("content") or "(no text: see the response column)"
    else:
        answer = f"{row.get('error_code') or 'error'}: {row.get('error_message') or ''}"
    pool[line].append(
        Sample(
            custom_id=str(row.get("custom_id")),
            variant=row.get("variant"),
            model=row.get("model"),
            status=status,
            prompt=_prompt(row),
            answer=_cut(answer),
        )
    )


def _samples_in_order(pool: _Pool, variants: list[str]) -> list[Sample]:
    """The sampled answers by input line, then in the job's order of variants."""
    rank = {name: i for i, name in enumerate(variants)}
    ordered = [
        sample
        for line in sorted(pool)
        for sample in sorted(pool[line], key=lambda s: rank.get(s.variant or "", -1))
    ]
    return ordered[:MAX_SAMPLES]


def _prompt(row: dict[str, Any]) -> str | None:
    """The last user message of a row's ``messages`` (the whole conversation's last turn is
    what was asked), else the row of a tabular input; ``None`` when the output keeps neither."""
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        turns = [m for m in messages if isinstance(m, dict)]
        users = [m for m in turns if m.get("role") == "user"] or turns
        if users:
            return _cut(_text_of(users[-1].get("content")))
    given = row.get("input")
    if isinstance(given, dict) and given:
        return _cut(", ".join(f"{k}={v}" for k, v in given.items()))
    return None


def _text_of(content: Any) -> str:
    """A message's content as text: a string as is; content parts joined (non-text parts by
    their type)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict):
                parts.append(f"[{part.get('type', 'part')}]")
        return " ".join(parts)
    return "" if content is None else json.dumps(content, default=str)


def _cut(text: str) -> str:
    return text if len(text) <= SAMPLE_CHARS else text[: SAMPLE_CHARS - 1] + "…"


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
