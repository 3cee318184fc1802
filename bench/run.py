"""End-to-end benchmark: ``batcher run`` (the CLI) beside raw aiohttp, against the simulator.

    python bench/run.py                                  # N=5000, 256 in flight, 200 ms
    python bench/run.py --repeat 3                       # medians of 3, interleaved
    python bench/run.py --latency-ms 0 --repeat 3        # CPU cost per request, no waiting

Each round runs, in child processes measured with ``os.wait4`` (their own wall time, user+system
CPU and peak RSS, start-up and imports included):

* ``aiohttp``: raw aiohttp.ClientSession over the same input (``bench/transports.py --child
  aiohttp``): read the JSONL, POST each body with C in flight, parse every answer;
* ``batcher run``: ``python -m batcher run --input IN.jsonl --output OUT.parquet --model m
  --base-url SIM --concurrency C --no-progress``: the whole tool, reading JSONL, writing Parquet;
* each of the two once more on an empty input: their fixed cost (interpreter start-up, imports,
  set-up and tear-down), from which the ``net CPU µs/req`` column is worked out.

The simulator (``python -m batcher sim``) runs in its own process, pinned to core 1 while the
clients are pinned to core 0 (``--pin``, on by default with 2+ cores).

Exits 1 if any request failed, if ``batcher run`` exited non-zero or wrote other than N ok
rows, or if the simulator's ``/stats`` did not count exactly N requests for each client.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # bench/ is on sys.path (above), so this runs as a plain script
    HEADERS,
    NET_CPU_HEADER,
    ChildRun,
    Measure,
    SimProcess,
    add_measuring_flags,
    check_sim_count,
    environment_note,
    format_table,
    ideal_s,
    log_run,
    measure_quietly,
    median,
    run_against_sim,
    running_sim,
    scratch_dir,
    summary_row,
    write_jsonl,
)

TRANSPORTS = Path(__file__).resolve().parent / "transports.py"
BATCHER = "batcher run"
AIOHTTP = "aiohttp (raw)"


def aiohttp_cmd(base_url: str, input_path: Path, concurrency: int) -> list[str]:
    """The raw-aiohttp baseline: ``transports.py``'s child for the ``aiohttp`` client."""
    return [
        sys.executable, str(TRANSPORTS), "--child", "aiohttp", "--base-url", base_url,
        "--input", str(input_path), "--concurrency", str(concurrency),
    ]  # fmt: skip


def batcher_cmd(base_url: str, input_path: Path, output: Path, concurrency: int) -> list[str]:
    """``batcher run`` as a user would type it (via ``python -m batcher``)."""
    return [
        sys.executable, "-m", "batcher", "run", "--input", str(input_path),
        "--output", str(output), "--model", "m", "--base-url", base_url,
        "--concurrency", str(concurrency), "--no-progress",
    ]  # fmt: skip


def check_output(output: Path, n: int) -> list[str]:
    """Problems with batcher's Parquet output: it must hold N rows, all ``ok``."""
    import pyarrow.parquet as pq

    if not output.exists():
        return [f"{BATCHER}: no output file {output}"]
    statuses = pq.read_table(output, columns=["status"]).column("status").to_pylist()
    problems = []
    if len(statuses) != n:
        problems.append(f"{BATCHER}: the output has {len(statuses)} rows, not {n}")
    failed = sum(status != "ok" for status in statuses)
    if failed:
        problems.append(f"{BATCHER}: {failed} of {n} requests failed")
    return problems


def _child_problems(label: str, child: ChildRun) -> list[str]:
    if child.returncode == 0:
        return []
    tail = " / ".join(child.stderr.strip().splitlines()[-4:])
    return [f"{label}: exited {child.returncode}: {tail}"]


