"""The Ray engine's driver as the input grows: time to the first request and the driver's peak
memory, at 100,000 and 1,000,000 lines, on a local Ray instance.

    python bench/ray_driver.py                           # N = 100000,1000000; 20 s watched
    python bench/ray_driver.py --n 100000 --watch-s 10
    python bench/ray_driver.py --checkout /path/to/other/batcher   # another version, same run

For each N: an input of N short request lines (``_common.write_jsonl``), the simulator in its
own process (``--latency-ms``, so the run is bounded by the watch, not by N), and
``python -m batcher run --engine ray`` (two workers, a local Ray instance started by the run)
as a child. Every 50 ms the script reads the simulator's ``requests_received`` and the
driver's ``VmRSS`` (``/proc/PID/status``). Measured:

- **first request**: seconds from starting the driver process to the first request the
  simulator received (Ray's own start included: 8-13 s on a 2-core machine);
- **driver peak RSS**: the kernel's high-water mark of the driver process alone
  (``VmHWM``, read just before the stop), not Ray's worker processes;
- **requests by the end**: what the simulator received by the end of the watch.

The watch lasts ``--watch-s`` seconds after the first request (or ``--timeout-s`` if none came);
then the driver gets SIGTERM (a graceful stop, as ``ray job stop``) and, if it is still there
after ``--stop-s``, SIGKILL (and Ray's processes under it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MODEL, environment_note, format_table, running_sim, scratch_dir, write_jsonl

POLL_S = 0.05


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB; zeros once it is gone."""
    values = {"VmRSS:": 0.0, "VmHWM:": 0.0}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] in values:
                values[fields[0]] = int(fields[1]) / 1024
    return values["VmRSS:"], values["VmHWM:"]


def descendants(root: int) -> list[int]:
    """Every process under ``root`` (to end Ray's processes if the driver must be killed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def measure(n: int, args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    """One driver run over an input of ``n`` lines, watched as the module says."""
    src = write_jsonl(scratch / f"in-{n}.jsonl", n)
    out = scratch / f"out-{n}.parquet"
    env = dict(os.environ, PYTHONPATH=str(args.checkout), PYTHONUNBUFFERED="1")
    with running_sim(args.latency_ms, pin=False) as sim:
        cmd = [
            sys.executable, "-m", "batcher", "run", "--engine", "ray",
            "--input", str(src), "--output", str(out), "--base-url", sim.base_url,
            "--model", MODEL, "--ray-workers", str(args.workers), "--no-progress",
            "--concurrency", str(args.concurrency), "--grace", "1",
        ]  # fmt: skip
        started = time.monotonic()
        driver = subprocess.Popen(
            cmd,
            cwd=args.checkout,  # python -m puts the working directory first on the path
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        first: float | None = None
        peak_sampled = 0.0
        hwm = 0.0
        deadline = started + args.timeout_s
        received = 0
        while time.monotonic() < deadline and driver.poll() is None:
            rss, hwm = rss_mb(driver.pid)
            peak_sampled = max(peak_sampled, rss)
            received = int(sim.stats()["requests_received"])
            if first is None and received:
                first = time.monotonic() - started
                deadline = time.monotonic() + args.watch_s
            time.sleep(POLL_S)
        _, hwm_end = rss_mb(driver.pid)
        hwm = max(hwm, hwm_end)
        under = descendants(driver.pid)
        driver.send_signal(signal.SIGTERM)
        try:
            driver.wait(timeout=args.stop_s)
        except subprocess.TimeoutExpired:
            for pid in [driver.pid, *under]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            driver.wait()
        err = driver.stderr.read().decode(errors="replace") if driver.stderr else ""
        if first is None:
            print(f"N={n}: no request reached the simulator; driver said:\n{err}", file=sys.stderr)
    return {
        "n": n,
        "first_s": first if first is not None else float("nan"),
        "hwm_mb": hwm,
        "sampled_mb": peak_sampled,
        "received": received,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="100000,1000000", help="input sizes, comma-separated")
    parser.add_argument("--watch-s", type=float, default=20.0)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--stop-s", type=float, default=60.0)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--checkout", type=Path, default=Path(__file__).resolve().parent.parent,
        help="the batcher checkout to run (default: this one)",
    )  # fmt: skip
    args = parser.parse_args()
    rows = []
    with scratch_dir() as scratch:
        for n in (int(x) for x in args.n.split(",")):
            m = measure(n, args, scratch)
            print(m, flush=True)
            rows.append(
                [
                    f"{n:,}", f"{m['first_s']:.1f}", f"{m['hwm_mb']:.0f}",
                    f"{m['sampled_mb']:.0f}", f"{int(m['received']):,}",
                ]
            )  # fmt: skip
    headers = ["lines", "first request s", "driver peak RSS MB", "sampled max MB", "requests"]
    print(format_table(headers, rows))
    print(environment_note())


if __name__ == "__main__":
    main()
