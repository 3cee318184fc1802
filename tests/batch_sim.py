"""The simulator's Batches API for tests: served on 127.0.0.1 with a clock the test moves."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from batcher.sim.batches import BatchSimConfig
from batcher.sim.serve import SimHandle, running_sim

KEY = "sk-test-batch-key-0123456789"
OTHER_KEY = "sk-other-project-key-9876543210"


class Clock:
    """Unix seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class BatchSim:
    handle: SimHandle
    clock: Clock

    @property
    def base_url(self) -> str:
        return self.handle.base_url

    def http(self, key: str = KEY) -> httpx.Client:
        """A plain client of the simulator under ``key``."""
        headers = {"authorization": f"Bearer {key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=10)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(self.base_url.removesuffix("/v1") + "/stats").json()
        return stats


@contextlib.contextmanager
def batch_sim(config: BatchSimConfig | None = None) -> Iterator[BatchSim]:
    """The simulator on a loopback port, its batches on a test clock."""
    clock = Clock()
    with running_sim() as handle:
        handle.simulator.batches.clock = clock
        handle.simulator.batches.config = config or BatchSimConfig()
        yield BatchSim(handle, clock)


def request_line(custom_id: str, text: str, model: str = "gpt-4o-mini", **extra: Any) -> str:
    """A Batch API input line asking ``text``."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(line)


def upload(http: httpx.Client, lines: list[str]) -> str:
    """Upload ``lines`` as a batch input file; returns its id."""
    data = ("\n".join(lines) + "\n").encode()
    reply = http.post("/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", data)})
    reply.raise_for_status()
    file_id: str = reply.json()["id"]
    return file_id


def create(http: httpx.Client, file_id: str, **metadata: str) -> dict[str, Any]:
    """Create a batch of ``file_id``; returns the batch object."""
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": metadata or None,
    }
    reply = http.post("/batches", json=body)
    reply.raise_for_status()
    batch: dict[str, Any] = reply.json()
    return batch


def lines_of(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]
