"""Sporadic 429s: a busy server's refusals must cost their retries, not the run's speed.

    python bench/sporadic.py                  # N = 5,000, 3 rounds, medians
    python bench/sporadic.py --n 20000 --repeat 5

Each round runs `batcher run` (JSONL in, Parquet out, 128 in flight) against a fresh simulator
process (20 ms latency) three or more times side by side: fault-free, then with 2 % and 5 % of
answers a 429 with `retry-after: 0.5` whose rate-limit headers show capacity (the simulator is
given a limit of 1,000,000 RPM in every run, so all its answers carry `x-ratelimit-*` headers
as a real provider's do, and the 429s show thousands of requests remaining), and with 2 % of
the `overloaded` fault (a 429 with no such headers whose error says the server is overloaded).
Prints each run's wall time and the ratio of the medians to the clean run; checks that every id
is in the output exactly once and `ok`. Beside each faulty run, a reference: the clean run's
median plus the longest chain of retry-afters one request met (its attempts less one, times
0.5 s): what a client that honours `retry-after` pays when that request was refused near the
end. `--raw` runs a bare aiohttp loop beside batcher in every case (`bench/_raw.py`: the same
128 in flight, 12 attempts, every 429 retried after its `retry-after-ms`, the answers written to
Parquet at the end).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from _common import running_sim, write_jsonl
from _raw import raw_cmd

#: name -> the simulator's fault arguments
CASES = {
    "clean": (),
    "429 2%": ("--error-rate", "0.02", "--error-kinds", "429"),
    "429 5%": ("--error-rate", "0.05", "--error-kinds", "429"),
    "overloaded 2%": ("--error-rate", "0.02", "--error-kinds", "overloaded"),
}


def one_run(
    src: Path, out: Path, n: int, faults: tuple[str, ...], *, raw: bool = False
) -> tuple[float, int, str]:
    """Wall time, the most attempts one request took, and a note."""
    sim_args = ["--seed", "7", "--rpm", "1000000", "--fault-retry-after", "0.5", *faults]
    with running_sim(20, pin=False, extra_args=sim_args) as sim:
        started = time.monotonic()
        if raw:
            cmd = raw_cmd(sim.base_url, src, out)
        else:
            cmd = [sys.executable, "-m", "batcher", "run", "--input", str(src), "--output",
                   str(out), "--model", "gpt-4o-mini", "--base-url", sim.base_url,
                   "--concurrency", "128", "--max-attempts", "12", "--no-progress",
                   "--restart"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
    problems = []
    chain = 0
    if proc.returncode != 0:
        problems.append(f"exit {proc.returncode}: {proc.stderr[-500:]}")
    else:
        ids = pq.read_table(out, columns=["custom_id", "status", "attempts"]).to_pydict()
        chain = max(ids["attempts"]) - 1
        if len(ids["custom_id"]) != n or len(set(ids["custom_id"])) != n:
            problems.append(f"{len(ids['custom_id'])} rows for {n} ids")
        if set(ids["status"]) != {"ok"}:
            problems.append(f"statuses {sorted(set(ids['status']))}")
    line = next((x.strip() for x in proc.stderr.splitlines() if x.strip().startswith("429s")), "")
    return wall, chain, "; ".join([line, *problems]) if problems else line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--raw", action="store_true", help="a bare aiohttp loop beside batcher")
    args = parser.parse_args()
    names = [c for c in args.cases.split(",") if c]
    if args.raw:
        CASES.update({f"{name} raw": CASES[name] for name in names})
        names = [n for name in names for n in (name, f"{name} raw")]
    walls: dict[str, list[float]] = {name: [] for name in names}
    chains: dict[str, list[int]] = {name: [] for name in names}
    failed = 0
    with tempfile.TemporaryDirectory(prefix="batcher-sporadic-") as tmp:
        src = write_jsonl(Path(tmp) / "in.jsonl", args.n, model="gpt-4o-mini")
        for round_no in range(args.repeat):
            for name in names:
                wall, chain, note = one_run(
                    src, Path(tmp) / "out.parquet", args.n, CASES[name], raw=name.endswith(" raw")
                )
                walls[name].append(wall)
                chains[name].append(chain)
                failed += "exit" in note or "rows" in note or "statuses" in note
                print(f"round {round_no + 1} {name:14} {wall:6.2f} s  {note}", flush=True)
    print(f"\nN={args.n:,}, 128 in flight, 20 ms, medians of {args.repeat}:")
    for name in names:
        clean = "clean raw" if name.endswith(" raw") else "clean"
        base = statistics.median(walls[clean]) if clean in walls else None
        m = statistics.median(walls[name])
        ratio = f" ({m / base:.2f}× {clean})" if base else ""
        if base and name != clean:
            floor = base + 0.5 * statistics.median(chains[name])
            ratio += f"; clean + longest retry chain {floor:.2f} s ({floor / base:.2f}×)"
        print(f"  {name:14} {m:6.2f} s{ratio}")
    print(f"every id once and ok: {'yes' if not failed else 'NO'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
