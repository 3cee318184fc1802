"""Peak memory of `batcher run` as the input grows: does it stay flat?

    python bench/memory.py                              # N = 10⁵ and 10⁶, 0 ms, 3 rounds: ~17 min
    python bench/memory.py --sizes 10000 100000 --repeat 1   # quicker
    python bench/memory.py --parquet --repeat 1         # a Parquet table of questions instead

Each size runs ``python -m batcher run`` (JSONL in, Parquet out, journal on) in a child process
measured with ``os.wait4`` (peak RSS of that process alone), against the simulator in its own
process at 0 ms latency. With ``--parquet`` the input is a Parquet file of one ``question``
column (N rows, a few MB even at a million: read a row group at a time), turned into requests
by ``--template-user``. Exits 1 if a run failed or the output does not hold N ok rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    CLIENT_CORE,
    ChildRun,
    default_pin,
    format_table,
    median,
    running_sim,
    scratch_dir,
    write_jsonl,
)
from _common import run_child as run_measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each size; medians (3)")
    parser.add_argument(
        "--parquet", action="store_true", help="a Parquet table of questions in, with a template"
    )
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=default_pin())
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    runs: dict[int, list[ChildRun]] = {n: [] for n in args.sizes}
    problems: list[str] = []
    journal_mb: dict[int, float] = {}
    with scratch_dir() as tmp, running_sim(0, pin=args.pin) as sim:
        write = write_questions if args.parquet else write_jsonl
        suffix = ".parquet" if args.parquet else ".jsonl"
        inputs = {n: write(tmp / f"in-{n}{suffix}", n) for n in args.sizes}
        template = ["--template-user", "{question}"] if args.parquet else []
        for round_no in range(1, args.repeat + 1):
            for n in args.sizes:  # interleaved, so a slow hour weighs on every size alike
                out = tmp / f"out-{n}.parquet"
                journal = out.with_name(out.name + ".journal")
                for old in (out, journal, out.with_name(out.name + ".rejects.jsonl")):
                    old.unlink(missing_ok=True)  # a fresh run each time, not a resume
                cmd = [
                    sys.executable, "-m", "batcher", "run", "--input", str(inputs[n]),
                    "--output", str(out), "--model", "m", "--base-url", f"{sim.base_url}",
                    "--concurrency", str(args.concurrency), "--no-progress", *template,
                ]  # fmt: skip
                run = run_measured(cmd, core=CLIENT_CORE if args.pin else None, timeout_s=7200)
                ok_rows = 0
                if run.returncode == 0:
                    table = pq.read_table(out, columns=["status"])
                    ok_rows = sum(1 for s in table.column("status").to_pylist() if s == "ok")
                if run.returncode != 0 or ok_rows != n:
                    problems.append(
                        f"N={n}: exit {run.returncode}, {ok_rows} ok rows\n{run.stderr}"
                    )
                    continue  # a failed run's figures are not a measurement
                journal_mb[n] = journal.stat().st_size / 2**20
                runs[n].append(run)
                print(
                    f"round {round_no}/{args.repeat} N={n:,}: {run.wall_s:.1f} s, "
                    f"peak RSS {run.maxrss_mb:.0f} MB",
                    flush=True,
                )
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1
    rows = []
    for n in args.sizes:
        wall = median([r.wall_s for r in runs[n]])
        cpu = median([r.cpu_s for r in runs[n]])
        rss = [r.maxrss_mb for r in runs[n]]
        rows.append(
            [f"{n:,}", f"{wall:.1f}", f"{n / wall:,.0f}", f"{cpu / n * 1e6:,.0f}",
             f"{median(rss):.0f}", ", ".join(f"{x:.0f}" for x in rss), f"{journal_mb[n]:,.0f}"]
        )  # fmt: skip
    print()
    print(
        f"`batcher run` ({'Parquet' if args.parquet else 'JSONL'} in), simulator at 0 ms, "
        f"{args.concurrency} in flight, pinned={args.pin}, "
        f"median of {args.repeat}"
    )
    print()
    headers = ["N", "wall s", "req/s", "CPU µs/req", "peak RSS MB", "each run", "journal MB"]
    print(format_table(headers, rows))
    if len(args.sizes) > 1:
        small, large = min(args.sizes), max(args.sizes)
        low = median([r.maxrss_mb for r in runs[small]])
        high = median([r.maxrss_mb for r in runs[large]])
        print(
            f"\nmedian peak RSS at N={large:,} is {100 * (high / low - 1):.1f} % above "
            f"N={small:,}'s (the target: 10⁶ within 10 % of 10⁵, and at most 120 MB)"
        )
    return 0


def write_questions(path: Path, n: int) -> Path:
    """Write ``n`` questions as a one-column Parquet table (``question``)."""
    questions = pa.array([f"Request {i}: write two sentences about rivers." for i in range(n)])
    pq.write_table(pa.table({"question": questions}), path)
    return path


if __name__ == "__main__":
    sys.exit(main())
