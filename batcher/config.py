"""The job's model: frozen dataclasses for a job and its parts, and the bounds on their values.

Most modules take a ``JobConfig`` (or a part of it) and read it; nothing here reads a file.
A job is built and checked by ``batcher.job_file`` (``load_job``, ``job_from_dict``,
``with_overrides``), which checks every value with ``batcher.job_checks.validate``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from batcher.errors import ConfigError

SIM = "sim"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: The variable that gives the base URL when neither a flag nor the job does (as the openai
#: SDK and most tools read it).
BASE_URL_ENV = "OPENAI_BASE_URL"
#: The HTTP client an endpoint uses unless it names another (``EndpointConfig.http``).
DEFAULT_HTTP_CLIENT = "httptools"


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

    ``http`` is the HTTP client under the requests: ``"httptools"`` (the default: batcher's
    own keep-alive HTTP/1.1 client on httptools' parser, the least CPU a request),
    ``"aiohttp"``, or ``"pyreqwest"`` (Rust's reqwest, from the ``native`` extra); see
    DESIGN_NOTES, *HTTP clients*.
    """

    name: str = "default"
    base_url: str = field(default_factory=default_base_url)
    api_key_env: str = "OPENAI_API_KEY"
    headers: Mapping[str, str] = field(default_factory=dict)
    weight: float = 1.0
    rpm: float | None = None
    tpm: float | None = None
    concurrency: int | None = None
    http: str = DEFAULT_HTTP_CLIENT

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
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0
    outage_patience_s: float = 1800.0


@dataclass(frozen=True, kw_only=True)
class ValidateConfig:
    """Structured-output checks: with ``json_schema`` on, every answer to a request with a
    ``response_format`` (a JSON schema, or ``json_object``) is checked, and an invalid one is
    asked again up to ``max_reasks`` times."""

    json_schema: bool = False
    max_reasks: int = 1


@dataclass(frozen=True, kw_only=True)
class TemplateConfig:
    """How a row of a table (CSV, TSV, Parquet, JSONL rows) becomes a request (``[template]``).

    ``user`` is the user message with ``{column}`` placeholders (``{{``/``}}`` for braces);
    ``system`` an optional system message, likewise; ``id_column`` the column holding each
    row's id (else the row number).
    """

    user: str
    system: str | None = None
    id_column: str | None = None


#: Seconds without a finished request before a run is reported stalled (``[notify] stall_s``).
DEFAULT_STALL_S = 900.0


@dataclass(frozen=True, kw_only=True)
class NotifyConfig:
    """Where a run's notices go (``[notify]``, ``--notify``): Apprise URLs (``json://``,
    ``slack://``, ``mailto://``, ``ntfy://``...), told when the run finishes, stops early,
    stalls (no request finished for ``stall_s`` seconds) or has spent 80% of ``--max-cost``.
    The URLs hold tokens: secrets, never printed or written (``batcher.runner.notify``)."""

    urls: tuple[str, ...] = ()
    stall_s: float = DEFAULT_STALL_S


#: The engines a job can run on: this process, or a Ray cluster (``batcher.ray.driver``).
ENGINES = ("local", "ray")


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """Settings of ``engine = "ray"``: ``workers`` actors (by default one per CPU of the
    cluster), each sent blocks of ``block_rows`` requests (also the unit of crash safety: a
    block's answers are written when the whole block is done)."""

    workers: int | None = None
    block_rows: int = 500


#: How a job's requests are sent: one by one (``online``), or as Batch API files (``batch``).
MODES = ("online", "batch")
#: What a batch job does with requests a batch did not answer (expired or cancelled).
UNANSWERED = ("resubmit", "online")


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """Settings of ``mode = "batch"`` (``[batch]``): lines and bytes per batch input file,
    the window each batch asks for, seconds between two polls, and what becomes of requests a
    batch did not answer (``resubmit`` in a later batch, or send them ``online``)."""

    max_requests: int = 50_000
    max_bytes: int = 190 * 1000 * 1000
    completion_window: str = "24h"
    poll_s: float = 30.0
    unanswered: str = "resubmit"


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """A whole job: input, output, endpoint, request defaults, limits, retry policy.

    ``request`` holds defaults merged under every input line (the line wins); ``variants``, when
    given, run every line once per variant, each with its overrides. ``sim`` holds
    simulator settings used when the endpoint is ``"sim"``. ``grace_s`` is how long requests in
    flight may finish after Ctrl+C or SIGTERM. ``engine`` is ``"local"`` (this process) or
    ``"ray"`` (Ray Data; settings in ``ray``). ``mode`` is ``"online"`` or ``"batch"`` (the
    Batch API; settings in ``batch``). ``template``, when set, reads the input as a table
    whose rows it renders into requests. ``system`` is a system message put first in every
    request that has none (the line's own, the template's or a variant's wins).
    ``split_errors`` writes failed requests to ``OUTPUT.errors.jsonl`` instead of the output.
    ``notify`` says where notices of the run go. ``input_format`` is the form of standard
    input (``jsonl``, ``csv``, ``tsv``, ``parquet``), which has no suffix to say it.
    """

    name: str = "batch"
    input: Path | str | None = None  # a str: an object-storage URI (``storage``)
    output: Path | str | None = None
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
    mode: str = "online"
    batch: BatchConfig = field(default_factory=BatchConfig)
    template: TemplateConfig | None = None
    system: str | None = None
    split_errors: bool = False
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    input_format: str | None = None

    def require_paths(self) -> tuple[Path, Path]:
        """Return (input, output), or fail naming the one that is missing."""
        if self.input is None:
            raise ConfigError("job.input", "no input file (set it in the job or pass --input)")
        if self.output is None:
            raise ConfigError("job.output", "no output file (set it in the job or pass --output)")
        for name, given in (("job.input", self.input), ("job.output", self.output)):
            if isinstance(given, str):
                from batcher.storage import shown

                raise ConfigError(name, f"{shown(given)}: object storage is not read here")
        return cast(Path, self.input), cast(Path, self.output)

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
