"""Building a job: from a job file (``load_job``), from its parsed tables (``job_from_dict``),
and with command-line flags over it (``with_overrides``); each result is checked (``validate``).

Relative paths in a job file are resolved against the job file's folder, so a job runs the same
from any working directory; paths given as flags are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batcher.config import (
    DEFAULT_HTTP_CLIENT,
    MAX_CONCURRENCY,
    BatchConfig,
    EndpointConfig,
    JobConfig,
    LimitsConfig,
    NotifyConfig,
    RayConfig,
    RetryConfig,
    TemplateConfig,
    ValidateConfig,
    VariantConfig,
    default_base_url,
)
from batcher.errors import ConfigError
from batcher.input.requests import check_request_fields
from batcher.job_checks import check_headers, check_int, check_number, validate
from batcher.storage import is_uri, location

_SECTIONS = {
    "job", "endpoint", "endpoints", "request", "limits", "retry", "validate", "sim", "pricing",
    "variants",
    "ray", "batch", "template", "notify",
}  # fmt: skip
_ENDPOINT_KEYS = {f.name for f in dataclasses.fields(EndpointConfig)}
#: The keys ``with_overrides`` accepts (one per ``batcher run`` flag that overrides the job).
OVERRIDES = frozenset(
    {"input", "output", "model", "base_url", "http", "concurrency", "rpm", "tpm", "max_attempts",
     "timeout_s", "progress", "grace_s", "max_cost_usd", "validate_schema", "max_reasks",
     "engine", "ray_workers", "mode", "detach", "cancel", "template_user", "template_system",
     "id_column", "system", "max_tokens", "temperature", "params", "split_errors", "notify",
     "input_format"}
)  # fmt: skip


def load_job(path: str | os.PathLike[str]) -> JobConfig:
    """Read and validate a job file."""
    import tomllib  # here: a run given by flags alone does without it (4 ms at start-up)

    path = Path(path)
    _refuse_data_as_job(path)
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
    batch_t = _table(raw, "batch")

    job_keys = {"name", "input", "output", "progress", "grace_s", "engine", "mode", "system",
                "split_errors", "input_format"}  # fmt: skip
    _no_unknown(job_t, job_keys, where="job")
    _no_unknown(batch_t, {f.name for f in dataclasses.fields(BatchConfig)}, where="batch")
    _no_unknown(ray_t, {f.name for f in dataclasses.fields(RayConfig)}, where="ray")
    _no_unknown(endpoint_t, {"base_url", "api_key_env", "headers", "http"}, where="endpoint")
    endpoints = _endpoints(raw)
    if endpoints and endpoint_t:
        raise ConfigError("endpoints", "give either [endpoint] or [[endpoints]], not both")
    _no_unknown(limits_t, {f.name for f in dataclasses.fields(LimitsConfig)}, where="limits")
    _no_unknown(retry_t, {f.name for f in dataclasses.fields(RetryConfig)}, where="retry")
    _no_unknown(validate_t, {f.name for f in dataclasses.fields(ValidateConfig)}, where="validate")
    check_request_fields(request, where="request")

    def path_of(key: str) -> Path | str | None:
        value = job_t.get(key)
        if value is None:
            return None
        text = _typed(job_t, key, str, "job")
        if text == "-" or is_uri(text):
            return location(text)
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
        mode=job_t.get("mode", "online"),
        batch=BatchConfig(**{k: batch_t[k] for k in batch_t}),
        template=_template(_table(raw, "template")),
        system=_typed(job_t, "system", str, "job"),
        split_errors=_typed(job_t, "split_errors", bool, "job", False),
        notify=_notify(_table(raw, "notify")),
        input_format=_typed(job_t, "input_format", str, "job"),
    )
    validate(job)
    return job


def _template(table: Mapping[str, Any]) -> TemplateConfig | None:
    """The ``[template]`` table (``None`` when absent): ``user`` required, all strings."""
    if not table:
        return None
    _no_unknown(table, {"user", "system", "id_column"}, where="template")
    user = _typed(table, "user", str, "template")
    if not user:
        raise ConfigError("template.user", "required: the user message, with {column} fields")
    return TemplateConfig(
        user=user,
        system=_typed(table, "system", str, "template"),
        id_column=_typed(table, "id_column", str, "template"),
    )


def _notify(table: Mapping[str, Any]) -> NotifyConfig:
    """The ``[notify]`` table: ``urls`` (Apprise URLs) and ``stall_s``."""
    _no_unknown(table, {f.name for f in dataclasses.fields(NotifyConfig)}, where="notify")
    urls = table.get("urls", [])
    if not isinstance(urls, list):
        raise ConfigError(
            "notify.urls", 'must be a list of Apprise URLs, e.g. ["json://host/path"]'
        )
    return NotifyConfig(urls=tuple(urls), stall_s=table.get("stall_s", NotifyConfig.stall_s))


#: Suffixes of inputs and outputs: a file named with one is data, never a job file.
_DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".csv", ".tsv", ".csv.gz", ".tsv.gz", ".parquet")


def _refuse_data_as_job(path: Path) -> None:
    """An input or output given where the job file goes (``batcher run prompts.jsonl``) is
    named as such, not parsed as TOML ("Invalid statement (at line 1, column 1)")."""
    if path.name.lower().endswith(_DATA_SUFFIXES):
        raise ConfigError(
            "job",
            f"{path} is data, not a job file (TOML): give an input with --input (a job "
            "file is optional when --input, --output and --model are given)",
        )


def with_overrides(job: JobConfig, **flags: Any) -> JobConfig:
    """Apply command-line flags (``None`` means "not given") over a job, then validate.

    Accepted keys: ``OVERRIDES``. ``detach`` and ``cancel`` (batch mode's ``--detach`` and
    ``--cancel``) are run options, not job settings: they are accepted here, checked against
    the mode, and passed to the runner by the caller. ``notify`` (a list of Apprise URLs,
    ``--notify``) replaces the job's ``[notify] urls``.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    unknown = set(given) - OVERRIDES
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown override")
    if "base_url" in given and job.endpoints:
        raise ConfigError("--base-url", "the job lists [[endpoints]]: set base_url there")
    _refuse_limits_no_endpoint_takes(job, given)
    if "http" in given:
        check_http(given["http"], "--http")
    if given.get("ray_workers") is not None and given.get("engine", job.engine) != "ray":
        raise ConfigError("--ray-workers", 'only with --engine ray (or [job] engine = "ray")')
    mode = given.get("mode", job.mode)
    for flag in ("detach", "cancel"):
        if given.get(flag) and mode != "batch":
            raise ConfigError(f"--{flag}", 'only with --mode batch (or [job] mode = "batch")')
    if given.get("detach") and given.get("cancel"):
        raise ConfigError("--cancel", "cannot be given with --detach")
    request = dict(job.request)
    request.update(given.get("params") or {})
    for name in ("model", "max_tokens", "temperature"):
        if name in given:
            request[name] = given[name]
    check_request_fields(request, where="request")
    job = dataclasses.replace(
        job,
        input=location(given["input"]) if "input" in given else job.input,
        output=location(given["output"]) if "output" in given else job.output,
        request=request,
        progress=given.get("progress", job.progress),
        grace_s=given.get("grace_s", job.grace_s),
        engine=given.get("engine", job.engine),
        mode=mode,
        ray=dataclasses.replace(job.ray, workers=given.get("ray_workers", job.ray.workers)),
        endpoint=dataclasses.replace(
            job.endpoint,
            base_url=given.get("base_url", job.endpoint.base_url),
            http=given.get("http", job.endpoint.http),
        ),
        endpoints=tuple(dataclasses.replace(e, http=given["http"]) for e in job.endpoints)
        if "http" in given
        else job.endpoints,
        limits=dataclasses.replace(
            job.limits,
            **{k: given[k] for k in ("concurrency", "rpm", "tpm", "max_cost_usd") if k in given},
        ),
        template=_template_over(job.template, given),
        system=given.get("system", job.system),
        split_errors=given.get("split_errors", job.split_errors),
        notify=_notify_over(job.notify, given),
        input_format=given.get("input_format", job.input_format),
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


def _refuse_limits_no_endpoint_takes(job: JobConfig, given: Mapping[str, Any]) -> None:
    """Refuse ``--concurrency``, ``--rpm`` or ``--tpm`` when every ``[[endpoints]]`` entry
    sets its own: the flag sets ``[limits]``, which only endpoints without their own take, so
    it would change nothing."""
    for name in ("concurrency", "rpm", "tpm"):
        taken = any(getattr(e, name) is None for e in job.endpoints)
        if name in given and job.endpoints and not taken:
            raise ConfigError(
                f"--{name}",
                f"every [[endpoints]] entry sets its own {name}, which wins over the job's: "
                "set it there",
            )


def _notify_over(notify: NotifyConfig, given: Mapping[str, Any]) -> NotifyConfig:
    """The job's ``[notify]`` with the ``notify`` override's URLs (checked as ``--notify``)."""
    if "notify" not in given:
        return notify
    from batcher.runner.notify import check_notify_urls

    return dataclasses.replace(notify, urls=check_notify_urls(given["notify"], "--notify"))


def _template_over(
    template: TemplateConfig | None, given: Mapping[str, Any]
) -> TemplateConfig | None:
    """The job's template with ``template_user``/``template_system``/``id_column`` over it."""
    user = given.get("template_user", None if template is None else template.user)
    if user is None:
        for flag in ("template_system", "id_column"):
            if flag in given:
                raise ConfigError(
                    f"--{flag.replace('_', '-')}", "needs a template (--template-user)"
                )
        return template
    return TemplateConfig(
        user=user,
        system=given.get("template_system", None if template is None else template.system),
        id_column=given.get("id_column", None if template is None else template.id_column),
    )


#: Keys of a ``[[variants]]`` entry that are not request fields.
_VARIANT_KEYS = {"name", "system", "endpoint"}


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
    check_headers(headers, where)
    for name in ("weight", "rpm", "tpm"):
        if table.get(name) is not None:
            check_number(table[name], f"{where}.{name}", positive=True)
    if table.get("concurrency") is not None:
        check_int(table["concurrency"], f"{where}.concurrency", minimum=1, maximum=MAX_CONCURRENCY)
    base_url = _typed(table, "base_url", str, where)
    http = _typed(table, "http", str, where, DEFAULT_HTTP_CLIENT)
    check_http(http, f"{where}.http")
    return EndpointConfig(
        name=_typed(table, "name", str, where, f"endpoint-{number}" if number else "default"),
        base_url=default_base_url() if base_url is None else base_url,
        api_key_env=_typed(table, "api_key_env", str, where, "OPENAI_API_KEY"),
        headers=dict(headers),
        weight=float(table.get("weight", 1.0)),
        rpm=table.get("rpm"),
        tpm=table.get("tpm"),
        concurrency=table.get("concurrency"),
        http=http,
    )


#: The HTTP clients an endpoint may use (``EndpointConfig.http``).
HTTP_CLIENTS = ("httptools", "aiohttp", "pyreqwest")


def check_http(name: str, where: str) -> None:
    """Refuse an HTTP client batcher does not have, or one that is not installed."""
    if name not in HTTP_CLIENTS:
        raise ConfigError(where, f"must be one of {', '.join(HTTP_CLIENTS)}, got {name!r}")
    if name == "pyreqwest" and importlib.util.find_spec("pyreqwest") is None:
        raise ConfigError(
            where,
            "pyreqwest is not installed: pip install 'batcher[native]' (or leave out http for "
            "the default, httptools)",
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
