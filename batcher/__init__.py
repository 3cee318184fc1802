"""batcher: run large batches of chat-completion requests against any OpenAI-compatible endpoint.

The public surface is small on purpose; everything else lives in modules that may change.
"""

from batcher.config import JobConfig, job_from_dict, load_job, with_overrides
from batcher.errors import BatcherError, ConfigError, InputError, OutputError
from batcher.runner import RunReport, run_job

__version__ = "0.1.0"

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
