"""The floor of this machine: how close to the ideal wall time does raw aiohttp get?

    python bench/floor.py --repeat 5          # N=5000, 256 in flight, 200 ms

The target is a wall time within 1.15× of the ideal N × latency / concurrency. This script
measures what stands between that ideal and a whole ``python`` process on this machine, with
batcher and the simulator left out:

* **start-up**: a bare interpreter (``python -c pass``) and one that imports aiohttp (which
  builds its TLS contexts at import), each pinned to the client core;
* **raw aiohttp against a canned server**: ``transports.py --child aiohttp`` (the raw client
  of ``bench/run.py``: one ``ClientSession``, C workers, asyncio's own loop) against a server
  that costs next to nothing per request (this script's ``--serve``: it parses each request
  with httptools and answers one fixed chat completion after the latency), pinned to the
  other core. The request phase (the client made, N requests, closed; aiohttp imported
  before the clock starts) and the whole process (start-up, imports and reading the input
  included) are both shown against the ideal.

The whole-process figure is what that plain client pays end to end here. ``bench/run.py``'s
clients pay it and more (the simulator's CPU; batcher: its journal, Parquet output and its
own imports). A leaner client could shave the harness's own imports and input reading (the
gap between the two figures, less aiohttp's import).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # bench/ is on sys.path (above), so this runs as a plain script
    CLIENT_CORE,
    SIM_CORE,
    compile_bytecode,
    default_pin,
    format_table,
    free_port,
    ideal_s,
    median,
    pin_preexec,
    pin_prefix,
    run_child,
    scratch_dir,
    write_jsonl,
)

TRANSPORTS = Path(__file__).resolve().parent / "transports.py"
TARGET = 1.15
_ANSWER = json.dumps(
    {
        "id": "chatcmpl-canned",
        "object": "chat.completion",
        "created": 1795995751,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "a canned answer", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 29, "completion_tokens": 3, "total_tokens": 32},
    },
    separators=(",", ":"),
).encode()
_REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(_ANSWER),
    _ANSWER,
)


# -- the canned server ---------------------------------------------------------------------------


class _Canned(asyncio.Protocol):
    """One connection: every complete request is answered with ``_REPLY`` after the latency."""

    def __init__(self, latency_s: float, counter: list[int]) -> None:
        import httptools

        self._latency_s = latency_s
        self._counter = counter
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_message_complete(self) -> None:  # httptools' callback: a whole request is in
        self._counter[0] += 1
        asyncio.get_running_loop().call_later(self._latency_s, self._reply)

    def _reply(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_REPLY)


class _Count(asyncio.Protocol):
    """``GET /count`` on the count port: how many requests the canned server took."""

    def __init__(self, counter: list[int]) -> None:
        self._counter = counter
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._head += data
        if b"\r\n\r\n" in self._head:  # the request's head is in (a GET has no body)
            body = str(self._counter[0]).encode()
            head = b"HTTP/1.0 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
            self._transport.write(head + body)
            self._transport.close()


def serve(port: int, count_port: int, latency_ms: float) -> None:
    """Run the canned server (and its counter) until killed."""
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # the bench extra brings uvloop; asyncio's loop works too
        loop = asyncio.new_event_loop()
    counter = [0]
    latency_s = latency_ms / 1000
    loop.run_until_complete(
        loop.create_server(lambda: _Canned(latency_s, counter), "127.0.0.1", port, backlog=4096)
    )
    loop.run_until_complete(loop.create_server(lambda: _Count(counter), "127.0.0.1", count_port))
    loop.run_forever()


def _count(count_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{count_port}/count", timeout=5) as response:
        return int(response.read())


# -- the measurements ----------------------------------------------------------------------------


def _startup_s(code: str, core: int | None, repeat: int) -> float:
    """Median wall time of ``python -c CODE`` (pinned to ``core``)."""
    times = []
    for _ in range(repeat):
        times.append(run_child([sys.executable, "-c", code], core=core).wall_s)
    return median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; medians (3)")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=default_pin())
    parser.add_argument("--serve", nargs=3, type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.serve:
        port, count_port, latency_ms = args.serve
        serve(int(port), int(count_port), latency_ms)
        return 0

    client_core = CLIENT_CORE if args.pin else None
    server_core = SIM_CORE if args.pin else None
    compile_bytecode()
    port = free_port()
    count_port = free_port()
    while count_port == port:
        count_port = free_port()
    serve_cmd = [
        *pin_prefix(server_core), sys.executable, str(Path(__file__).resolve()),
        "--serve", str(port), str(count_port), str(args.latency_ms),
    ]  # fmt: skip
    server = subprocess.Popen(serve_cmd, preexec_fn=pin_preexec(server_core))
    problems: list[str] = []
    try:
        try:
            _wait_for(count_port, server)
        except (OSError, RuntimeError) as exc:
            print(f"the canned server did not start: {exc}", file=sys.stderr)
            return 1
        bare = _startup_s("pass", client_core, 2 * args.repeat + 1)
        imported = _startup_s("import aiohttp", client_core, 2 * args.repeat + 1)
        phase, whole = [], []
        with scratch_dir() as tmp:
            src = write_jsonl(tmp / "in.jsonl", args.n)
            client_cmd = [
                sys.executable, str(TRANSPORTS), "--child", "aiohttp",
                "--input", str(src), "--base-url", f"http://127.0.0.1:{port}/v1",
                "--concurrency", str(args.concurrency),
            ]  # fmt: skip
            for round_no in range(1, args.repeat + 1):
                before = _count(count_port)
                child = run_child(client_cmd, core=client_core)
                taken = _count(count_port) - before
                try:
                    figures = json.loads(child.stdout.strip().splitlines()[-1])
                except (IndexError, ValueError):
                    figures = {}
                if child.returncode != 0 or figures.get("ok") != args.n or taken != args.n:
                    problems.append(
                        f"round {round_no}: exit {child.returncode}, {figures.get('ok')} ok, "
                        f"the server took {taken} (expected {args.n}): {child.stderr[-300:]}"
                    )
                    continue
                phase.append(figures["wall_s"])
                whole.append(child.wall_s)
                print(
                    f"round {round_no}/{args.repeat}: request phase {figures['wall_s']:.2f} s, "
                    f"whole process {child.wall_s:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        server.kill()
        server.wait()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1

    ideal = ideal_s(args.n, args.latency_ms, args.concurrency)
    waves = math.ceil(args.n / args.concurrency) * args.latency_ms / 1000
    rows = [
        ["ideal: N × latency / concurrency", f"{ideal:.2f}", "1.00"],
        ["whole waves: ⌈N / concurrency⌉ × latency", f"{waves:.2f}", f"{waves / ideal:.2f}"],
        ["raw aiohttp, request phase only", f"{median(phase):.2f}", f"{median(phase) / ideal:.2f}"],
        ["raw aiohttp, whole process", f"{median(whole):.2f}", f"{median(whole) / ideal:.2f}"],
        ["`python -c pass`", f"{bare:.3f}", ""],
        ["`python -c 'import aiohttp'`", f"{imported:.3f}", ""],
    ]
    print(
        f"\nN={args.n}, {args.concurrency} in flight, {args.latency_ms:g} ms, canned server, "
        f"pinned={'yes' if args.pin else 'no'}, median of {args.repeat}\n"
    )
    print(format_table(["", "wall s", "× ideal"], rows))
    verdict = "under" if median(whole) <= TARGET * ideal else "over"
    print(
        f"\nRaw aiohttp against a canned server, whole process: {median(whole) / ideal:.2f}× "
        f"ideal, {verdict} the {TARGET}× line (rounds: "
        f"{', '.join(f'{w / ideal:.2f}' for w in whole)})."
    )
    return 0


def _wait_for(count_port: int, server: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the canned server exited with {server.returncode}")
        try:
            _count(count_port)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
