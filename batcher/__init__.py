"""batcher: run large batches of chat-completion requests against any OpenAI-compatible endpoint.

The public surface is small on purpose; everything else lives in modules that may change.
Names are imported on first use, so ``batcher --help`` does not pay for pyarrow and httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from batcher.config import JobConfig, job_from_dict, load_job, with_overrides
    from batcher.errors import BatcherError, ConfigError, InputError, OutputError
    from batcher.runner import RunReport, run_job

_HOMES = {
    "JobConfig": "batcher.config",
    "job_from_dict": "batcher.config",
    "load_job": "batcher.config",
    "with_overrides": "batcher.config",
    "BatcherError": "batcher.errors",
    "ConfigError": "batcher.errors",
    "InputError": "batcher.errors",
    "OutputError": "batcher.errors",
    "RunReport": "batcher.runner",
    "run_job": "batcher.runner",
}

__all__ = [
    "BatcherError",
    "ConfigError",
    "InputError",
    "JobConfig",
    "OutputError",
    "RunReport",
    "__version__",
    "job_from_dict",
    "load_job",
    "run_job",
    "with_overrides",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'batcher' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
