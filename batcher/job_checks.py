"""Checking a job: every value of a ``JobConfig`` in range and well typed, before anything is sent.

A bad value fails with an error that names the field (``limits.concurrency: must be an integer
>= 1, got 0``). ``batcher.job_file`` calls ``validate`` on every job it builds.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from batcher.config import (
    BASE_URL_ENV,
    ENGINES,
    MAX_CONCURRENCY,
    MAX_DURATION_S,
    MAX_TIMEOUT_S,
    MODES,
    SIM,
    UNANSWERED,
    JobConfig,
)
from batcher.cost.pricing import parse_pricing
from batcher.cost.tokens import ENCODINGS
from batcher.errors import ConfigError
from batcher.http.headers import BAD_VALUE, is_header_name, is_header_value
from batcher.http.redact import redact_url
from batcher.input.requests import check_request_fields

#: The forms ``input_format`` names (standard input's: it has no suffix to say it).
INPUT_FORMATS = ("jsonl", "csv", "tsv", "parquet")


def validate(job: JobConfig) -> None:
    """Check every value of a job; raise ``ConfigError`` naming the first bad field."""
    lim, ret = job.limits, job.retry
    check_number(job.grace_s, "job.grace_s", positive=False, maximum=MAX_DURATION_S)
    if job.grace_s < 0:
        raise ConfigError("job.grace_s", f"must be >= 0, got {job.grace_s!r}")
    check_int(lim.concurrency, "limits.concurrency", minimum=1, maximum=MAX_CONCURRENCY)
    if job.input_format is not None and job.input_format not in INPUT_FORMATS:
        raise ConfigError(
            "job.input_format",
            f"must be one of {', '.join(INPUT_FORMATS)}, got {job.input_format!r}",
        )
    if job.engine not in ENGINES:
        raise ConfigError("job.engine", f'must be "local" or "ray", got {job.engine!r}')
    if job.ray.workers is not None:
        check_int(job.ray.workers, "ray.workers", minimum=1)
    check_int(job.ray.block_rows, "ray.block_rows", minimum=1)
    _check_batch(job)
    if lim.encoding is not None and lim.encoding not in ENCODINGS:
        raise ConfigError("limits.encoding", f"must be one of {', '.join(ENCODINGS)}")
    for name in ("rpm", "tpm", "max_cost_usd"):
        value = getattr(lim, name)
        if value is not None:
            check_number(value, f"limits.{name}", positive=True)
    check_int(lim.max_response_bytes, "limits.max_response_bytes", minimum=1024)
    check_int(ret.max_attempts, "retry.max_attempts", minimum=1)
    if not isinstance(job.validate.json_schema, bool):
        raise ConfigError(
            "validate.json_schema", f"must be true or false, got {job.validate.json_schema!r}"
        )
    check_int(job.validate.max_reasks, "validate.max_reasks", minimum=0)
    check_number(ret.timeout_s, "retry.timeout_s", positive=True, maximum=MAX_TIMEOUT_S)
    for name in ("backoff_initial_s", "backoff_max_s", "outage_patience_s"):
        check_number(getattr(ret, name), f"retry.{name}", positive=True, maximum=MAX_DURATION_S)
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
        if url != SIM:
            check_url_address(url, f"{where}.base_url")
        check_headers(endpoint.headers, where)
    if job.endpoints and len({e.name for e in job.endpoints}) < len(job.endpoints):
        raise ConfigError("endpoints", "every endpoint needs a name of its own")
    check_request_fields(job.request, where="request")
    _check_variants(job)
    _check_notify(job)
    parse_pricing(job.pricing)  # the [sim] table is checked by the simulator, as it starts


def check_headers(headers: object, where: str) -> None:
    """An endpoint's ``headers``: string names and values that can be sent. A stray newline (a
    value pasted with its line end) would fail every request; the value is not quoted: a
    header may carry a key."""
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigError(f"{where}.headers", "must be a table of string values")
    for name, value in headers.items():
        if not is_header_name(name):
            raise ConfigError(f"{where}.headers", f"{name!r} is not a valid header name")
        if not is_header_value(value):
            raise ConfigError(f"{where}.headers.{name}", BAD_VALUE)


def check_url_address(url: str, where: str) -> None:
    """Refuse an http(s) URL that cannot be parsed (``http://[::1/v1``), with no host, a host
    no resolver can be asked for (spaces, ``%``, an empty label as in ``a..b``, a broken
    ``xn--`` label), or a port that is not a number 1..65535 (``http://host:70000/v1``): the
    HTTP clients would fail every request on it, each in its own way (one of them after
    waiting out an outage's patience)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # reading it checks it
    except ValueError:
        raise ConfigError(
            where, f"is not a URL with a host and a port 1..65535: {redact_url(url)!r}"
        ) from None
    if port == 0:
        raise ConfigError(where, f"the port must be a number 1..65535, got {redact_url(url)!r}")
    host = parts.hostname
    if not host or not host.isprintable() or any(c.isspace() for c in host) or _bad_host(host):
        raise ConfigError(
            where,
            f"must name a host (no spaces, no empty or broken labels), got {redact_url(url)!r}",
        )


def _bad_host(host: str) -> bool:
    """A name no resolver can be asked for: ``%`` in it, an empty or overlong label, or an
    ``xn--`` label that is no punycode. IPv6 literals (with ``:``) are left to the clients."""
    if ":" in host:
        return False
    if "%" in host:
        return True
    try:
        labels = host.rstrip(".").encode("idna").decode("ascii").split(".")
    except UnicodeError:  # an empty label (a..b, .a), one over 63 characters
        return True
    for label in labels:
        if label.lower().startswith("xn--"):
            try:
                if not label[4:].encode("ascii").decode("punycode"):
                    return True
            except UnicodeError:
                return True
    return False


def _check_notify(job: JobConfig) -> None:
    """``[notify]``: ``stall_s`` a duration; every URL one Apprise can send to (Apprise is
    imported only for a job that has some)."""
    check_number(job.notify.stall_s, "notify.stall_s", positive=True, maximum=MAX_DURATION_S)
    if job.notify.urls:
        from batcher.runner.notify import check_notify_urls

        check_notify_urls(job.notify.urls, "notify.urls")


#: A Batch API completion window: hours or days (``24h``, ``7d``).
_WINDOW = re.compile(r"[1-9][0-9]{0,3}[hd]")


def _check_batch(job: JobConfig) -> None:
    """``[job] mode`` and the ``[batch]`` table; batch mode's limits on the rest of the job."""
    if job.mode not in MODES:
        raise ConfigError("job.mode", f'must be "online" or "batch", got {job.mode!r}')
    b = job.batch
    check_int(b.max_requests, "batch.max_requests", minimum=1)
    check_int(b.max_bytes, "batch.max_bytes", minimum=1024)
    if not isinstance(b.completion_window, str) or not _WINDOW.fullmatch(b.completion_window):
        raise ConfigError(
            "batch.completion_window",
            f'must be a duration in hours or days such as "24h", got {b.completion_window!r}',
        )
    check_number(b.poll_s, "batch.poll_s", positive=True, maximum=MAX_DURATION_S)
    if b.unanswered not in UNANSWERED:
        raise ConfigError(
            "batch.unanswered", f'must be "resubmit" or "online", got {b.unanswered!r}'
        )
    if job.mode != "batch":
        return
    if job.engine == "ray":
        raise ConfigError(
            "job.mode", 'batch mode runs in this process: use engine "local" (not --engine ray)'
        )
    if job.endpoints:
        raise ConfigError(
            "endpoints", "batch mode sends to one endpoint: give [endpoint], not [[endpoints]]"
        )


#: A variant name: it is written into every record and shown in tables, so kept plain.
_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Request fields a variant may not set: they belong to the line, not to a sweep.
_LINE_ONLY = {"messages", "prompt", "custom_id", "id", "metadata"}
#: Names a variant may hold by mistake (a job table, or "endpoints" for "endpoint"): they would
#: otherwise be sent to the server as request fields.
_NOT_REQUEST = {
    "endpoints": "did you mean endpoint (an endpoint name or a list of them)?",
    **{table: "is a table of the job, not a request field" for table in (
        "job", "endpoint", "request", "limits", "retry", "validate", "sim", "pricing", "ray",
        "batch", "variants", "notify")},
}  # fmt: skip


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


def check_int(value: Any, name: str, *, minimum: int, maximum: int | None = None) -> None:
    """An integer (not a bool) ``>= minimum``, at most ``maximum`` if given."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be at most {maximum:,}, got {value:,}")


def check_number(value: Any, name: str, *, positive: bool, maximum: float | None = None) -> None:
    """A finite number (``inf`` and ``nan`` cannot work anywhere: timers overflow, rates and
    caps never bind), ``> 0`` if ``positive``, at most ``maximum`` if given."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(name, f"must be > 0, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be at most {maximum:g}, got {value!r}")
