"""One process's ceiling, and the Ray engine on the same machine: ``batcher run`` against the
simulator with no latency and no rate limit, locally and with ``--engine ray``.

    python bench/ray.py --repeat 3                 # N=20000, 256 in flight, 0 ms, 2 Ray workers
    python bench/ray.py --n 5000 --only local      # the local ceiling only

Three ways to run the same job, interleaved, ``--repeat`` rounds, medians:

- ``local``: ``batcher run`` (one process, the default engine);
- ``ray (cold)``: ``batcher run --engine ray``, which starts a local Ray instance for the run
  and stops it after (what a first run on a laptop costs);
- ``ray (warm)``: ``run_job_on_ray`` in a process that started Ray once before the rounds
  (as on a cluster that is already up: no start-up in the figure).

CPU per request is that of the client's whole process tree (the driver, and for Ray its GCS,
raylet and worker processes, all descendants of the driver), sampled from ``/proc`` every
0.1 s: per process the last user+system time seen, summed over every process seen during the
run. Other work on a shared machine is not in it; its load average is printed beside it.
With two or more cores the simulator runs on core 1 and everything else on core 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CLIENT_CORE,
    SimProcess,
    check_sim_count,
    default_pin,
    environment_note,
    format_table,
    median,
    pin_preexec,
    pin_prefix,
    running_sim,
    scratch_dir,
    write_jsonl,
)

TICKS = os.sysconf("SC_CLK_TCK")
PEERS = ("local", "ray-cold", "ray-warm")
LABELS = {"local": "local", "ray-cold": "ray (cold)", "ray-warm": "ray (warm)"}

#: The child that keeps one Ray instance up across rounds: reads one job per stdin line
#: (input, output), runs it, prints its wall time.
WARM_CHILD = """
import io, json, sys, time, warnings
warnings.simplefilter("ignore", DeprecationWarning)
import ray
from batcher.config import JobConfig
from batcher.job_file import with_overrides
from batcher.ray.driver import run_job_on_ray
ray.init(address="local", num_cpus=int(sys.argv[1]), include_dashboard=False, logging_level="ERROR")
print("ready", flush=True)
for line in sys.stdin:
    spec = json.loads(line)
    job = with_overrides(JobConfig(), **spec, progress=False)
    start = time.perf_counter()
    report = run_job_on_ray(job, stream=io.StringIO())
    print(json.dumps({"wall_s": time.perf_counter() - start, "ok": report.stats.ok}), flush=True)
