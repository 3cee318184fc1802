"""Peak memory of `batcher run` as the input grows: does it stay flat?

    python bench/memory.py                              # N = 100,000 and 1,000,000, 0 ms
    python bench/memory.py --sizes 10000 100000         # quicker

Each size runs ``python -m batcher run`` (JSONL in, Parquet out, journal on) in a child process
measured with ``os.wait4`` (peak RSS of that process alone), against the simulator in its own
process at 0 ms latency. Exits 1 if a run failed or the output does not hold N ok rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    CLIENT_CORE,
    default_pin,
    format_table,
    running_sim,
    scratch_dir,
    write_jsonl,
)
from _common import run_child as run_measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=default_pin())
    args = parser.parse_args()
    rows, problems = [], []
    with scratch_dir() as tmp, running_sim(0, pin=args.pin) as sim:
        for n in args.sizes:
            src = write_jsonl(tmp / f"in-{n}.jsonl", n)
            out = tmp / f"out-{n}.parquet"
            cmd = [
                sys.executable, "-m", "batcher", "run", "--input", str(src), "--output",
                str(out), "--model", "m", "--base-url", f"{sim.base_url}",
                "--concurrency", str(args.concurrency), "--no-progress",
            ]  # fmt: skip
            run = run_measured(cmd, core=CLIENT_CORE if args.pin else None, timeout_s=7200)
            ok_rows = 0
            if run.returncode == 0:
                table = pq.read_table(out, columns=["status"])
                ok_rows = sum(1 for s in table.column("status").to_pylist() if s == "ok")
            if run.returncode != 0 or ok_rows != n:
                problems.append(f"N={n}: exit {run.returncode}, {ok_rows} ok rows\n{run.stderr}")
            journal_mb = (out.with_name(out.name + ".journal.jsonl").stat().st_size) / 2**20
            rows.append(
                [f"{n:,}", f"{run.wall_s:.1f}", f"{n / run.wall_s:,.0f}",
                 f"{run.cpu_s / n * 1e6:,.0f}", f"{run.maxrss_mb:.0f}", f"{journal_mb:,.0f}"]
            )  # fmt: skip
            print(f"N={n:,}: {run.wall_s:.1f} s, peak RSS {run.maxrss_mb:.0f} MB", flush=True)
            src.unlink()
    print()
    print(f"`batcher run`, simulator at 0 ms, {args.concurrency} in flight, pinned={args.pin}")
    print()
    headers = ["N", "wall s", "req/s", "CPU µs/req", "peak RSS MB", "journal MB"]
    print(format_table(headers, rows))
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
