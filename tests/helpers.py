"""Helpers for end-to-end tests: input files, a `batcher sim` process, reading outputs back."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from batcher.input.reader import Reader
from batcher.records import Request

ROOT = Path(__file__).parent.parent


def write_input(path: Path, n: int, *, start: int = 0) -> Path:
    """``n`` lines cycling through the three input forms, ids ``r00000``…"""
    with path.open("w", encoding="utf-8") as f:
        for i in range(start, start + n):
            cid = f"r{i:05d}"
            text = f"Question {i}: what is {i} squared? Ünïcödé ✓"
            if i % 3 == 0:
                line: dict[str, Any] = {"custom_id": cid, "prompt": text, "metadata": {"i": i}}
            elif i % 3 == 1:
                line = {"custom_id": cid, "messages": [{"role": "user", "content": text}], "n": 1}
            else:
                line = {
                    "custom_id": cid,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": text}], "max_tokens": 8},
                }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def requests_of(path: Path, defaults: dict[str, Any]) -> dict[str, Request]:
    """The requests batcher builds from an input file, by id (to check answers against)."""
    with path.open("rb") as f:
        return {r.custom_id: r for r in Reader(f, defaults) if isinstance(r, Request)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def batcher_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "batcher", *args]


def run_batcher(
    *args: str,
    stdin: str | None = None,
    timeout: float = 90,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m batcher ARGS`` without the caller's API key or base URL (``env`` adds
    variables)."""
    cleared = ("OPENAI_API_KEY", "OPENAI_BASE_URL")
    env = {k: v for k, v in os.environ.items() if k not in cleared} | (env or {})
    return subprocess.run(
        batcher_cmd(*args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )


@contextlib.contextmanager
def sim_process(*args: str) -> Iterator[str]:
    """``batcher sim`` in its own process on a free loopback port; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        batcher_cmd("sim", "--port", str(port), *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{base}/stats", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"batcher sim did not start: {proc.stderr.read() if proc.stderr else ''}"
                    ) from None
                time.sleep(0.05)
        yield f"{base}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def sim_stats(base_url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(base_url.removesuffix("/v1") + "/stats").json()
    return stats


def jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_job(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def ids_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [row["custom_id"] for row in rows]


def output_from_journal(monkeypatch: Any) -> None:
    """Make runs write their output from the journal at the end, as a resumed run does (a
    fresh run's is written as it goes: ``live_output``)."""
    from batcher.runner import run

    monkeypatch.setattr(run, "live_output_for", lambda *args, **kwargs: None)


def keep_full_journal(monkeypatch: Any) -> None:
    """Leave a finished run's journal whole (never compacted): for tests that read or edit
    the full records a run journaled."""
    from batcher.output import compaction

    monkeypatch.setattr(compaction.CompactJournal, "commit", compaction.CompactJournal.abort)
