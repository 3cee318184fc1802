"""End-to-end benchmark: ``batcher run`` (the CLI) beside its peers, against the simulator.

    python bench/run.py --repeat 3                       # all four peers, N=5000, 256, 200 ms
    python bench/run.py --latency-ms 0 --repeat 3        # CPU cost per request, no waiting
    python bench/run.py --n-for httpx=1000               # a smaller N for the slow httpx pool
                                                         # (its cost per request varies with N)
    python bench/run.py --skip httpx,openai              # batcher and raw aiohttp only

Each round runs every peer on the same JSONL input with C in flight, each in a child process
measured with ``os.wait4`` (its own wall time, user+system CPU and peak RSS, start-up and imports
included):

* ``aiohttp (raw)``: ``transports.py --child aiohttp``: read the JSONL, POST each body on an
  ``aiohttp.ClientSession`` with ``TCPConnector(limit=C)``, parse every answer;
* ``httpx (raw)``: ``transports.py --child httpx-default``: the same on ``httpx.AsyncClient``
  with its own pool, ``Limits(max_connections=C)``;
* ``openai SDK``: ``transports.py --child openai``: ``openai.AsyncOpenAI(base_url=SIM)`` with
  the SDK's defaults, ``await client.chat.completions.create(**body)`` for each line (skipped
  with a note when ``openai`` is not installed);
* ``batcher run``: ``python -m batcher run --input IN.jsonl --output OUT.parquet --model m
  --base-url SIM --concurrency C --no-progress``: the whole tool, reading JSONL, writing Parquet;
* each of them once more on a one-line input: their fixed cost (interpreter start-up, imports,
  set-up and tear-down, and what a first request loads: batcher's token tables, pyarrow), from
  which the ``net CPU µs/req`` column is worked out as (CPU - fixed CPU) / (N - 1).

The three raw clients keep C requests in flight with C workers pulling from one shared iterator
(the same bound as an ``asyncio.Semaphore(C)`` around ``gather``). The simulator (``python -m
batcher sim``) runs in its own process, pinned to core 1 while the clients are pinned to core 0
(``--pin``, on by default with 2+ cores). ``wall ÷ aiohttp`` is the median, over rounds, of each
peer's wall time per request over raw aiohttp's in the same round (the wall-time ratio when both
ran the same N).

Exits 1 if any request failed, if a child exited non-zero, if ``batcher run`` wrote other than N
ok rows, or if the simulator's ``/stats`` did not count exactly N requests for each run (so a
request the openai SDK retried fails the benchmark too).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # bench/ is on sys.path (above), so this runs as a plain script
    HEADERS,
    NET_CPU_HEADER,
    Measure,
    SimProcess,
    add_measuring_flags,
    add_selection_flags,
    check_sim_count,
    child_problems,
    environment_note,
    format_table,
    ideal_s,
    installed,
    log_run,
    measure_quietly,
    median,
    run_against_sim,
    running_sim,
    scratch_dir,
    selected,
    summary_row,
    write_jsonl,
)

TRANSPORTS = Path(__file__).resolve().parent / "transports.py"
RATIO_HEADER = "wall ÷ aiohttp"
TARGET = 1.15  # the targets: within 1.15× of raw aiohttp's wall time, and ≤ 1.15× ideal


@dataclass(frozen=True)
class Peer:
    """One peer: its ``--only``/``--skip``/``--n-for`` name, its table label, how it runs."""

    key: str
    label: str
    child: str = ""  # transports.py --child NAME; "" for batcher run
    requires: str = ""  # a module that must be installed, else the peer is skipped
    http: str = ""  # batcher run's --http, when not the default


PEERS = (
    Peer("aiohttp", "aiohttp (raw)", "aiohttp"),
    Peer("aiohttp-durable", "aiohttp + journal + Parquet", "aiohttp-durable"),
    Peer("httpx", "httpx (raw)", "httpx-default"),
    Peer("openai", "openai SDK", "openai", "openai"),
    Peer("batcher", "batcher run"),
    Peer("batcher-pyreqwest", "batcher --http pyreqwest", requires="pyreqwest", http="pyreqwest"),
    Peer("batcher-aiohttp", "batcher --http aiohttp", http="aiohttp"),
)
_BY_KEY = {peer.key: peer for peer in PEERS}
BASELINE = _BY_KEY["aiohttp"]
BATCHER = _BY_KEY["batcher"]
#: The peers that are ``batcher run`` (checked against the targets).
BATCHERS = tuple(peer for peer in PEERS if not peer.child)


def peer_cmd(peer: Peer, base_url: str, input_path: Path, output: Path, c: int) -> list[str]:
    """The command of one peer: a ``transports.py`` child, or ``batcher run`` as a user would
    type it (via ``python -m batcher``), writing ``output``."""
    if peer.child:
        return [
            sys.executable, str(TRANSPORTS), "--child", peer.child, "--base-url", base_url,
            "--input", str(input_path), "--concurrency", str(c),
        ]  # fmt: skip
    return [
        sys.executable, "-m", "batcher", "run", "--input", str(input_path),
        "--output", str(output), "--model", "m", "--base-url", base_url,
        "--concurrency", str(c), "--no-progress", *(("--http", peer.http) if peer.http else ()),
    ]  # fmt: skip


def check_output(output: Path, n: int, label: str = BATCHER.label) -> list[str]:
    """Problems with batcher's Parquet output: it must hold N rows, all ``ok``."""
    import pyarrow.parquet as pq

    if not output.exists():
        return [f"{label}: no output file {output}"]
    statuses = pq.read_table(output, columns=["status"]).column("status").to_pylist()
    problems = []
    if len(statuses) != n:
        problems.append(f"{label}: the output has {len(statuses)} rows, not {n}")
    failed = sum(status != "ok" for status in statuses)
    if failed:
        problems.append(f"{label}: {failed} of {n} requests failed")
    return problems


