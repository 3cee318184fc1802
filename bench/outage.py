"""A long outage in the middle of a run: nothing lost, nothing failed.

    python bench/outage.py                  # a 120 s outage
    python bench/outage.py --outage-s 10

Starts the simulator (100 ms latency) and `batcher run` (600 requests, 8 in flight, the default
retry policy: 6 attempts), kills the simulator once a third of the requests are recorded,
starts it again on the same port after --outage-s seconds, and checks the output: every id once
and ok. Prints what batcher printed about the outage and the wall times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
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
        while not (journal.exists() and journal.read_bytes().count(b"\n") > args.n // 3):
            time.sleep(0.05)
        sim.kill()
        sim.wait()
        down_at = time.monotonic()
        time.sleep(args.outage_s)
        sim = start_sim(port)
        print(f"simulator down for {time.monotonic() - down_at:.1f} s", flush=True)
        _, stderr = run.communicate()
        wall = time.monotonic() - started
        sim.kill()
        sim.wait()
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["custom_id"] for r in rows]
    ok = all(r["error"] is None for r in rows)
    print("\n".join(line for line in stderr.splitlines() if "endpoint" in line))
    print(
        f"exit {run.returncode}; {len(ids):,} records, {len(set(ids)):,} distinct, "
        f"all ok: {ok}; wall {wall:.1f} s"
    )
    return 0 if run.returncode == 0 and ok and len(set(ids)) == len(ids) == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
