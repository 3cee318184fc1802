"""What a batch run needs before it sends anything: the API key, the prices at the batch
rate, the whole input read (rejects written as an online run writes them), and the base URL
(the simulator served for a ``base_url = "sim"`` job)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from batcher.config import DEFAULT_BASE_URL, JobConfig, VariantConfig
from batcher.cost.pricing import Pricer, parse_pricing
from batcher.errors import ConfigError
from batcher.http.client import check_api_key
from batcher.input.reader import Reader
from batcher.input.sources import open_input
from batcher.output.formats import RejectsWriter, rejects_path
from batcher.records import Reject, Request
from batcher.runner.stats import RunStats

#: Given a ``base_url = "sim"`` job, a context that serves the simulator (Batches API
#: included) for the run and yields its base URL.
ServeSim = Callable[[JobConfig], AbstractContextManager[str]]


def read_all(job: JobConfig, input_path: Path, output: Path, stats: RunStats) -> list[Request]:
    """Every valid request of the input (once per variant); rejects written beside the
    output, as an online run writes them."""
    requests: list[Request] = []
    variants: list[VariantConfig | None] = list(job.variants) or [None]
    rejects_path(output).unlink(missing_ok=True)
    with RejectsWriter(rejects_path(output)) as rejects:
        for variant in variants:
            with open_input(input_path) as source:
                reader = Reader(
                    source,
                    job.request,
                    encoding=job.limits.encoding,
                    variant=variant,
                    count_tokens=job.limits.max_cost_usd is not None,
                )
                for item in reader:
                    if isinstance(item, Reject):
                        if variant is variants[0]:
                            rejects.write(item)
                    else:
                        requests.append(item)
                stats.lines_read = reader.lines_read
        stats.rejected = rejects.count
    return requests


def api_key(job: JobConfig) -> str | None:
    """The endpoint's API key from its variable, checked (none for the simulator)."""
    endpoint = job.endpoint
    if endpoint.is_sim:
        return None
    key = os.environ.get(endpoint.api_key_env) or None
    if key is not None:
        try:
            check_api_key(key)
        except ValueError as exc:
            raise ConfigError("endpoint.api_key_env", f"${endpoint.api_key_env}: {exc}") from None
    if key is None and endpoint.base_url.rstrip("/") == DEFAULT_BASE_URL:
        raise ConfigError(
            "endpoint.api_key_env",
            f"${endpoint.api_key_env} is not set (export your API key in that variable)",
        )
    return key


def batch_pricer(job: JobConfig) -> Pricer:
    """Prices at the Batch API's rate (half the online one)."""
    overrides, _ = parse_pricing(job.pricing)
    api_url = None if job.endpoint.is_sim else job.endpoint.base_url
    return Pricer(overrides, provider_api_url=api_url, batch_discount=True)


@contextlib.contextmanager
def base_url(job: JobConfig, serve_sim: ServeSim | None) -> Iterator[str]:
    """The endpoint's base URL; for ``sim``, the simulator served by ``serve_sim``."""
    if not job.endpoint.is_sim:
        yield job.endpoint.base_url
        return
    assert serve_sim is not None  # checked before anything else
    with serve_sim(job) as url:
        yield url
