"""Helpers of the batch-mode tests: an input file, a job against a loopback simulator, the
output read back."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from batcher.config import JobConfig
from batcher.job_file import job_from_dict
from tests.batch_sim import BatchSim

MODELS = ("sim-a", "sim-b")
#: USD per million tokens; the batch price is half of these.
PRICES = {"sim-a": {"input": 1.0, "output": 2.0}, "sim-b": {"input": 3.0, "output": 4.0}}


def write_input(path: Path, n: int, models: tuple[str, ...] = MODELS) -> Path:
    """``n`` requests cycling through ``models``."""
    with path.open("w") as f:
        for i in range(n):
            line = {
                "id": f"r{i:03d}",
                "model": models[i % len(models)],
                "messages": [{"role": "user", "content": f"question {i}"}],
            }
            f.write(json.dumps(line) + "\n")
    return path


def batch_job(
    sim: BatchSim | str,
    folder: Path,
    n: int = 20,
    *,
    output: str = "out.parquet",
    models: tuple[str, ...] = MODELS,
    **batch: Any,
) -> JobConfig:
    """A batch job of ``n`` requests (cycling through ``models``) against the simulator."""
    base_url = sim if isinstance(sim, str) else sim.base_url
    raw = {
        "job": {
            "name": "nightly",
            "mode": "batch",
            "input": str(write_input(folder / "in.jsonl", n, models)),
            "output": str(folder / output),
            "progress": False,
        },
        "endpoint": {"base_url": base_url},
        "request": {"max_tokens": 16},
        "retry": {"max_attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.01},
        "batch": {"max_requests": 4, "poll_s": 10.0, **batch},
        "pricing": PRICES,
    }
    return job_from_dict(raw)


def clock_sleep(sim: BatchSim) -> Any:
    """A poll wait that moves the simulator's clock instead of waiting."""

    async def sleep(seconds: float) -> None:
        sim.clock.advance(seconds)

    return sleep


def rows(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


def text() -> io.StringIO:
    return io.StringIO()
