"""The worker side of the Ray engine: the actor that runs blocks of requests through batcher's
own ``Engine`` (see ``batcher.ray_engine`` for the whole picture).

Imported in Ray's worker processes, and by the driver for ``WorkerSpec``; nothing here imports
Ray, so the logic can be tested without it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batcher import jsonfast
from batcher.config import EndpointConfig, JobConfig
from batcher.progress import Progress
from batcher.records import Reject, Request, Result
from batcher.stats import RunStats

if TYPE_CHECKING:
    import pyarrow as pa

    from batcher.endpoints import Endpoint
    from batcher.limits import Limits

#: Schema metadata key a worker sets on a block it could not finish (the reason).
STOP_KEY = "batcher.stopped"


def worker_limits(job: JobConfig, endpoint: EndpointConfig, workers: int) -> Limits:
    """One worker's limits at an endpoint: 1/``workers`` of its RPM, TPM and concurrency
    (at least one request in flight), and of what the server's headers will say."""
    from batcher.limits import Limits

    rpm = endpoint.rpm or job.limits.rpm
    tpm = endpoint.tpm or job.limits.tpm
    return Limits(
        rpm=rpm / workers if rpm else None,
        tpm=tpm / workers if tpm else None,
        concurrency=math.ceil((endpoint.concurrency or job.limits.concurrency) / workers),
        share=1 / workers,
    )


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What every worker actor needs: the job, where each endpoint is, and the pool size.

    No API key: a worker reads it from its own environment (the variable the job names).
    """

    job: JobConfig
    targets: list[tuple[str, str]]  # (endpoint name, base URL), in the job's order
    needs_key: list[bool]  # whether the driver found a key for each endpoint
    workers: int


class BlockWorker:
    """A Ray Data actor: runs blocks of requests through batcher's Engine, returns records.

    One event loop lives as long as the actor (in a thread, behind an anyio blocking portal),
    with one HTTP client and one ``Limits`` per endpoint, so connections, learned limits and
    429 back-off carry over from block to block; each ``__call__`` runs one block on it.
    """

    spec: WorkerSpec  # set on the subclass the driver makes for a run

    def __init__(self) -> None:
        import anyio.from_thread

        spec = self._spec = self.spec
        self._stopped: str | None = None
        self._setup_error: str | None = None
        self._keys: list[str | None] = []
        for (name, _), needed, config in zip(
            spec.targets, spec.needs_key, spec.job.all_endpoints, strict=True
        ):
            key = os.environ.get(config.api_key_env) or None
            if needed and key is None:
                self._setup_error = (
                    f"endpoint {name}: ${config.api_key_env} is not set on this Ray worker "
                    "(set it in the workers' environment; see the README)"
                )
            self._keys.append(key)
        self._exit = contextlib.ExitStack()
        self._portal = self._exit.enter_context(anyio.from_thread.start_blocking_portal())
        self._endpoints: list[Endpoint] = []
        if self._setup_error is None:
            self._endpoints = self._portal.call(self._open)

    async def _open(self) -> list[Endpoint]:
        from batcher.client import ChatClient
        from batcher.endpoints import Endpoint
        from batcher.outage import Outage
        from batcher.pricing import Pricer, parse_pricing

        job, k = self._spec.job, self._spec.workers
        self._clients = contextlib.AsyncExitStack()
        endpoints = []
        for (name, url), key, config in zip(
            self._spec.targets, self._keys, job.all_endpoints, strict=True
        ):
            limits = worker_limits(job, config, k)
            client = ChatClient(
                url,
                api_key=key,
                headers=config.headers,
                timeout_s=job.retry.timeout_s,
                max_connections=limits.max_concurrency,
            )
            await self._clients.enter_async_context(client)
            outage = Outage(patience_s=job.retry.outage_patience_s)
            endpoints.append(
                Endpoint(
                    name=name, client=client, limits=limits, outage=outage, weight=config.weight
                )
            )
        overrides, discount = parse_pricing(job.pricing)
        self._pricer = Pricer(
            overrides,
            provider_api_url=None if job.endpoint.is_sim else job.endpoint.base_url,
            batch_discount=discount,
        )
        return endpoints

    def __call__(self, block: pa.Table) -> pa.Table:
        from batcher.writers import results_table

        if self._setup_error is not None:
            raise RuntimeError(self._setup_error)
        if self._stopped is not None:  # a refused key, no quota, an outage: not worth trying
            return results_table([], {STOP_KEY: self._stopped})
        requests = [_request_of(row) for row in block.to_pylist()]
        results, reason = self._portal.call(self._run, requests)
        if reason is not None:
            self._stopped = reason
        return results_table(results, {STOP_KEY: reason} if reason else None)

    def __del__(self) -> None:
        # Close the HTTP clients on their own loop when the pool lets the actor go, instead of
        # leaving aiohttp to complain about unclosed sessions at exit.
        with contextlib.suppress(Exception):
            if self._endpoints:
                self._portal.call(self._clients.aclose)
            self._exit.close()

    async def _run(self, requests: list[Request | Reject]) -> tuple[list[Result], str | None]:
        from batcher.engine import Engine

        job = self._spec.job
        stats = RunStats()
        sink = _Collected()
        engine = Engine(
            endpoints=self._endpoints,
            retry=job.retry,
            concurrency=sum(e.limits.max_concurrency for e in self._endpoints),
            results=sink,
            rejects=sink,
            stats=stats,
            progress=_WorkerProgress(stats, total=None, enabled=False),
            pricer=self._pricer,
            outage_patience_s=job.retry.outage_patience_s,
            validate=job.validate,
        )
        await engine.run(iter([requests]))
        return list(sink.results.values()), stats.stop_reason if stats.stopped_early else None


def _request_of(row: Mapping[str, Any]) -> Request | Reject:
    meta = row["metadata"]
    return Request(
        custom_id=row["custom_id"],
        line=row["line"],
        body=jsonfast.loads_exact(row["body"]),
        metadata=None if meta is None else jsonfast.loads_exact(meta),
        est_tokens=row["est_tokens"],
        prompt_tokens=row["prompt_tokens"],
        body_hash=row["body_hash"],
    )


class _Collected:
    """The engine's sinks in a worker: a block's results, the latest per id (a provisional
    record before a re-ask is replaced by the final one)."""

    def __init__(self) -> None:
        self.results: dict[str, Result] = {}

    def append(self, result: Result, body_hash: str, *, provisional: bool = False) -> None:
        self.results[result.custom_id] = result

    def write(self, reject: Reject) -> None:  # the driver rejected lines already
        raise AssertionError(f"a worker was given a reject: line {reject.line}")


class _WorkerProgress(Progress):
    """No progress lines from workers (the driver counts blocks); notes go to stderr, which
    Ray forwards to the driver."""

    def advance(self, n: int = 1) -> None:
        pass
