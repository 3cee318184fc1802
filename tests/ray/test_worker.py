"""A Ray worker's own checks (``batcher.ray.worker``), without Ray: the API keys it reads from
its environment are checked as the driver's are (``runner.checks``)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from batcher.job_file import job_from_dict
from batcher.ray.worker import ERROR_MARK, BlockWorker, WorkerSpec

KEY_ENV = "BATCHER_TEST_WORKER_KEY"


def worker_for(needs_key: bool) -> BlockWorker:
    """A worker of a one-endpoint job whose key is in ``KEY_ENV``."""
    job = job_from_dict(
        {
            "job": {"input": "in.jsonl", "output": "out.parquet", "progress": False},
            "endpoint": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": KEY_ENV},
            "request": {"model": "m"},
        }
    )
    spec = WorkerSpec(job=job, urls=["http://127.0.0.1:9/v1"], needs_key=[needs_key], workers=1)
    worker_class = type("Worker", (BlockWorker,), {"spec": spec})
    worker: BlockWorker = worker_class()
    return worker


def refusal(worker: BlockWorker) -> str:
    """The error a worker gives for a block it cannot send."""
    with pytest.raises(RuntimeError) as caught:
        worker(pa.table({"custom_id": pa.array([], pa.string())}))
    message = str(caught.value)
    assert message.startswith(ERROR_MARK)
    return message.removeprefix(ERROR_MARK)


def test_a_worker_refuses_a_key_that_cannot_go_in_a_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "sk-worker-secret"
    monkeypatch.setenv(KEY_ENV, secret + "\n")  # a stray newline from a .env file
    message = refusal(worker_for(needs_key=True))
    assert message.startswith(f"endpoint.api_key_env: ${KEY_ENV}: ")
    assert "stray newline" in message and secret not in message


def test_a_worker_without_the_key_the_driver_found_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert refusal(worker_for(needs_key=True)) == (
        f"endpoint default: ${KEY_ENV} is not set on this Ray worker (set it in the workers' "
        "environment; see the README)"
    )
