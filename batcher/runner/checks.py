"""What is checked before anything is sent, by the local and the Ray engines alike: the output
is usable and is not the input, every endpoint's API key is there and sendable, and a ``sim``
endpoint has a simulator to run it. Each failure is a ``ConfigError`` naming the job field.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from batcher.config import DEFAULT_BASE_URL, DEFAULT_HTTP_CLIENT, EndpointConfig, JobConfig
from batcher.errors import ConfigError
from batcher.http.client import check_api_key
from batcher.input.tabular import check_input
from batcher.output.formats import errors_path, output_format, rejects_path
from batcher.output.journal import journal_path

#: Below this much free space in the output folder, a run does not start.
MIN_FREE_BYTES = 16 * 2**20


def check_local_job(
    job: JobConfig, input_path: Path, output: Path, *, sim: bool
) -> list[str | None]:
    """The checks made before a local run sends anything (``sim``: whether the caller gives
    a simulator); the endpoints' API keys."""
    check_output_writable(output)
    if output.is_dir():
        raise ConfigError(
            "job.output",
            f"{output} is a folder (the Ray engine's output?): choose another output, or run "
            "the job with --engine ray",
        )
    check_not_the_input(input_path, output)
    check_input(job, input_path)
    keys = api_keys(job)
    check_sim_available(job, sim)
    return keys


def check_output_writable(output: Path) -> None:
    """Fail before sending anything if the output is unusable: format, folder, free space."""
    output_format(output)
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        missing = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ConfigError("job.output", f"folder {folder} {missing}")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".batcher-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            "job.output", f"folder {folder} is not writable: {exc.strerror}"
        ) from None
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(
            "job.output",
            f"only {free // 1024} KiB free in {folder}; free some space (batcher needs at least "
            f"{MIN_FREE_BYTES // 2**20} MiB for its journal and output)",
        )


def check_not_the_input(input_path: Path, output: Path) -> None:
    """Refuse an output (or its journal, rejects or errors file) that is the input itself."""
    if str(input_path) == "-" or not input_path.exists():
        return
    for produced in (output, journal_path(output), rejects_path(output), errors_path(output)):
        same = produced.samefile(input_path) if produced.exists() else False
        if same or produced.resolve() == input_path.resolve():
            raise ConfigError("job.output", f"{produced} is the input: it would be overwritten")


def api_keys(job: JobConfig) -> list[str | None]:
    """Each endpoint's API key, from its variable, in the job's order (``None``: none needed
    or none set); refused when it cannot be sent or when the default endpoint has none."""
    keys = []
    for i, endpoint in enumerate(job.all_endpoints):
        where = f"endpoints[{i}]" if job.endpoints else "endpoint"
        key = _api_key(endpoint, f"{where}.api_key_env")
        _check_one_authorization(endpoint, key, f"{where}.base_url")
        _check_header_beside_key(endpoint, key, f"{where}.headers")
        keys.append(key)
    return keys


def _check_header_beside_key(endpoint: EndpointConfig, key: str | None, field: str) -> None:
    """Refuse an ``Authorization`` header beside an API key: each client would send both
    (``Bearer KEY`` too), and the server would pick one its own way."""
    if key is not None and any(name.lower() == "authorization" for name in endpoint.headers):
        raise ConfigError(
            field,
            f"an Authorization header is set and ${endpoint.api_key_env} holds an API key: "
            "both would be sent as the Authorization header; keep one (to send the header, "
            "unset the variable, or set api_key_env to one that is not set)",
        )


def _check_one_authorization(endpoint: EndpointConfig, key: str | None, field: str) -> None:
    """Refuse credentials in the base URL (``https://user:password@host/v1``) beside an API key
    or an ``Authorization`` header: both would be the request's Authorization header, which
    aiohttp refuses on every request (one error record per line) and other clients resolve
    each their own way."""
    parts = urlsplit(endpoint.base_url)
    if parts.username is None and parts.password is None:
        return
    if key is not None:
        other = f"${endpoint.api_key_env} holds an API key"
    elif any(name.lower() == "authorization" for name in endpoint.headers):
        other = "an Authorization header is set"
    else:
        return
    raise ConfigError(
        field,
        f"carries credentials (user:password@) and {other}: both would be sent as the "
        "Authorization header; keep one (unset the variable, or set api_key_env to one that "
        "is not set, to send the URL's credentials)",
    )


def check_transport_choice(job: JobConfig, transport: object | None) -> None:
    """Refuse an endpoint that names an HTTP client other than the default when a transport is
    given as well (``batcher.run(..., transport=...)``): the transport replaces the HTTP
    client, so one of the two choices would be silently ignored."""
    if transport is None:
        return
    for i, endpoint in enumerate(job.all_endpoints):
        if endpoint.http != DEFAULT_HTTP_CLIENT:
            raise ConfigError(
                f"endpoints[{i}].http" if job.endpoints else "endpoint.http",
                f"is {endpoint.http!r}, but a transport was given as well, and it replaces "
                "the HTTP client: leave out one of the two",
            )


def worker_api_keys(job: JobConfig, found: Sequence[bool]) -> list[str | None]:
    """Each endpoint's API key as a Ray worker reads it, from its own environment: checked as
    ``api_keys`` does, and refused when one the driver ``found`` is not set here."""
    for endpoint, needed in zip(job.all_endpoints, found, strict=True):
        if needed and not os.environ.get(endpoint.api_key_env):
            raise ConfigError(
                f"endpoint {endpoint.name}",
                f"${endpoint.api_key_env} is not set on this Ray worker (set it in the "
                "workers' environment; see the README)",
            )
    return api_keys(job)


def _api_key(endpoint: EndpointConfig, field: str) -> str | None:
    if endpoint.is_sim:
        return None
    key = os.environ.get(endpoint.api_key_env) or None
    if key is not None:
        try:
            check_api_key(key)
        except ValueError as exc:
            raise ConfigError(field, f"${endpoint.api_key_env}: {exc}") from None
    if key is None and endpoint.base_url.rstrip("/") == DEFAULT_BASE_URL:
        raise ConfigError(
            field, f"${endpoint.api_key_env} is not set (export your API key in that variable)"
        )
    return key


def base_url_field(job: JobConfig, endpoint: str | None) -> str:
    """The job field of the named endpoint's base URL, as errors name it (the single
    endpoint's when the name is not one of ``[[endpoints]]``)."""
    names = [e.name for e in job.endpoints]
    if endpoint not in names:
        return "endpoint.base_url"
    return f"endpoints[{names.index(endpoint)}].base_url"


def check_sim_available(job: JobConfig, available: bool) -> None:
    """Refuse a ``base_url = "sim"`` endpoint when the caller gives no simulator to run it
    (the core never imports the optional simulator: the ``batcher`` command and
    ``batcher.run`` give it)."""
    if available:
        return
    for i, endpoint in enumerate(job.all_endpoints):
        if endpoint.is_sim:
            field = f"endpoints[{i}].base_url" if job.endpoints else "endpoint.base_url"
            raise ConfigError(
                field,
                '"sim" needs the built-in simulator, which this caller does not provide: '
                "run the job with batcher.run or the batcher command, or pass sim=",
            )