"""


class TreeCPU:
    """CPU seconds of a process and every descendant, sampled from ``/proc`` in a thread."""

    def __init__(self, root: int) -> None:
        self._root = root
        self._seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def total(self) -> float:
        """CPU seconds of every process of the tree seen so far (each at its latest)."""
        self._sample()
        return sum(self._seen.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def _sample(self) -> None:
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            parents[int(entry)] = int(fields[1])
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / TICKS
        tree, frontier = {self._root}, [self._root]
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in tree:
                    tree.add(child)
                    frontier.append(child)
        for pid in tree:
            if pid in cpu:  # a pid reused by another process would only count higher
                self._seen[pid] = max(self._seen.get(pid, 0.0), cpu[pid])


def run_cmd(
    peer: str, sim: SimProcess, input_path: Path, output: Path, args: argparse.Namespace
) -> list[str]:
    cmd = [
        sys.executable, "-m", "batcher", "run", "--input", str(input_path),
        "--output", str(output), "--model", "m", "--base-url", sim.base_url,
        "--concurrency", str(args.concurrency), "--no-progress",
    ]  # fmt: skip
    if peer == "ray-cold":
        cmd += ["--engine", "ray", "--ray-workers", str(args.ray_workers)]
    return cmd


def output_rows(output: Path) -> tuple[int, int]:
    """(rows, ok rows) of a Parquet output, file or folder."""
    import pyarrow.parquet as pq

    statuses = pq.read_table(output, columns=["status"])["status"].to_pylist()
    return len(statuses), sum(s == "ok" for s in statuses)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--ray-workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--only", default=",".join(PEERS), help="comma-separated: " + ", ".join(PEERS)
    )
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=default_pin())
    args = parser.parse_args(argv)
    peers = [p for p in args.only.split(",") if p]
    if any(p not in PEERS for p in peers):
        parser.error(f"--only: choose from {', '.join(PEERS)}")
    core = CLIENT_CORE if args.pin else None
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    figures: dict[str, list[tuple[float, float]]] = {p: [] for p in peers}
    problems: list[str] = []
    print(environment_note(), file=sys.stderr)
    with scratch_dir() as scratch, running_sim(args.latency_ms, pin=args.pin) as sim:
        input_path = write_jsonl(scratch / "in.jsonl", args.n)
        warm, warm_cpu = None, None
        if "ray-warm" in peers:
            warm = subprocess.Popen(
                [*pin_prefix(core), sys.executable, "-c", WARM_CHILD, str(args.ray_workers)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                preexec_fn=pin_preexec(core),
            )  # fmt: skip
            assert warm.stdout is not None and warm.stdin is not None
            if warm.stdout.readline().strip() != "ready":
                raise RuntimeError("the warm Ray child did not start")
            warm_cpu = TreeCPU(warm.pid)
        try:
            for round_no in range(1, args.repeat + 1):
                for peer in peers:
                    with tempfile.TemporaryDirectory(dir=scratch) as folder:
                        output = Path(folder) / "out.parquet"
                        sim.reset()
                        load = os.getloadavg()[0]
                        if peer == "ray-warm":
                            assert warm is not None and warm.stdin and warm.stdout
                            assert warm_cpu is not None
                            spec = {"input": str(input_path), "output": str(output),
                                    "base_url": sim.base_url, "model": "m",
                                    "concurrency": args.concurrency,
                                    "ray_workers": args.ray_workers, "engine": "ray"}  # fmt: skip
                            cpu_before = warm_cpu.total()
                            warm.stdin.write(json.dumps(spec) + "\n")
                            warm.stdin.flush()
                            wall = json.loads(warm.stdout.readline())["wall_s"]
                            cpu = warm_cpu.total() - cpu_before
                        else:
                            start = time.perf_counter()
                            child = subprocess.Popen(
                                [*pin_prefix(core), *run_cmd(peer, sim, input_path, output, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, preexec_fn=pin_preexec(core),
                            )  # fmt: skip
                            tree = TreeCPU(child.pid)
                            _, err = child.communicate()
                            wall = time.perf_counter() - start
                            cpu = tree.total()
                            tree.close()
                            if child.returncode != 0:
                                problems.append(f"{peer}: exit {child.returncode}: {err}")
                        problems += check_sim_count(sim, args.n, peer)
                        rows, ok = output_rows(output)
                        if (rows, ok) != (args.n, args.n):
                            problems.append(f"{peer}: {rows} rows, {ok} ok, not {args.n}")
                    figures[peer].append((wall, cpu))
                    print(
                        f"round {round_no}/{args.repeat} {LABELS[peer]:11} wall {wall:6.2f} s  "
                        f"{args.n / wall:7.0f} req/s  CPU {1e6 * cpu / args.n:5.0f} µs/req  "
                        f"load {load:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            if warm_cpu is not None:
                warm_cpu.close()
            if warm is not None:
                warm.stdin.close()  # type: ignore[union-attr]
                warm.wait(timeout=60)
    rows_out = []
    for peer in peers:
        walls = [w for w, _ in figures[peer]]
        cpus = [c for _, c in figures[peer]]
        rows_out.append([
            LABELS[peer], str(args.n), f"{median(walls):.2f}", f"{args.n / median(walls):.0f}",
            f"{1e6 * median(cpus) / args.n:.0f}",
        ])  # fmt: skip
    print(
        f"N={args.n}, {args.concurrency} in flight, {args.latency_ms:g} ms latency, "
        f"{args.ray_workers} Ray workers, medians of {args.repeat}"
    )
    print(format_table(["engine", "N", "wall s", "req/s", "CPU µs/req"], rows_out))
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