def measure(
    label: str, cmd: list[str], n: int, sim: SimProcess, *, pin: bool, output: Path | None = None
) -> tuple[Measure | None, list[str]]:
    """Run one child against a freshly reset simulator; check the count; return its figures.

    ``output`` is batcher's output file: checked (N rows, all ok), then deleted.
    """
    observed = run_against_sim(cmd, sim, pin=pin)
    child = observed.child
    problems = _child_problems(label, child)
    if label == AIOHTTP and child.returncode == 0:
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        if figures["failed"]:
            problems.append(f"{label}: {figures['failed']} of {n} requests failed")
    problems += check_sim_count(sim, n, label)
    if output is not None:
        if not problems:
            problems += check_output(output, n)
        output.unlink(missing_ok=True)
    result = Measure(
        name=label, n=n, wall_s=child.wall_s, cpu_s=child.cpu_s, maxrss_mb=child.maxrss_mb,
        sim_cpu_s=observed.sim_cpu_s, other_pct=observed.other_pct,
    )  # fmt: skip
    return result, problems


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``bench/run.py``."""
    parser = argparse.ArgumentParser(
        description="Benchmark `batcher run` against the simulator, beside raw aiohttp."
    )
    parser.add_argument("--n", type=int, default=5000, help="requests (5000)")
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight (256)")
    parser.add_argument(
        "--latency-ms", type=float, default=200.0, help="simulator latency; 0 = CPU cost (200)"
    )
    add_measuring_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rounds, print the table of medians; 1 if anything failed."""
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.repeat < 1 or args.latency_ms < 0:
        raise SystemExit("--n, --concurrency and --repeat must be >= 1, --latency-ms >= 0")
    runs: dict[str, list[Measure]] = {AIOHTTP: [], BATCHER: []}
    fixed: dict[str, list[Measure]] = {AIOHTTP: [], BATCHER: []}
    problems: list[str] = []
    print(f"# {environment_note()}", file=sys.stderr)
    with scratch_dir() as tmp, running_sim(args.latency_ms, pin=args.pin) as sim:
        inputs = {args.n: write_jsonl(tmp / "input.jsonl", args.n), 0: tmp / "empty.jsonl"}
        inputs[0].write_text("")
        for round_no in range(1, args.repeat + 1):
            for n, table in ((args.n, runs), (0, fixed)):
                output = tmp / f"out-{round_no}-{n}.parquet"
                commands = {
                    AIOHTTP: aiohttp_cmd(sim.base_url, inputs[n], args.concurrency),
                    BATCHER: batcher_cmd(sim.base_url, inputs[n], output, args.concurrency),
                }
                for label, cmd in commands.items():
                    result, found = measure_quietly(
                        functools.partial(
                            measure, label, cmd, n, sim, pin=args.pin,
                            output=output if label == BATCHER else None,
                        ),
                        label=label,
                        max_other=args.max_other,
                        retries=args.busy_retries,
                    )  # fmt: skip
                    problems += found
                    if result is not None:
                        table[label].append(result)
                        log_run(round_no, args.repeat, result)
    _report(args, runs, fixed)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    if args.json:
        raw = {
            "runs": {k: [vars(m) for m in v] for k, v in runs.items()},
            "empty_input": {k: [vars(m) for m in v] for k, v in fixed.items()},
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 1 if problems else 0


def _report(
    args: argparse.Namespace, runs: dict[str, list[Measure]], fixed: dict[str, list[Measure]]
) -> None:
    ideal = ideal_s(args.n, args.latency_ms, args.concurrency)
    headers = list(HEADERS)
    headers.insert(headers.index("CPU µs/req") + 1, NET_CPU_HEADER)
    rows = [
        summary_row(runs[label], ideal, median([m.cpu_s for m in fixed[label]]))
        for label in (AIOHTTP, BATCHER)
    ]
    ideal_text = f"ideal {ideal:.2f} s = N × latency / concurrency" if ideal else "no ideal"
    print(
        f"\n{args.concurrency} in flight, simulator latency {args.latency_ms:g} ms, "
        f"median of {args.repeat} run(s), pinned={'yes' if args.pin else 'no'}; {ideal_text}\n"
    )
    print(format_table(headers, rows))
    print("\nfixed cost (same command, empty input): ", end="")
    print(
        "; ".join(
            f"{label}: {median([m.wall_s for m in fixed[label]]):.2f} s wall, "
            f"{1000 * median([m.cpu_s for m in fixed[label]]):.0f} ms CPU, "
            f"{median([m.maxrss_mb for m in fixed[label]]):.0f} MB"
            for label in (AIOHTTP, BATCHER)
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
