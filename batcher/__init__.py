"""batcher: run large batches of chat-completion requests against any OpenAI-compatible endpoint.

From Python (a notebook, say)::

    import batcher
    result = batcher.run("jobs/sweep.toml", max_attempts=3)   # or: await batcher.arun(...)
    result.table            # the output as a pyarrow.Table (None for a large output)
    print(result.summary)

    rows = [{"prompt": "What is 2+2?", "gold": "4"}]   # or a DataFrame, a datasets.Dataset
    batcher.run(input=rows, model="gpt-4o-mini", seed=7).to_pandas()   # input columns first

The public surface is small on purpose; everything else lives in modules that may change
(``run_job`` and ``job_from_dict``, the lower-level calls ``run`` is built on, still resolve
here). Names are imported on first use, so ``batcher --help`` does not pay for pyarrow and httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from batcher.api import RunResult, arun, run
    from batcher.config import JobConfig
    from batcher.errors import BatcherError, ConfigError, InputError, OutputError
    from batcher.job_file import job_from_dict as job_from_dict
    from batcher.job_file import load_job, with_overrides
    from batcher.runner.run import RunReport
    from batcher.runner.run import run_job as run_job

_HOMES = {
    "RunResult": "batcher.api",
    "arun": "batcher.api",
    "run": "batcher.api",
    "JobConfig": "batcher.config",
    "job_from_dict": "batcher.job_file",
    "load_job": "batcher.job_file",
    "with_overrides": "batcher.job_file",
    "BatcherError": "batcher.errors",
    "ConfigError": "batcher.errors",
    "InputError": "batcher.errors",
    "OutputError": "batcher.errors",
    "RunReport": "batcher.runner.run",
    "run_job": "batcher.runner.run",
}

__all__ = [
    "BatcherError",
    "ConfigError",
    "InputError",
    "JobConfig",
    "OutputError",
    "RunReport",
    "RunResult",
    "__version__",
    "arun",
    "load_job",
    "run",
    "with_overrides",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'batcher' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
