"""What a run is built from, made in one place for the local runner and the Ray workers alike:
the endpoints (an HTTP client, limits and outage state each), the pricer, the budget, and the
engine's settings.

The simulator behind ``base_url = "sim"`` is not part of the core: the caller (the ``batcher``
command, ``batcher.run``, a Ray worker) gives a ``SimServer`` that starts one.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batcher.config import EndpointConfig, JobConfig
from batcher.cost.budget import Budget
from batcher.cost.pricing import Pricer, parse_pricing
from batcher.engine.control import EngineSettings
from batcher.engine.endpoints import Endpoint
from batcher.engine.outage import Outage
from batcher.http.client import ChatClient, http_library
from batcher.limits.endpoint import Limits
from batcher.limits.known_limits import Announced, KnownLimits
from batcher.runner.checks import check_sim_available

if TYPE_CHECKING:
    import httpx

#: Starts the server behind ``base_url = "sim"`` with the job's ``[sim]`` settings, for the
#: ``with`` block; yields its base URL (``batcher.sim.sim_server``).
SimServer = Callable[[Mapping[str, Any]], AbstractContextManager[str]]


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where one endpoint of the job is, for this run: its base URL (a running simulator's
    for ``sim``), its API key, and what it announced on an earlier run (it then starts without
    a probe)."""

    config: EndpointConfig
    name: str
    base_url: str
    api_key: str | None
    announced: Announced | None = None


@contextlib.contextmanager
def base_urls(job: JobConfig, sim: SimServer | None) -> Iterator[list[str]]:
    """The base URL of each endpoint, in the job's order; for ``sim``, a simulator running
    for the ``with`` block (a ``ConfigError`` naming the field when there is no ``sim``)."""
    check_sim_available(job, sim is not None)
    with contextlib.ExitStack() as stack:
        urls = []
        for endpoint in job.all_endpoints:
            if endpoint.is_sim:
                assert sim is not None
                urls.append(stack.enter_context(sim(job.sim)))
            else:
                urls.append(endpoint.base_url)
        yield urls


def endpoint_limits(job: JobConfig, endpoint: EndpointConfig, workers: int = 1) -> Limits:
    """An endpoint's limits for one of ``workers`` processes sharing it (the Ray engine's
    actors; one for a local run): 1/``workers`` of its RPM, TPM and concurrency (at least one
    request in flight), and of what the server's headers will say."""
    rpm = endpoint.rpm or job.limits.rpm
    tpm = endpoint.tpm or job.limits.tpm
    return Limits(
        rpm=rpm / workers if rpm else None,
        tpm=tpm / workers if tpm else None,
        # Rounded down: together the workers never have more in flight than the job allows
        # (unless it allows fewer than there are workers: each needs one).
        concurrency=max(1, (endpoint.concurrency or job.limits.concurrency) // workers),
        share=1 / workers,
    )


async def open_endpoints(
    job: JobConfig,
    targets: Sequence[Target],
    clients: contextlib.AsyncExitStack,
    *,
    workers: int = 1,
    known: KnownLimits | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    warn: Callable[[str], object] | None = None,
) -> list[Endpoint]:
    """The run's endpoints, their HTTP clients open in ``clients``. ``workers``: see
    ``endpoint_limits``. ``known``: where what a real endpoint announces is remembered for
    the next run. ``warn``: shows the limits' notes (announced limits ignored)."""
    endpoints = []
    for target in targets:
        config = target.config
        limits = endpoint_limits(job, config, workers)
        if warn is not None:
            limits.checks.warn = warn
        if target.announced is not None:
            limits.start_from(target.announced)
        client = ChatClient(
            target.base_url,
            api_key=target.api_key,
            headers=config.headers,
            timeout_s=job.retry.timeout_s,
            max_connections=limits.max_concurrency,
            transport=transport,
            max_response_bytes=job.limits.max_response_bytes,
            # a transport with another client named is refused before: check_transport_choice
            http=None if transport is not None else http_library(config.http),
        )
        await clients.enter_async_context(client)
        remember = None
        if known is not None and not config.is_sim:
            remember = functools.partial(_remember, known, target.base_url)
        endpoints.append(
            Endpoint(
                name=target.name,
                client=client,
                limits=limits,
                outage=Outage(patience_s=job.retry.outage_patience_s),
                weight=config.weight,
                remember=remember,
            )
        )
    return endpoints


def endpoint_targets(
    job: JobConfig, urls: Sequence[str], keys: Sequence[str | None], known: KnownLimits | None
) -> list[Target]:
    """Each endpoint's base URL, key and what it announced on an earlier run (nothing for
    ``sim``, or without ``known``)."""
    return [
        Target(
            config=config,
            name=config.name,
            base_url=url,
            api_key=key,
            announced=None if known is None or config.is_sim else known.get(url),
        )
        for config, url, key in zip(job.all_endpoints, urls, keys, strict=True)
    ]


def build_pricer(job: JobConfig, *, batch: bool = False) -> Pricer:
    """The run's pricer: the job's ``[pricing]``, then genai-prices for the endpoint's provider;
    at the Batch API's rate with ``batch`` (or ``batch_discount``)."""
    overrides, discount = parse_pricing(job.pricing)
    return Pricer(
        overrides,
        provider_api_url=None if job.endpoint.is_sim else job.endpoint.base_url,
        batch_discount=discount or batch,
    )


def build_budget(job: JobConfig, spent_before: float) -> Budget | None:
    """``--max-cost``'s budget (``None`` without a cap), with what earlier runs spent."""
    cap = job.limits.max_cost_usd
    return Budget(cap, spent_before=spent_before) if cap is not None else None


def engine_settings(job: JobConfig) -> EngineSettings:
    """The engine's settings from the job (its workers: as many as the endpoints allow)."""
    return EngineSettings(
        retry=job.retry,
        grace_s=job.grace_s,
        validate=job.validate,
        encoding=job.limits.encoding,
    )


def _remember(known: KnownLimits, base_url: str, limits: Limits) -> None:
    limits.forget_unconfirmed()  # what this run's server did not announce is not kept
    known.put(base_url, limits.announced())
