"""``batcher estimate``: what a job will send and cost, before anything is sent.

It reads the input exactly as ``run`` does (same forms, defaults and rejects; once per variant
in a job with variants, with a row for each), counts the prompt
tokens with tiktoken, and bounds the output: **high** is every request's whole completion budget
(``max_completion_tokens``/``max_tokens``, or 256, × ``n``); **low** assumes answers use
``low_fraction`` of their budget (25 % by default), or, given ``sample`` (an earlier output
file), the average completion tokens its answers actually used. The ETA is the slowest of the
RPM limits, the TPM limits, and concurrency × an assumed latency per answer, endpoint by
endpoint (``_eta``). The cost is shown at the online price and, beside it, at the Batch API's
(half: ``batch_cost_*``), which a batch-mode job pays; a job with ``[pricing] batch_discount``
is priced at the batch rate in both.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from batcher.config import EndpointConfig, JobConfig, VariantConfig
from batcher.cost.money import usd
from batcher.cost.pricing import BATCH_DISCOUNT, Pricer
from batcher.input.sources import open_input
from batcher.input.tabular import check_input, reader_for
from batcher.output.writers import read_results
from batcher.records import Reject
from batcher.runner.progress import format_duration
from batcher.runner.staging import stage
from batcher.runner.wiring import build_pricer

DEFAULT_LOW_FRACTION = 0.25
DEFAULT_LATENCY_S = 2.0


@dataclass(kw_only=True)
class ModelEstimate:
    """Figures for the requests of one model."""

    requests: int = 0
    prompt_tokens: int = 0
    output_tokens_low: int = 0
    output_tokens_high: int = 0
    cost_low_usd: float | None = 0.0
    cost_high_usd: float | None = 0.0


@dataclass(kw_only=True)
class Estimate:
    """The whole pre-flight estimate of a job."""

    requests: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    output_tokens_low: int = 0
    output_tokens_high: int = 0
    cost_low_usd: float | None = 0.0
    cost_high_usd: float | None = 0.0
    batch_cost_low_usd: float | None = 0.0
    batch_cost_high_usd: float | None = 0.0
    eta_s: float = 0.0
    eta_bound: str = ""
    low_basis: str = ""
    unpriced_models: list[str] = field(default_factory=list)
    by_model: dict[str, ModelEstimate] = field(default_factory=dict)
    by_variant: dict[str, ModelEstimate] = field(default_factory=dict)  # empty without variants
    read_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(
    job: JobConfig,
    *,
    sample: Path | None = None,
    low_fraction: float = DEFAULT_LOW_FRACTION,
    latency_s: float = DEFAULT_LATENCY_S,
) -> Estimate:
    """Estimate a job; reads the input (a remote one or a glob's files copied to the work
    folder first, as a run does: ``runner.staging``), sends nothing."""
    if not latency_s > 0:
        raise ValueError(f"latency_s must be > 0, got {latency_s}")
    if job.input is None:
        from batcher.errors import ConfigError

        raise ConfigError("job.input", "no input file (set it in the job or pass --input)")
    stdin = str(job.input) == "-"
    if not stdin:
        check_input(job)  # before anything is read
    staging = stage(replace(job, output=None))  # the output is not written
    try:
        if stdin:  # copied to a file of its form (--input-format) first, as a run does
            check_input(staging.job)
        return _estimate(staging.job, sample=sample, low_fraction=low_fraction, latency_s=latency_s)
    finally:
        staging.close()


def _estimate(
    job: JobConfig, *, sample: Path | None, low_fraction: float, latency_s: float
) -> Estimate:
    assert isinstance(job.input, Path)  # made local by ``stage``
    pricer = build_pricer(job)
    per_answer = _sampled_completion(sample) if sample else None
    result = Estimate()
    result.low_basis = (
        f"answers use {per_answer:.0f} completion tokens on average (measured in {sample})"
        if per_answer is not None
        else f"answers use {low_fraction:.0%} of their max_tokens"
    )
    started = time.perf_counter()
    rejected_lines: set[int] = set()  # a line rejected in every variant counts once
    # per variant: (model, prompt tokens, low, high) sums; priced per model below
    variant_models: dict[str, dict[str, ModelEstimate]] = {}
    passes: list[VariantConfig | None] = list(job.variants) or [None]
    for variant in passes:
        with open_input(job.input) as stream:
            reader = reader_for(job, stream, variant=variant)
            for item in reader:
                if isinstance(item, Reject):
                    rejected_lines.add(item.line)
                    continue
                model = str(item.body.get("model"))
                budget = item.completion_budget
                # a sample's average is per record, all its choices in: the same n is assumed
                low = min(budget, int(budget * low_fraction if per_answer is None else per_answer))
                tables = [result.by_model]
                if variant is not None:
                    tables.append(variant_models.setdefault(variant.name, {}))
                for table in tables:
                    m = table.setdefault(model, ModelEstimate())
                    m.requests += 1
                    m.prompt_tokens += item.prompt_tokens or 0  # the reader counts here
                    m.output_tokens_low += low
                    m.output_tokens_high += budget
    result.rejected = len(rejected_lines)
    result.read_s = time.perf_counter() - started
    for model, m in result.by_model.items():
        if not _price(m, pricer, model):
            result.unpriced_models.append(model)
    for name, models in variant_models.items():
        total = result.by_variant[name] = ModelEstimate()
        for model, m in models.items():
            priced = _price(m, pricer, model)
            for attr in ("requests", "prompt_tokens", "output_tokens_low", "output_tokens_high"):
                setattr(total, attr, getattr(total, attr) + getattr(m, attr))
            for attr in ("cost_low_usd", "cost_high_usd"):
                before = getattr(total, attr)
                setattr(total, attr, None if before is None or not priced
                        else before + getattr(m, attr))  # fmt: skip
    for m in result.by_model.values():
        result.requests += m.requests
        result.prompt_tokens += m.prompt_tokens
        result.output_tokens_low += m.output_tokens_low
        result.output_tokens_high += m.output_tokens_high
    costs = [m for m in result.by_model.values() if m.cost_low_usd is not None]
    # no priced model at all: no cost (None), never a silent 0
    result.cost_low_usd = sum(m.cost_low_usd or 0.0 for m in costs) if costs else None
    result.cost_high_usd = sum(m.cost_high_usd or 0.0 for m in costs) if costs else None
    factor = 1.0 if pricer.batch_discount else BATCH_DISCOUNT  # discounted prices: batch already
    for name in ("low", "high"):
        online = getattr(result, f"cost_{name}_usd")
        setattr(result, f"batch_cost_{name}_usd", None if online is None else online * factor)
    result.eta_s, result.eta_bound = _eta(job, result, latency_s)
    return result


def _price(m: ModelEstimate, pricer: Pricer, model: str) -> bool:
    """Set the low and high cost of ``m``; false (costs ``None``) when the price is unknown."""
    price = pricer.price(model)
    if price is None:
        m.cost_low_usd = m.cost_high_usd = None
        return False
    m.cost_low_usd = (m.prompt_tokens * price.input + m.output_tokens_low * price.output) / 1e6
    m.cost_high_usd = (m.prompt_tokens * price.input + m.output_tokens_high * price.output) / 1e6
    return True


#: Variants tied to endpoints beyond which only each one's own endpoints are checked, not
#: every union of them (2^k of those).
_MAX_UNIONS_OF = 10


def _eta(job: JobConfig, est: Estimate, latency_s: float) -> tuple[float, str]:
    """How long the run takes at its limits, and what binds it.

    Each endpoint sends at the slowest of its own limits (its ``concurrency``, ``rpm`` and
    ``tpm``, else the job's ``[limits]``, as the run applies them): concurrency ÷ latency,
    RPM ÷ 60, or TPM ÷ 60 ÷ the tokens a request is charged (prompt and whole completion
    budget). The whole input goes no faster than all endpoints together, and the variants tied
    to some endpoints (``[[variants]] endpoint``) no faster than the union of theirs, whichever
    other variants share them: the ETA is the longest of these bounds, and never less than
    one answer's latency.
    """
    endpoints = {e.name: e for e in job.all_endpoints}
    tied = {
        v.name: frozenset(v.endpoints)
        for v in job.variants
        if v.endpoints and v.name in est.by_variant
    }
    groups: dict[frozenset[str], tuple[str, ModelEstimate]] = {
        frozenset(endpoints): ("", _totals([est]))
    }
    for union in _unions(set(tied.values())):
        if union in groups:  # the variants use every endpoint: the whole input bounds them
            continue
        names = [name for name, ends in tied.items() if ends <= union]
        label = f"variant{'s' if len(names) > 1 else ''} {', '.join(names)}: "
        groups[union] = (label, _totals([est.by_variant[name] for name in names]))
    best = (0.0, "no requests")
    for union, (label, figures) in groups.items():
        if figures.requests == 0:
            continue
        tokens = (figures.prompt_tokens + figures.output_tokens_high) / figures.requests
        names = [n for n in endpoints if n in union]  # in the job's order
        rates = [_rate(job, endpoints[n], tokens, latency_s) for n in names]
        seconds = figures.requests / sum(rate for rate, _ in rates)
        if len(endpoints) == 1:
            bound = rates[0][1]
        elif len(rates) == 1:
            bound = f"{names[0]} {rates[0][1]}"
        else:
            bound = f"{len(rates)} endpoints: " + " + ".join(
                f"{n} {why}" for n, (_, why) in zip(names, rates, strict=True)
            )
        if seconds > best[0]:
            best = (seconds, label + bound)
    if best[0] and best[0] < latency_s:
        # however many answers come at once, the run lasts at least as long as one of them
        best = (latency_s, f"one answer: {latency_s:g} s")
    return best


def _unions(sets: set[frozenset[str]]) -> set[frozenset[str]]:
    """Every union of some of ``sets`` (just ``sets`` past ``_MAX_UNIONS_OF`` of them)."""
    if len(sets) > _MAX_UNIONS_OF:
        return sets
    found = set(sets)
    frontier = set(sets)
    while frontier:
        frontier = {a | b for a in frontier for b in sets} - found
        found |= frontier
    return found


def _totals(parts: list[Estimate] | list[ModelEstimate]) -> ModelEstimate:
    """Requests and the tokens TPM is charged for, summed over ``parts``."""
    return ModelEstimate(
        requests=sum(p.requests for p in parts),
        prompt_tokens=sum(p.prompt_tokens for p in parts),
        output_tokens_high=sum(p.output_tokens_high for p in parts),
    )


def _rate(
    job: JobConfig, endpoint: EndpointConfig, tokens: float, latency_s: float
) -> tuple[float, str]:
    """Requests a second an endpoint sends at its tightest limit, and that limit."""
    concurrency = endpoint.concurrency or job.limits.concurrency
    rates = {f"concurrency {concurrency} × {latency_s:g} s an answer": concurrency / latency_s}
    rpm = endpoint.rpm or job.limits.rpm
    if rpm:
        rates[f"{_figure(rpm)} RPM"] = rpm / 60
    tpm = endpoint.tpm or job.limits.tpm
    if tpm:
        rates[f"{_figure(tpm)} TPM"] = tpm / 60 / max(tokens, 1.0)  # charged on the budget
    why = min(rates, key=lambda k: rates[k])
    return rates[why], why


def _figure(value: float) -> str:
    """``2,000,000`` rather than ``2e+06``; ``0.5`` stays ``0.5``."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:g}"


def _sampled_completion(sample: Path) -> float | None:
    """Average completion tokens of the ok answers in an earlier output file."""
    total = count = 0
    for row in read_results(sample):
        if row.get("status") == "ok" and isinstance(row.get("completion_tokens"), int):
            total += row["completion_tokens"]
            count += 1
    return total / count if count else None


def _dollars(low: float, high: float) -> str:
    return f"{usd(low, grouped=True)} to {usd(high, grouped=True)}"


def format_estimate(est: Estimate, *, name: str) -> str:
    """The human-readable estimate."""
    lines = [
        f"batcher estimate: {name} (nothing was sent)",
        f"  requests       {est.requests:,} ({est.rejected:,} lines would be rejected)",
        f"  prompt tokens  {est.prompt_tokens:,} (tiktoken)",
        f"  output tokens  {est.output_tokens_low:,} to {est.output_tokens_high:,} "
        f"(low: {est.low_basis}; high: every max_tokens used, 256 where none is set)",
    ]
    if est.cost_low_usd is not None and est.cost_high_usd is not None:
        lines.append(f"  cost           {_dollars(est.cost_low_usd, est.cost_high_usd)}")
    if est.batch_cost_low_usd is not None and est.batch_cost_high_usd is not None:
        lines.append(
            f"  batch cost     {_dollars(est.batch_cost_low_usd, est.batch_cost_high_usd)} "
            "(Batch API price: --mode batch)"
        )
    for model, m in sorted(est.by_model.items()):
        cost = (
            _dollars(m.cost_low_usd, m.cost_high_usd)
            if m.cost_low_usd is not None and m.cost_high_usd is not None
            else "no known price"
        )
        lines.append(
            f"    {model}: {m.requests:,} requests, {m.prompt_tokens:,} prompt tokens, {cost}"
        )
    for name, v in est.by_variant.items():
        cost = (
            _dollars(v.cost_low_usd, v.cost_high_usd)
            if v.cost_low_usd is not None and v.cost_high_usd is not None
            else "no known price"
        )
        lines.append(
            f"    variant {name}: {v.requests:,} requests, {v.prompt_tokens:,} prompt tokens, "
            f"{v.output_tokens_low:,} to {v.output_tokens_high:,} output tokens, {cost}"
        )
    if est.unpriced_models:
        lines.append(
            "  no price for   "
            + ", ".join(est.unpriced_models)
            + ' (set [pricing."MODEL"] input/output in the job)'
        )
    lines.append(f"  ETA            {format_duration(est.eta_s)} (bound by {est.eta_bound})")
    rate = est.requests / est.read_s if est.read_s > 0 else 0.0
    lines.append(f"  read in        {est.read_s:.1f} s ({rate:,.0f} prompts/s)")
    return "\n".join(lines)


def estimate_json(est: Estimate) -> Mapping[str, Any]:
    """The estimate as JSON-ready data."""
    return est.as_dict()