def measure(
    peer: Peer, input_path: Path, n: int, sim: SimProcess, *, concurrency: int, pin: bool
) -> tuple[Measure | None, list[str]]:
    """Run one child against a freshly reset simulator; check the count; return its figures.

    A raw client's failures come from its final JSON line; batcher's output is checked (N
    rows, all ok). Every call gets a fresh folder for that output: a second try (busy machine)
    on the same output would resume from the first one's journal and send nothing.
    """
    with tempfile.TemporaryDirectory(prefix="batcher-bench-out-") as folder:
        output = Path(folder) / "out.parquet"
        cmd = peer_cmd(peer, sim.base_url, input_path, output, concurrency)
        observed = run_against_sim(cmd, sim, pin=pin)
        child = observed.child
        problems = child_problems(peer.label, child, n, outcome=bool(peer.child))
        problems += check_sim_count(sim, n, peer.label)
        if not peer.child and not problems:
            problems += check_output(output, n, peer.label)
    result = Measure(
        name=peer.label, n=n, wall_s=child.wall_s, cpu_s=child.cpu_s, maxrss_mb=child.maxrss_mb,
        sim_cpu_s=observed.sim_cpu_s, other_pct=observed.other_pct,
    )  # fmt: skip
    return result, problems


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``bench/run.py``."""
    parser = argparse.ArgumentParser(
        description="Benchmark `batcher run` beside raw aiohttp, raw httpx and the openai SDK, "
        "against the simulator.",
        epilog="peers: " + ", ".join(f"{peer.key} ({peer.label})" for peer in PEERS),
    )
    parser.add_argument("--n", type=int, default=5000, help="requests per peer (5000)")
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight (256)")
    parser.add_argument(
        "--latency-ms", type=float, default=200.0, help="simulator latency; 0 = CPU cost (200)"
    )
    add_selection_flags(parser, list(_BY_KEY), what="peer", slow="httpx")
    add_measuring_flags(parser)
    return parser


def _selected(args: argparse.Namespace) -> list[Peer]:
    peers = []
    for key in selected(args, list(_BY_KEY)):
        peer = _BY_KEY[key]
        if peer.requires and not installed(peer.requires):
            print(
                f"skipping {peer.label}: {peer.requires} is not installed "
                "(pip install -e '.[bench]')",
                file=sys.stderr,
            )
            continue
        peers.append(peer)
    return peers


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rounds, print the table of medians; 1 if anything failed."""
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.repeat < 1 or args.latency_ms < 0:
        raise SystemExit("--n, --concurrency and --repeat must be >= 1, --latency-ms >= 0")
    peers = _selected(args)
    if not peers:
        raise SystemExit("no peer left to run")
    n_for = dict(args.n_for)
    sizes = {peer.key: n_for.get(peer.key, args.n) for peer in peers}
    runs: dict[str, list[Measure]] = {peer.key: [] for peer in peers}
    fixed: dict[str, list[Measure]] = {peer.key: [] for peer in peers}
    rounds: list[dict[str, Measure]] = []
    problems: list[str] = []
    print(f"# {environment_note()}", file=sys.stderr)
    with scratch_dir() as tmp, running_sim(args.latency_ms, pin=args.pin) as sim:
        inputs = {n: write_jsonl(tmp / f"input-{n}.jsonl", n) for n in set(sizes.values())}
        inputs[1] = write_jsonl(tmp / "input-1.jsonl", 1)  # the fixed cost: see the docstring
        for round_no in range(1, args.repeat + 1):
            rounds.append({})
            for once in (False, True):
                for peer in peers:
                    n = 1 if once else sizes[peer.key]
                    result, found = measure_quietly(
                        functools.partial(
                            measure,
                            peer,
                            inputs[n],
                            n,
                            sim,
                            concurrency=args.concurrency,
                            pin=args.pin,
                        ),
                        label=peer.label,
                        max_other=args.max_other,
                        retries=args.busy_retries,
                    )
                    problems += found
                    if result is not None:
                        (fixed if once else runs)[peer.key].append(result)
                        if not once:
                            rounds[-1][peer.key] = result
                        log_run(round_no, args.repeat, result)
    ratios = wall_ratios(rounds)
    _report(args, peers, runs, fixed, ratios, cpu_ratios(rounds))
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    if args.json:
        raw = {
            "runs": {k: [vars(m) for m in v] for k, v in runs.items()},
            "one_line_input": {k: [vars(m) for m in v] for k, v in fixed.items()},
            "wall_per_request_vs_aiohttp": ratios,
            "cpu_per_request_vs_aiohttp": cpu_ratios(rounds),
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 1 if problems else 0


def wall_ratios(rounds: Sequence[dict[str, Measure]]) -> dict[str, list[float]]:
    """Per peer, each round's wall time per request over raw aiohttp's in that round."""
    return _ratios(rounds, lambda m: m.wall_s)


def cpu_ratios(rounds: Sequence[dict[str, Measure]]) -> dict[str, list[float]]:
    """Per peer, each round's CPU per request (whole process) over raw aiohttp's in that round."""
    return _ratios(rounds, lambda m: m.cpu_s)


def _ratios(
    rounds: Sequence[dict[str, Measure]], figure: Callable[[Measure], float]
) -> dict[str, list[float]]:
    ratios: dict[str, list[float]] = {}
    for measured in rounds:
        base = measured.get(BASELINE.key)
        if base is None:
            continue
        for key, m in measured.items():
            ratios.setdefault(key, []).append((figure(m) / m.n) / (figure(base) / base.n))
    return ratios


def _report(
    args: argparse.Namespace,
    peers: Sequence[Peer],
    runs: dict[str, list[Measure]],
    fixed: dict[str, list[Measure]],
    ratios: dict[str, list[float]],
    cpu: dict[str, list[float]],
) -> None:
    headers = list(HEADERS)
    headers.insert(headers.index("CPU µs/req") + 1, NET_CPU_HEADER)
    if ratios:
        headers.insert(headers.index("× ideal") + 1, RATIO_HEADER)
    rows = []
    for peer in peers:
        ideal = ideal_s(runs[peer.key][0].n, args.latency_ms, args.concurrency)
        row = summary_row(runs[peer.key], ideal, median([m.cpu_s for m in fixed[peer.key]]))
        if ratios:
            row.insert(headers.index(RATIO_HEADER), f"{median(ratios[peer.key]):.2f}")
        rows.append(row)
    ideal = ideal_s(args.n, args.latency_ms, args.concurrency)
    ideal_text = f"ideal {ideal:.2f} s at N={args.n}" if ideal else "no ideal"
    print(
        f"\n{args.concurrency} in flight, simulator latency {args.latency_ms:g} ms, "
        f"median of {args.repeat} run(s), pinned={'yes' if args.pin else 'no'}; "
        f"ideal = N × latency / concurrency ({ideal_text})\n"
    )
    print(format_table(headers, rows))
    print("\nfixed cost (same command, one-line input): ", end="")
    print(
        "; ".join(
            f"{peer.label}: {median([m.wall_s for m in fixed[peer.key]]):.2f} s wall, "
            f"{1000 * median([m.cpu_s for m in fixed[peer.key]]):.0f} ms CPU, "
            f"{median([m.maxrss_mb for m in fixed[peer.key]]):.0f} MB"
            for peer in peers
        )
    )
    for peer in BATCHERS:
        if peer.key in runs:
            print(
                _against_targets(
                    args, peer, runs[peer.key], ratios.get(peer.key, []), cpu.get(peer.key, [])
                )
            )


def _against_targets(
    args: argparse.Namespace,
    peer: Peer,
    runs: Sequence[Measure],
    ratios: list[float],
    cpu: list[float],
) -> str:
    """One line: a batcher peer against its targets (wall and CPU vs raw aiohttp, vs ideal)."""

    def verdict(value: float) -> str:
        return "met" if value <= TARGET else "missed"

    parts = []
    for what, figures in (("wall time", ratios), ("CPU a request", cpu)):
        if figures:
            each = ", ".join(f"{r:.2f}" for r in figures)
            value = median(figures)
            parts.append(
                f"{value:.2f}× raw aiohttp's {what} in the same round [{each}] "
                f"(target ≤ {TARGET}: {verdict(value)})"
            )
    ideal = ideal_s(runs[0].n, args.latency_ms, args.concurrency)
    if ideal:
        value = median([m.wall_s for m in runs]) / ideal
        parts.append(f"{value:.2f}× ideal (target ≤ {TARGET}: {verdict(value)})")
    return f"{peer.label}: " + ("; ".join(parts) or "no ratio (no aiohttp run, no ideal)")


if __name__ == "__main__":
    raise SystemExit(main())
