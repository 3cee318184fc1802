"""The built-in OpenAI-compatible simulator (optional: imports the core, never imported by it)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any


@contextmanager
def sim_server(settings: Mapping[str, Any]) -> Iterator[str]:
    """The simulator behind ``base_url = "sim"``, with a job's ``[sim]`` settings, running
    for the ``with`` block: its base URL (the runner's ``SimServer``; what ``batcher.run``,
    the ``batcher`` command and the Ray workers give it). The server is imported only here,
    when a job asks for it. Settings it cannot take are a ``ConfigError`` naming ``sim``."""
    from batcher.errors import ConfigError
    from batcher.sim.config import SimConfig, unknown_setting
    from batcher.sim.serve import running_sim

    unknown = unknown_setting(settings)
    if unknown is not None:
        raise ConfigError(*unknown)
    try:
        config = SimConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError("sim", str(exc)) from None
    with running_sim(config) as sim:
        yield sim.base_url
