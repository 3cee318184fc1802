"""A long outage in the middle of a run: nothing lost, nothing failed.

    python bench/outage.py                  # a 120 s outage
    python bench/outage.py --outage-s 10

Starts the simulator (100 ms latency) and `batcher run` (600 requests, 8 in flight, the default
retry policy: 6 attempts), kills the simulator once a third of the requests are recorded,
starts it again on the same port after --outage-s seconds, and checks the output: every id once
and ok. Prints what batcher printed about the outage and the wall times, and the gaps between
the log's lines (stderr is a pipe, not a terminal: a line at least every 60 s is the promise),
measured as they arrived.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import free_port, write_jsonl


def start_sim(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "batcher", "sim", "--port", str(port), "--latency-ms", "100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(400):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the simulator did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-s", type=float, default=120.0)
    parser.add_argument("--n", type=int, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batcher-outage-") as tmp:
        src = write_jsonl(Path(tmp) / "in.jsonl", args.n, model="gpt-4o-mini")
        out = Path(tmp) / "out.jsonl"
        journal = out.with_name(out.name + ".journal")
        port = free_port()
        sim = start_sim(port)
        started = time.monotonic()
        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "batcher",
                "run",
                "--input",
                str(src),
                "--output",
                str(out),
                "--model",
                "gpt-4o-mini",
                "--base-url",
                f"http://127.0.0.1:{port}/v1",
                "--concurrency",
                "8",
                "--no-progress",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        arrived: list[tuple[float, str]] = []  # (when, line) as batcher wrote them
        reader = threading.Thread(target=_read_lines, args=(run, arrived), daemon=True)
        reader.start()
        while not (journal.exists() and journal.read_bytes().count(b"\n") > args.n // 3):
            time.sleep(0.05)
        sim.kill()
        sim.wait()
        down_at = time.monotonic()
        time.sleep(args.outage_s)
        sim = start_sim(port)
        print(f"simulator down for {time.monotonic() - down_at:.1f} s", flush=True)
        run.wait()
        reader.join()
        stderr = "\n".join(line for _, line in arrived)
        wall = time.monotonic() - started
        sim.kill()
        sim.wait()
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["custom_id"] for r in rows]
    ok = all(r["error"] is None for r in rows)
    print("\n".join(line for line in stderr.splitlines() if "endpoint" in line))
    _print_gaps(arrived, down_at)
    print(
        f"exit {run.returncode}; {len(ids):,} records, {len(set(ids)):,} distinct, "
        f"all ok: {ok}; wall {wall:.1f} s"
    )
    return 0 if run.returncode == 0 and ok and len(set(ids)) == len(ids) == args.n else 1


def _read_lines(run: subprocess.Popen[str], arrived: list[tuple[float, str]]) -> None:
    assert run.stderr is not None
    for line in run.stderr:
        arrived.append((time.monotonic(), line.rstrip("\n")))


def _print_gaps(arrived: list[tuple[float, str]], down_at: float) -> None:
    """The longest silences of the log: between any two lines, and between progress lines
    (those with a UTC timestamp) from the outage's start to the end of the run."""
    stamped = [t for t, line in arrived if line[:4].isdigit() and " batcher: " in line]
    gaps = [b - a for a, b in itertools.pairwise(stamped)]
    during = [b - a for a, b in itertools.pairwise(stamped) if b >= down_at]
    any_gap = max((b - a for (a, _), (b, _) in itertools.pairwise(arrived)), default=0)
    print(
        f"log: {len(arrived)} lines, {len(stamped)} progress lines; longest gap between any two "
        f"lines {any_gap:.1f} s; between progress lines {max(gaps, default=0):.1f} s overall, "
        f"{max(during, default=0):.1f} s from the outage on "
        f"(gaps then: {', '.join(f'{g:.1f}' for g in during)})"
    )
    print("\n".join(line for t, line in arrived if t >= down_at and line[:4].isdigit())[:4000])


if __name__ == "__main__":
    sys.exit(main())
