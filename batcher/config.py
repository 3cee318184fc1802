"""Job configuration: frozen dataclasses loaded from ``jobs/*.toml`` and overridden by flags.

Every value is checked when the job is loaded, so a bad job fails before anything is sent, with
an error that names the field (``limits.concurrency: must be an integer >= 1, got 0``).
Relative paths in a job file are resolved against the job file's folder, so a job runs the same
from any working directory; paths given as flags are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batcher.cost.pricing import parse_pricing
from batcher.cost.tokens import ENCODINGS
from batcher.errors import ConfigError
from batcher.http.redact import redact_url
from batcher.input.requests import check_request_fields

SIM = "sim"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: An HTTP header name (RFC 9110's token).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: The variable that gives the base URL when neither a flag nor the job does (as the openai
#: SDK and most tools read it).
BASE_URL_ENV = "OPENAI_BASE_URL"


def default_base_url() -> str:
    """The base URL of an endpoint that names none: ``$OPENAI_BASE_URL`` if set, else OpenAI's.

    Read when the job is made (loaded, or a ``JobConfig``/``EndpointConfig`` built), so the
    precedence is: a flag or override, then the job file, then the variable, then the default.
    """
    return os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL


#: The most requests in flight a job may ask for: each is a task and a socket, and beyond
#: this a run spends its time and memory on bookkeeping (a million took 111 s and 7.9 GB for
#: five lines), while no endpoint admits as many at once.
MAX_CONCURRENCY = 10_000
#: The longest per-attempt timeout: a day. Longer means "never" (``inf`` breaks the transport's
#: timers), which would leave a silent server holding a request to the end of the run.
MAX_TIMEOUT_S = 86_400.0
#: The longest any other duration (backoff, outage patience, grace) may be: 30 days.
MAX_DURATION_S = 30 * 86_400.0


@dataclass(frozen=True, kw_only=True)
class EndpointConfig:
    """Where requests go. ``base_url = "sim"`` starts the built-in simulator in-process;
    without one, ``$OPENAI_BASE_URL`` or OpenAI's API (``default_base_url``).

    With several endpoints (``[[endpoints]]``) each has a ``name`` (recorded with every answer),
    a ``weight`` (its share when all have room) and optionally its own ``rpm``, ``tpm`` and
    ``concurrency`` (else the job's ``[limits]``).
    """

    name: str = "default"
    base_url: str = field(default_factory=default_base_url)
    api_key_env: str = "OPENAI_API_KEY"
    headers: Mapping[str, str] = field(default_factory=dict)
    weight: float = 1.0
    rpm: float | None = None
    tpm: float | None = None
    concurrency: int | None = None

    @property
    def is_sim(self) -> bool:
        return self.base_url == SIM


@dataclass(frozen=True, kw_only=True)
class VariantConfig:
    """One arm of a sweep (``[[variants]]``): every input line runs once per variant.

    ``request`` holds request fields (model, temperature, seed, n, ...) that win over the job's
    ``[request]`` defaults and over the line's own fields. ``system``, when set, replaces the
    line's system message (or is put first when the line has none); ``""`` removes it.
    ``endpoints`` names the ``[[endpoints]]`` its requests may go to (all of them when empty).
    """

    name: str
    request: Mapping[str, Any] = field(default_factory=dict)
    system: str | None = None
    endpoints: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """Concurrency and rate limits. ``None`` means no client-side limit (the server's
    ``x-ratelimit-*`` headers still apply). ``encoding`` names the tiktoken encoding for token
    estimates (``o200k_base`` or ``cl100k_base``; by default chosen from the model).
    ``max_response_bytes`` caps one answer's size once decoded: a larger one is an error
    record (``response_too_large``), read no further."""

    concurrency: int = 64
    rpm: float | None = None
    tpm: float | None = None
    encoding: str | None = None
    max_cost_usd: float | None = None
    max_response_bytes: int = 32 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class RetryConfig:
    """The retry policy: attempts, per-attempt timeout and backoff bounds (seconds), and how
    long an outage (the endpoint unreachable) is waited out before the run stops."""

    max_attempts: int = 6
    timeout_s: float = 600.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    outage_patience_s: float = 1800.0


@dataclass(frozen=True, kw_only=True)
class ValidateConfig:
    """Structured-output checks: with ``json_schema`` on, every answer to a request with a
    ``response_format`` (a JSON schema, or ``json_object``) is checked, and an invalid one is
    asked again up to ``max_reasks`` times."""

    json_schema: bool = False
    max_reasks: int = 1


#: The engines a job can run on: this process, or a Ray cluster (``batcher.ray.driver``).
ENGINES = ("local", "ray")


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """Settings of ``engine = "ray"``: ``workers`` actors (by default one per CPU of the
    cluster), each sent blocks of ``block_rows`` requests (also the unit of crash safety: a
    block's answers are written when the whole block is done)."""

    workers: int | None = None
    block_rows: int = 500


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """A whole job: input, output, endpoint, request defaults, limits, retry policy.

    ``request`` holds defaults merged under every input line (the line wins); ``variants``, when
    given, run every line once per variant, each with its overrides. ``sim`` holds
    simulator settings used when the endpoint is ``"sim"``. ``grace_s`` is how long requests in
    flight may finish after Ctrl+C or SIGTERM. ``engine`` is ``"local"`` (this process) or
    ``"ray"`` (Ray Data; settings in ``ray``).
    """

    name: str = "batch"
    input: Path | None = None
    output: Path | None = None
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    endpoints: tuple[EndpointConfig, ...] = ()  # [[endpoints]]; endpoint is the first of them
    request: Mapping[str, Any] = field(default_factory=dict)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    sim: Mapping[str, Any] = field(default_factory=dict)
    pricing: Mapping[str, Any] = field(default_factory=dict)
    variants: tuple[VariantConfig, ...] = ()  # [[variants]]; none: every line runs once
    progress: bool = True
    grace_s: float = 10.0
    engine: str = "local"
    ray: RayConfig = field(default_factory=RayConfig)

    def require_paths(self) -> tuple[Path, Path]:
        """Return (input, output), or fail naming the one that is missing."""
        if self.input is None:
            raise ConfigError("job.input", "no input file (set it in the job or pass --input)")
        if self.output is None:
            raise ConfigError("job.output", "no output file (set it in the job or pass --output)")
        return self.input, self.output

    @property
    def all_endpoints(self) -> tuple[EndpointConfig, ...]:
        """Every endpoint requests may go to (the one ``[endpoint]``, or ``[[endpoints]]``)."""
        return self.endpoints or (self.endpoint,)

    @property
    def counts_tokens(self) -> bool:
        """Whether prompts are counted as they are read: a TPM limit meters them, and
        ``max_cost_usd`` reserves each request's worst case. Otherwise they are counted only
        if a server announces a token limit (the engine counts them then)."""
        return (
            self.limits.tpm is not None
            or self.limits.max_cost_usd is not None
            or any(e.tpm is not None for e in self.all_endpoints)
        )


_SECTIONS = {
    "job", "endpoint", "endpoints", "request", "limits", "retry", "validate", "sim", "pricing",
    "variants",
    "ray",
}  # fmt: skip
_ENDPOINT_KEYS = {f.name for f in dataclasses.fields(EndpointConfig)}
#: The keys ``with_overrides`` accepts (one per ``batcher run`` flag that overrides the job).
OVERRIDES = frozenset(
    {"input", "output", "model", "base_url", "concurrency", "rpm", "tpm", "max_attempts",
     "timeout_s", "progress", "grace_s", "max_cost_usd", "validate_schema", "max_reasks",
     "engine", "ray_workers"}
)  # fmt: skip


def load_job(path: str | os.PathLike[str]) -> JobConfig:
    """Read and validate a job file."""
    import tomllib  # here: a run given by flags alone does without it (4 ms at start-up)

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("job", f"job file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("job", f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("job", f"{path} is not valid TOML: {exc}") from None
    return job_from_dict(raw, base_dir=path.resolve().parent)


def job_from_dict(raw: Mapping[str, Any], *, base_dir: Path | None = None) -> JobConfig:
    """Build a job from the parsed TOML tables (also the Python API's entry point)."""
    _no_unknown(raw, _SECTIONS, where="")
    job_t = _table(raw, "job")
    endpoint_t = _table(raw, "endpoint")
    limits_t = _table(raw, "limits")
    retry_t = _table(raw, "retry")
    validate_t = _table(raw, "validate")
    request = _table(raw, "request")
    sim = _table(raw, "sim")
    pricing = _table(raw, "pricing")
    ray_t = _table(raw, "ray")

    _no_unknown(job_t, {"name", "input", "output", "progress", "grace_s", "engine"}, where="job")
    _no_unknown(ray_t, {f.name for f in dataclasses.fields(RayConfig)}, where="ray")
    _no_unknown(endpoint_t, {"base_url", "api_key_env", "headers"}, where="endpoint")
    endpoints = _endpoints(raw)
    if endpoints and endpoint_t:
        raise ConfigError("endpoints", "give either [endpoint] or [[endpoints]], not both")
    _no_unknown(limits_t, {f.name for f in dataclasses.fields(LimitsConfig)}, where="limits")
    _no_unknown(retry_t, {f.name for f in dataclasses.fields(RetryConfig)}, where="retry")
    _no_unknown(validate_t, {f.name for f in dataclasses.fields(ValidateConfig)}, where="validate")
    check_request_fields(request, where="request")

    def path_of(key: str) -> Path | None:
        value = job_t.get(key)
        if value is None:
            return None
        text = _typed(job_t, key, str, "job")
        if text == "-":
            return Path("-")
        p = Path(text).expanduser()
        return p if p.is_absolute() or base_dir is None else Path(os.path.normpath(base_dir / p))

    endpoint = endpoints[0] if endpoints else _endpoint(endpoint_t, "endpoint")
    job = JobConfig(
        name=_typed(job_t, "name", str, "job", "batch"),
        input=path_of("input"),
        output=path_of("output"),
        endpoint=endpoint,
        endpoints=endpoints,
        request=dict(request),
        limits=LimitsConfig(**{k: limits_t[k] for k in limits_t}),
        retry=RetryConfig(**{k: retry_t[k] for k in retry_t}),
        validate=ValidateConfig(**{k: validate_t[k] for k in validate_t}),
        sim=dict(sim),
        pricing=dict(pricing),
        variants=_variants(raw),
        progress=_typed(job_t, "progress", bool, "job", True),
        grace_s=job_t.get("grace_s", 10.0),
        engine=job_t.get("engine", "local"),
        ray=RayConfig(**{k: ray_t[k] for k in ray_t}),
    )
    validate(job)
    return job


def with_overrides(job: JobConfig, **flags: Any) -> JobConfig:
    """Apply command-line flags (``None`` means "not given") over a job, then validate.

    Accepted keys: ``OVERRIDES``.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    unknown = set(given) - OVERRIDES
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown override")
    if "base_url" in given and job.endpoints:
        raise ConfigError("--base-url", "the job lists [[endpoints]]: set base_url there")
    if given.get("ray_workers") is not None and given.get("engine", job.engine) != "ray":
        raise ConfigError("--ray-workers", 'only with --engine ray (or [job] engine = "ray")')
    request = dict(job.request)
    if "model" in given:
        request["model"] = given["model"]
    job = dataclasses.replace(
        job,
        input=Path(given["input"]) if "input" in given else job.input,
        output=Path(given["output"]) if "output" in given else job.output,
        request=request,
        progress=given.get("progress", job.progress),
        grace_s=given.get("grace_s", job.grace_s),
        engine=given.get("engine", job.engine),
        ray=dataclasses.replace(job.ray, workers=given.get("ray_workers", job.ray.workers)),
        endpoint=dataclasses.replace(
            job.endpoint, base_url=given.get("base_url", job.endpoint.base_url)
        ),
        limits=dataclasses.replace(
            job.limits,
            **{k: given[k] for k in ("concurrency", "rpm", "tpm", "max_cost_usd") if k in given},
        ),
        retry=dataclasses.replace(
            job.retry,
            **{k: given[k] for k in ("max_attempts", "timeout_s") if k in given},
        ),
        validate=dataclasses.replace(
            job.validate,
            json_schema=given.get("validate_schema", job.validate.json_schema),
            max_reasks=given.get("max_reasks", job.validate.max_reasks),
        ),
    )
    validate(job)
    return job


def validate(job: JobConfig) -> None:
    """Check every value of a job; raise ``ConfigError`` naming the first bad field."""
    lim, ret = job.limits, job.retry
    _check_number(job.grace_s, "job.grace_s", positive=False, maximum=MAX_DURATION_S)
    if job.grace_s < 0:
        raise ConfigError("job.grace_s", f"must be >= 0, got {job.grace_s!r}")
    _check_int(lim.concurrency, "limits.concurrency", minimum=1, maximum=MAX_CONCURRENCY)
    if job.engine not in ENGINES:
        raise ConfigError("job.engine", f'must be "local" or "ray", got {job.engine!r}')
    if job.ray.workers is not None:
        _check_int(job.ray.workers, "ray.workers", minimum=1)
    _check_int(job.ray.block_rows, "ray.block_rows", minimum=1)
    if lim.encoding is not None and lim.encoding not in ENCODINGS:
        raise ConfigError("limits.encoding", f"must be one of {', '.join(ENCODINGS)}")
    for name in ("rpm", "tpm", "max_cost_usd"):
        value = getattr(lim, name)
        if value is not None:
            _check_number(value, f"limits.{name}", positive=True)
    _check_int(lim.max_response_bytes, "limits.max_response_bytes", minimum=1024)
    _check_int(ret.max_attempts, "retry.max_attempts", minimum=1)
    if not isinstance(job.validate.json_schema, bool):
        raise ConfigError(
            "validate.json_schema", f"must be true or false, got {job.validate.json_schema!r}"
        )
    _check_int(job.validate.max_reasks, "validate.max_reasks", minimum=0)
    _check_number(ret.timeout_s, "retry.timeout_s", positive=True, maximum=MAX_TIMEOUT_S)
    for name in ("backoff_initial_s", "backoff_max_s", "outage_patience_s"):
        _check_number(getattr(ret, name), f"retry.{name}", positive=True, maximum=MAX_DURATION_S)
    if ret.backoff_max_s < ret.backoff_initial_s:
        raise ConfigError("retry.backoff_max_s", "must be >= retry.backoff_initial_s")
    for i, endpoint in enumerate(job.all_endpoints):
        where = f"endpoints[{i}]" if job.endpoints else "endpoint"
        url = endpoint.base_url
        if url != SIM and not url.startswith(("http://", "https://")):
            source = f" (from ${BASE_URL_ENV})" if url == os.environ.get(BASE_URL_ENV) else ""
            raise ConfigError(
                f"{where}.base_url",
                f'must start with http:// or https:// or be "sim", got {redact_url(url)!r}{source}',
            )
    if job.endpoints and len({e.name for e in job.endpoints}) < len(job.endpoints):
        raise ConfigError("endpoints", "every endpoint needs a name of its own")
    check_request_fields(job.request, where="request")
    _check_variants(job)
    parse_pricing(job.pricing)  # the [sim] table is checked by the simulator, as it starts


#: A variant name: it is written into every record and shown in tables, so kept plain.
_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Keys of a ``[[variants]]`` entry that are not request fields.
_VARIANT_KEYS = {"name", "system", "endpoint"}
#: Request fields a variant may not set: they belong to the line, not to a sweep.
_LINE_ONLY = {"messages", "prompt", "custom_id", "id", "metadata"}
#: Names a variant may hold by mistake (a job table, or "endpoints" for "endpoint"): they would
#: otherwise be sent to the server as request fields.
_NOT_REQUEST = {
    "endpoints": "did you mean endpoint (an endpoint name or a list of them)?",
    **{table: "is a table of the job, not a request field" for table in (
        "job", "endpoint", "request", "limits", "retry", "validate", "sim", "pricing", "ray",
        "variants")},
}  # fmt: skip


def _variants(raw: Mapping[str, Any]) -> tuple[VariantConfig, ...]:
    """The ``[[variants]]`` list: a name, request overrides, a system prompt, endpoints."""
    listed = raw.get("variants", [])
    if not isinstance(listed, list) or not all(isinstance(t, dict) for t in listed):
        raise ConfigError("variants", "must be a list of tables ([[variants]])")
    variants = []
    for i, table in enumerate(listed):
        where = f"variants[{i}]"
        if "name" not in table:
            raise ConfigError(f"{where}.name", "every variant needs a name")
        endpoint = table.get("endpoint", [])
        names = [endpoint] if isinstance(endpoint, str) else endpoint
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{where}.endpoint", "must be an endpoint name or a list of them")
        variants.append(
            VariantConfig(
                name=table["name"],
                request={k: v for k, v in table.items() if k not in _VARIANT_KEYS},
                system=table.get("system"),
                endpoints=tuple(names),
            )
        )
    return tuple(variants)


def _check_variants(job: JobConfig) -> None:
    """Names unique and plain, fields well typed, endpoints known: before anything is sent."""
    known = [e.name for e in job.all_endpoints]
    seen: set[str] = set()
    for i, variant in enumerate(job.variants):
        where = f"variants[{i}]"
        name = variant.name
        if not isinstance(name, str) or not _VARIANT_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}.name",
                "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                f"digit, got {name!r}",
            )
        if name in seen:
            raise ConfigError(f"{where}.name", f"{name!r} is used by an earlier variant")
        seen.add(name)
        for key in variant.request:
            if key in _LINE_ONLY:
                raise ConfigError(f"{where}.{key}", "belongs to the input lines, not a variant")
            if key in _NOT_REQUEST:
                raise ConfigError(f"{where}.{key}", _NOT_REQUEST[key])
        check_request_fields(variant.request, where=where)
        if variant.system is not None and not isinstance(variant.system, str):
            raise ConfigError(f"{where}.system", f"must be a string, got {variant.system!r}")
        for endpoint in variant.endpoints:
            if endpoint not in known:
                raise ConfigError(
                    f"{where}.endpoint",
                    f"no endpoint named {endpoint!r} (the job has: {', '.join(known)})",
                )


def _endpoints(raw: Mapping[str, Any]) -> tuple[EndpointConfig, ...]:
    """The ``[[endpoints]]`` list, each checked and named (``endpoint-N`` by default)."""
    listed = raw.get("endpoints", [])
    if not isinstance(listed, list) or not all(isinstance(t, dict) for t in listed):
        raise ConfigError("endpoints", "must be a list of tables ([[endpoints]])")
    return tuple(_endpoint(t, f"endpoints[{i}]", i + 1) for i, t in enumerate(listed))


def _endpoint(table: dict[str, Any], where: str, number: int = 0) -> EndpointConfig:
    if number:
        _no_unknown(table, _ENDPOINT_KEYS, where=where)
    headers = table.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigError(f"{where}.headers", "must be a table of string values")
    for name, value in headers.items():
        # A stray newline (a value pasted with its line end) would fail every request; the
        # value is not quoted: a header may carry a key.
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(f"{where}.headers", f"{name!r} is not a valid header name")
        if not value.isprintable() or value != value.strip():
            raise ConfigError(
                f"{where}.headers.{name}",
                "the value contains control characters or surrounding whitespace (a stray "
                "newline?); the value is not shown",
            )
    for name in ("weight", "rpm", "tpm"):
        if table.get(name) is not None:
            _check_number(table[name], f"{where}.{name}", positive=True)
    if table.get("concurrency") is not None:
        _check_int(table["concurrency"], f"{where}.concurrency", minimum=1, maximum=MAX_CONCURRENCY)
    base_url = _typed(table, "base_url", str, where)
    return EndpointConfig(
        name=_typed(table, "name", str, where, f"endpoint-{number}" if number else "default"),
        base_url=default_base_url() if base_url is None else base_url,
        api_key_env=_typed(table, "api_key_env", str, where, "OPENAI_API_KEY"),
        headers=dict(headers),
        weight=float(table.get("weight", 1.0)),
        rpm=table.get("rpm"),
        tpm=table.get("tpm"),
        concurrency=table.get("concurrency"),
    )


def _table(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(name, "must be a table")
    return value


def _no_unknown(table: Mapping[str, Any], known: set[str], *, where: str) -> None:
    for key in table:
        if key not in known:
            name = f"{where}.{key}" if where else key
            raise ConfigError(name, f"unknown key (expected one of: {', '.join(sorted(known))})")


def _typed(table: Mapping[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    value = table.get(key, default)
    if value is not None and (
        not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}.{key}", f"must be {kind.__name__}, got {value!r}")
    return value


def _check_int(value: Any, name: str, *, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be at most {maximum:,}, got {value:,}")


def _check_number(value: Any, name: str, *, positive: bool, maximum: float | None = None) -> None:
    """A finite number (``inf`` and ``nan`` cannot work anywhere: timers overflow, rates and
    caps never bind), ``> 0`` if ``positive``, at most ``maximum`` if given."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(name, f"must be > 0, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be at most {maximum:g}, got {value!r}")
