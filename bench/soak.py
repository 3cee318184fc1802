"""Soak: 20,000 requests with 10 % faults of every retryable kind mixed in, beside a clean run.

    python bench/soak.py                  # N = 20,000, 3 rounds, medians
    python bench/soak.py --n 2000 --repeat 1

Each round runs `batcher run` (JSONL in, Parquet out) twice against a fresh simulator process
(20 ms latency): once fault-free, once with 10 % of answers faulty, drawn from every kind that
a retry should overcome (5xx, HTML 502/504, malformed and truncated bodies, no choices, a 200
HTML page, connection resets after the headers and mid-body, stalled bodies, 429s with
retry-after in seconds and as an HTTP date, from a server whose rate-limit headers show capacity:
both runs are given a limit of 1,000,000 RPM). It checks that every id is in the output exactly
once and `ok`, and prints wall times and the ratio.
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

KINDS = (
    "500,502,503,504,malformed,no_choices,wrong_content_type,reset_headers,reset_body,stall,"
    "429,retry_after_date"
)


def one_run(src: Path, out: Path, n: int, faults: bool) -> tuple[float, int, str]:
    # A limit far above what one client sends: every answer carries x-ratelimit-* headers, as
    # a real provider's do, so the injected 429s show capacity (a busy server, not a limit).
    sim_args = ["--seed", "11", "--fault-retry-after", "0.1", "--rpm", "1000000"]
    if faults:
        sim_args += ["--error-rate", "0.1", "--error-kinds", KINDS]
    with running_sim(20, pin=False, extra_args=sim_args) as sim:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "batcher", "run", "--input", str(src), "--output", str(out),
             "--model", "gpt-4o-mini", "--base-url", sim.base_url, "--concurrency", "128",
             "--timeout", "2", "--max-attempts", "12", "--no-progress", "--restart"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        wall = time.monotonic() - started
    ids = pq.read_table(out, columns=["custom_id", "status"]).to_pydict()
    problems = []
    if proc.returncode != 0:
        problems.append(f"exit {proc.returncode}: {proc.stderr[-500:]}")
    if len(ids["custom_id"]) != n or len(set(ids["custom_id"])) != n:
        problems.append(f"{len(ids['custom_id'])} rows, {len(set(ids['custom_id']))} distinct ids")
    if set(ids["status"]) != {"ok"}:
        problems.append(f"statuses {sorted(set(ids['status']))}")
    attempts = proc.stderr.split("attempts (")[-1].split(" retries")[0] if proc.stderr else "?"
    return wall, len(problems), f"retries={attempts} " + "; ".join(problems)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    clean, faulty, failed = [], [], 0
    with tempfile.TemporaryDirectory(prefix="batcher-soak-") as tmp:
        src = write_jsonl(Path(tmp) / "in.jsonl", args.n, model="gpt-4o-mini")
        for round_no in range(args.repeat):
            for faults, walls in ((False, clean), (True, faulty)):
                wall, bad, note = one_run(src, Path(tmp) / "out.parquet", args.n, faults)
                walls.append(wall)
                failed += bad
                label = "faulty" if faults else "clean "
                print(f"round {round_no + 1} {label} {wall:6.1f} s  {note}", flush=True)
    c, f = statistics.median(clean), statistics.median(faulty)
    print(
        f"\nN={args.n:,}, medians of {args.repeat}: clean {c:.1f} s, with 10 % faults "
        f"{f:.1f} s ({f / c:.2f}×); every id once and ok: {'yes' if not failed else 'NO'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
