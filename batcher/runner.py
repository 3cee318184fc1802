"""Sets up and runs a whole job: checks, simulator, client, writers, engine, summary.

Everything that can be checked before sending is checked here first (input readable, output
folder writable, API key present where one is needed), so a bad job sends nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio
import httpx

from batcher.client import ChatClient
from batcher.config import DEFAULT_BASE_URL, JobConfig
from batcher.engine import READ_BATCH, Engine
from batcher.errors import ConfigError, OutputError
from batcher.limits import Limits
from batcher.progress import Progress, format_summary
from batcher.reader import Reader, count_lines, open_input
from batcher.stats import RunStats
from batcher.writers import RejectsWriter, open_writer


@dataclass(frozen=True, kw_only=True)
class RunReport:
    """What a finished run returns: its statistics and where its files are."""

    stats: RunStats
    output: Path
    rejects: Path | None
    summary: str

    @property
    def exit_code(self) -> int:
        return self.stats.exit_code


def rejects_path(output: Path) -> Path:
    """Where rejected lines go: ``OUTPUT.rejects.jsonl`` beside the output."""
    return output.with_name(output.name + ".rejects.jsonl")


def run_job(
    job: JobConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    handle_signals: bool = False,
    stream: IO[str] | None = None,
) -> RunReport:
    """Run a job to completion (blocking) and return its report; prints the summary.

    Raises ``ConfigError``/``InputError``/``OutputError`` before anything is sent when the job
    cannot run. ``transport`` replaces the HTTP transport (tests).
    """
    stream = stream or sys.stderr
    input_path, output = job.require_paths()
    check_output_writable(output)
    api_key = _api_key(job)
    with _endpoint(job) as base_url:
        report = anyio.run(
            _run_async,
            job,
            input_path,
            output,
            base_url,
            api_key,
            transport,
            handle_signals,
            stream,
        )
    print(report.summary, file=stream, flush=True)
    return report


async def _run_async(
    job: JobConfig,
    input_path: Path,
    output: Path,
    base_url: str,
    api_key: str | None,
    transport: httpx.AsyncBaseTransport | None,
    handle_signals: bool,
    stream: IO[str],
) -> RunReport:
    total = await anyio.to_thread.run_sync(count_lines, input_path) if job.progress else None
    stats = RunStats()
    progress = Progress(stats, total=total, enabled=job.progress, stream=stream)
    source = open_input(input_path)
    reader = Reader(source, job.request)
    rej_path = rejects_path(output)
    try:
        with open_writer(output) as writer, RejectsWriter(rej_path) as rejects:
            async with ChatClient(
                base_url,
                api_key=api_key,
                headers=job.endpoint.headers,
                timeout_s=job.retry.timeout_s,
                max_connections=job.limits.concurrency,
                transport=transport,
            ) as client:
                engine = Engine(
                    client=client,
                    limits=Limits(rpm=job.limits.rpm, tpm=job.limits.tpm),
                    retry=job.retry,
                    concurrency=job.limits.concurrency,
                    results=writer,
                    rejects=rejects,
                    stats=stats,
                    progress=progress,
                )
                await engine.run(reader.batches(READ_BATCH), handle_signals=handle_signals)
            rejected = rejects.count
    except OSError as exc:
        raise OutputError(f"cannot write output: {exc.strerror or exc}") from None
    finally:
        progress.close()
        if source is not sys.stdin.buffer:
            source.close()
    stats.lines_read = reader.lines_read
    rej = rej_path if rejected else None
    summary = format_summary(
        stats, name=job.name, output=str(output), rejects=str(rej) if rej else None
    )
    return RunReport(stats=stats, output=output, rejects=rej, summary=summary)


def check_output_writable(output: Path) -> None:
    """Fail before sending anything if the output folder is missing or not writable."""
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError("job.output", f"folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".batcher-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            "job.output", f"folder {folder} is not writable: {exc.strerror}"
        ) from None


def _api_key(job: JobConfig) -> str | None:
    if job.endpoint.is_sim:
        return None
    key = os.environ.get(job.endpoint.api_key_env) or None
    if key is None and job.endpoint.base_url.rstrip("/") == DEFAULT_BASE_URL:
        raise ConfigError(
            "endpoint.api_key_env",
            f"${job.endpoint.api_key_env} is not set (export your API key in that variable)",
        )
    return key


@contextlib.contextmanager
def _endpoint(job: JobConfig) -> Iterator[str]:
    """The base URL to send to; for ``sim``, a simulator running for the length of the run."""
    if not job.endpoint.is_sim:
        yield job.endpoint.base_url
        return
    from batcher.sim import SimConfig, running_sim

    with running_sim(SimConfig(**job.sim)) as handle:
        yield handle.base_url
