"""The whole input of a batch run, read before anything is sent (rejects written as an online
run writes them)."""

from __future__ import annotations

from pathlib import Path

from batcher.config import JobConfig, VariantConfig
from batcher.input.sources import open_input
from batcher.input.tabular import reader_for
from batcher.output.formats import RejectsWriter, rejects_path
from batcher.records import Reject, Request
from batcher.runner.stats import RunStats


def read_all(job: JobConfig, input_path: Path, output: Path, stats: RunStats) -> list[Request]:
    """Every valid request of the input (once per variant); rejects written beside the
    output, as an online run writes them."""
    requests: list[Request] = []
    variants: list[VariantConfig | None] = list(job.variants) or [None]
    rejects_path(output).unlink(missing_ok=True)
    with RejectsWriter(rejects_path(output)) as rejects:
        for variant in variants:
            with open_input(input_path) as source:
                reader = reader_for(
                    job,
                    source,
                    path=input_path,
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
