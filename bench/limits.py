"""Rate-limit benchmarks: does `batcher run` hold the line at a server's limits?

    python bench/limits.py                       # all scenarios, medians of 3 (about 8 min)
    python bench/limits.py --only a,d --repeat 1

Scenarios (each: the simulator in its own process with limits, `batcher run` against it):

  a  server 600 RPM, batcher told --rpm 600: achieved RPM over the run, 429s, failures
  b  server 600 RPM, batcher told nothing:    achieved RPM after the first 30 s, 429s, failures
  c  server 100,000 TPM, prompts of mixed length, batcher told --tpm 100000:
     achieved TPM (tokens the server's limit was charged per minute), 429s, failures
  d  1% of answers are 429 with retry-after: 5 (a limit batcher was not told about):
     requests that arrived in the 5 s after a 429 was answered (should be 0, but for requests
     already sent: counted from 20 ms after, and from 0.5 s after)

Achieved rates come from the simulator's own log of arrivals (GET /log) and its /stats.
Scenarios run one after another: jitter from a busy CPU bunches requests, which is what a
shared server's 429s are made of, so nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import running_sim, write_jsonl

TOPICS = ["tides", "glaciers", "comets", "ferns", "bridges", "jazz", "volcanoes", "bees"]


@dataclass(frozen=True)
class Scenario:
    name: str
    sim_args: tuple[str, ...]
    run_args: tuple[str, ...]
    n: int
    mixed: bool = False


SCENARIOS = {
    "a": Scenario("a", ("--rpm", "600", "--latency-ms", "100"), ("--rpm", "600"), 1300),
    "b": Scenario("b", ("--rpm", "600", "--latency-ms", "100"), (), 1300),
    "c": Scenario("c", ("--tpm", "100000", "--latency-ms", "100"), ("--tpm", "100000"), 700, True),
    "d": Scenario(
        "d",
        ("--latency-ms", "50", "--error-rate", "0.01", "--error-kinds", "429",
         "--fault-retry-after", "5"),
        (),
        600,
    ),
}  # fmt: skip


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def write_mixed(path: Path, n: int) -> Path:
    """Prompts from 5 to about 600 words, max_tokens 100: token costs from ~110 to ~900."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            words = 5 + (i * 7919) % 600
            text = " ".join(TOPICS[(i + k) % len(TOPICS)] for k in range(words))
            line = {"custom_id": f"m{i}", "prompt": f"Summarise: {text}", "max_tokens": 100}
            f.write(json.dumps(line) + "\n")
    return path


def run_scenario(sc: Scenario, workdir: Path) -> dict[str, float]:
    # the scenario's own --latency-ms comes after running_sim's and wins
    with running_sim(0, pin=False, extra_args=sc.sim_args) as sim:
        base = sim.base_url.removesuffix("/v1")
        src = workdir / f"{sc.name}.jsonl"
        if sc.mixed:
            write_mixed(src, sc.n)
        else:
            write_jsonl(src, sc.n)
        out = workdir / f"{sc.name}.parquet"
        cmd = [
            sys.executable, "-m", "batcher", "run", "--input", str(src), "--output", str(out),
            "--model", "gpt-4o-mini", "--base-url", sim.base_url, "--concurrency", "64",
            "--no-progress", "--restart", "--max-attempts", "10", *sc.run_args,
        ]  # fmt: skip
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        stats, log = get(f"{base}/stats"), get(f"{base}/log")
    arrivals = sorted(log["arrivals"])
    result = {
        "exit": float(proc.returncode),
        "wall_s": wall,
        "ok": float(stats["answered_ok"]),
        "failed": float(sc.n - stats["answered_ok"]) if proc.returncode in (0, 1) else float(sc.n),
        "429_pct": 100.0 * stats["rejected_429"] / max(1, stats["requests_received"]),
        "faults_429": float(stats["faults_injected"]),
    }
    admitted_span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    if sc.name in ("a", "b"):
        start = arrivals[0] + (30.0 if sc.name == "b" else 0.0)
        window = [t for t in arrivals if t >= start]
        # requests admitted per minute over the window (429s are not admitted)
        admitted = len(window) - sum(1 for t in log["rate_limited"] if t >= start)
        span = arrivals[-1] - start
        result["rpm"] = 60.0 * admitted / span if span > 0 else 0.0
        result["pct_of_limit"] = 100.0 * result["rpm"] / 600
    if sc.name == "c":
        result["tpm"] = 60.0 * stats["tokens_charged"] / admitted_span if admitted_span else 0.0
        result["pct_of_limit"] = 100.0 * result["tpm"] / 100_000
    if sc.name == "d":
        sent_in_window = 0
        for t in log["rate_limited"]:
            # 20 ms of slack: requests already on the wire when the 429 was answered
            sent_in_window += sum(1 for a in arrivals if t + 0.02 < a < t + 5.0)
        result["sent_in_429_windows"] = float(sent_in_window)
        # The same from 0.5 s after each 429: a request the client sent before the 429 reached
        # it can arrive more than 20 ms later on a loaded machine; none may arrive this late.
        late = sum(sum(1 for a in arrivals if t + 0.5 < a < t + 5.0) for t in log["rate_limited"])
        result["sent_0.5s_after_429"] = float(late)
    if proc.returncode not in (0,):
        result["stderr_tail"] = 0.0
        print(f"[{sc.name}] exit {proc.returncode}: {proc.stderr[-800:]}", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="a,b,c,d")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every N (quick runs)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="batcher-limits-") as tmp:
        for round_no in range(args.repeat):
            for group in (["a"], ["b"], ["c"], ["d"]):
                chosen = [n for n in group if n in names]
                threads = []
                for name in chosen:
                    workdir = Path(tmp) / f"{name}-{round_no}"
                    workdir.mkdir()

                    def work(name: str = name, workdir: Path = workdir) -> None:
                        sc = SCENARIOS[name]
                        sc = Scenario(sc.name, sc.sim_args, sc.run_args,
                                      max(20, round(sc.n * args.scale)), sc.mixed)  # fmt: skip
                        runs[name].append(run_scenario(sc, workdir))

                    threads.append(threading.Thread(target=work))
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            print(f"round {round_no + 1}/{args.repeat} done", file=sys.stderr, flush=True)
    print(f"medians of {args.repeat}")
    failed = False
    for name in names:
        keys = sorted({k for r in runs[name] for k in r})
        medians = {k: statistics.median(r.get(k, 0.0) for r in runs[name]) for k in keys}
        every = {k: [round(r.get(k, 0.0), 1) for r in runs[name]] for k in keys}
        print(f"{name}: " + ", ".join(f"{k}={medians[k]:.1f} {every[k]}" for k in keys))
        failed |= any(r["failed"] for r in runs[name])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
