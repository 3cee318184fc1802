"""Soak: 20,000 requests with 10 % faults of every retryable kind mixed in, beside a clean run.

    python bench/soak.py                  # N = 20,000, 3 rounds, medians
    python bench/soak.py --n 2000 --repeat 1 --raw
    python bench/soak.py --http aiohttp   # batcher over another HTTP client
    python bench/soak.py --backoff 0.01   # with (almost) no backoff: how near the floor

Each round runs `batcher run` (JSONL in, Parquet out, 128 in flight, `--timeout 2`,
`--max-attempts 12`) twice against a fresh simulator process (20 ms latency): once fault-free,
once with 10 % of answers faulty, drawn from every kind that a retry should overcome (5xx, HTML
502/504, malformed and truncated bodies, no choices, a 200 HTML page, connection resets after
the headers and mid-body, stalled bodies, 429s with retry-after 0.1 s in milliseconds and as an
HTTP date, from a server whose rate-limit headers show capacity: both runs are given a limit of
1,000,000 RPM). `--raw` runs a bare aiohttp loop beside batcher in both cases (`bench/_raw.py`:
the same 128 in flight, timeout and 12 attempts, and the openai SDK's pauses: the server's
`retry-after-ms`/`retry-after`, else backoff from 0.5 s doubling to 8 s, jitter [0.75, 1]). It
checks that every id is in the output exactly once and `ok`, and prints wall times, the ratio
of the medians to the same client's clean run, and a floor beside each faulty run.

The floor. The simulator draws each attempt's fault from its own seeded generator in the order
the attempts arrive, whoever sends them, so the faults a run meets are fixed by the seed and N:
the draws up to the N-th fault-free one, whatever the client. The script replays them and, after
every faulty run, checks the replay against the simulator's `GET /stats` (attempts received,
faults injected, answers by status code); a run that made other attempts is reported and gets
no floor. It then plays the same draws through an ideal client: no overhead; at most 128
attempts in flight; an attempt holds its place for the latency (20 ms), a stalled one for the
whole timeout (2 s); a request waiting to retry holds no place and waits only what the server
makes it wait (a 429's `retry-after-ms`, 0.1 s; the HTTP-date form names the whole second
that holds now + 1.1 s, at least 0.1 s away); the other faults are retried at once (backoff is
a pause a client chooses, not one it is made to take); due retries go before fresh requests.
The floor is the client's own clean median plus what the faults add to the ideal client (its
wall time with the faults less its clean ⌈N/128⌉ × 20 ms). That is the two costs no client
escapes: the places the stalls hold (about stalls × 2 s / 128) and the tail, a request that
stalls or is refused in the run's last moments and ends that much later. A client comes in
under it only by timing out sooner, sending more than 128 at once, waiting less than the
server asks, running with faults on less overhead than without, or by a luckier order of
retries than due-first. Beside it, the same ideal client with the openai SDK's backoff at its
shortest (0.375 s, 0.75 s, 1.5 s, ... up to 6 s, for the faults that name no wait): what a
client retrying as `_raw.py` does pays at least. Each round's line shows the attempts the
simulator received and the most one request needed (the output's `attempts` column); the last
lines, the faults met (how many, how many stalls) and what they cost the ideal client.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from _common import running_sim, write_jsonl
from _raw import INITIAL_RETRY_DELAY_S, MAX_RETRY_DELAY_S, raw_cmd

KINDS = (
    "500,502,503,504,malformed,no_choices,wrong_content_type,reset_headers,reset_body,stall,"
    "429,retry_after_date"
)
SEED = 11
ERROR_RATE = 0.1
RETRY_AFTER_S = 0.1
LATENCY_MS = 20.0
CONCURRENCY = 128
TIMEOUT_S = 2.0
MAX_ATTEMPTS = 12
#: The status code the simulator answers (and counts in ``by_status``) for each fault kind;
#: the connection faults and the broken bodies come with a 200.
_STATUS = {"500": "500", "502": "502", "503": "503", "504": "504", "429": "429",
           "retry_after_date": "429"}  # fmt: skip
#: Faults whose answer names a wait (``retry-after-ms``, or ``retry-after`` as a date).
_NAMED_WAIT = frozenset({"429", "retry_after_date"})


@dataclass(kw_only=True)
class Run:
    """One measured run: wall time, the simulator's counters, the output's attempts, problems."""

    wall_s: float
    stats: dict[str, Any]
    sim_cpu_s: float = 0.0  # the simulator's CPU over the run: near the wall, it was the limit
    attempts: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def sim_args(faults: bool) -> list[str]:
    """The simulator's arguments for a clean or a faulty run."""
    # A limit far above what one client sends: every answer carries x-ratelimit-* headers, as
    # a real provider's do, so the injected 429s show capacity (a busy server, not a limit).
    args = ["--seed", str(SEED), "--fault-retry-after", str(RETRY_AFTER_S), "--rpm", "1000000"]
    if faults:
        args += ["--error-rate", str(ERROR_RATE), "--error-kinds", KINDS]
    return args


def one_run(
    src: Path,
    out: Path,
    n: int,
    *,
    faults: bool,
    raw: bool,
    http: str | None = None,
    backoff_s: float | None = None,
) -> Run:
    """Run batcher (or, with ``raw``, the bare aiohttp loop) once against a fresh simulator."""
    with running_sim(LATENCY_MS, pin=False, extra_args=sim_args(faults)) as sim:
        if raw:
            cmd = raw_cmd(sim.base_url, src, out, concurrency=CONCURRENCY, timeout_s=TIMEOUT_S,
                          max_attempts=MAX_ATTEMPTS)  # fmt: skip
        else:
            cmd = [sys.executable, "-m", "batcher", "run", "--input", str(src), "--output",
                   str(out), "--model", "gpt-4o-mini", "--base-url", sim.base_url,
                   "--concurrency", str(CONCURRENCY), "--timeout", str(TIMEOUT_S),
                   "--max-attempts", str(MAX_ATTEMPTS), "--no-progress", "--restart"]  # fmt: skip
            cmd += ["--http", http] if http else []
            if backoff_s is not None:  # no flag for it: a job file with only that setting
                job = out.with_suffix(".toml")
                job.write_text(f"[retry]\nbackoff_initial_s = {backoff_s}\n", encoding="utf-8")
                cmd[4:4] = [str(job)]
        sim_before = sim.cpu_s()
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        run = Run(wall_s=wall, stats=sim.stats(), sim_cpu_s=sim.cpu_s() - sim_before)
    if proc.returncode != 0:
        run.problems.append(f"exit {proc.returncode}: {proc.stderr[-500:]}")
        return run
    table = pq.read_table(out, columns=["custom_id", "status", "attempts"]).to_pydict()
    run.attempts = table["attempts"]
    ids = table["custom_id"]
    if len(ids) != n or len(set(ids)) != n:
        run.problems.append(f"{len(ids)} rows, {len(set(ids))} distinct ids, for {n}")
    if set(table["status"]) != {"ok"}:
        run.problems.append(f"statuses {sorted(set(table['status']))}")
    return run


# -- the floor -----------------------------------------------------------------------------------


def fault_draws(seed: int = SEED, rate: float = ERROR_RATE, kinds: str = KINDS) -> Iterator[str]:
    """The simulator's draws, one an arriving attempt: a fault kind, or ``""`` for none.

    The same generator and calls as the simulator's (``random.Random(seed)``; ``random() <
    rate``, then ``choice(kinds)``), checked against its counters after every run.
    """
    rng = random.Random(seed)
    choices = tuple(k.strip() for k in kinds.split(",") if k.strip())
    while True:
        yield rng.choice(choices) if rng.random() < rate else ""


def draws_met(n: int) -> list[str]:
    """The draws a run of ``n`` requests meets when every request ends ok: up to the ``n``-th
    fault-free one (each fault calls for one more attempt, each clean answer ends a request)."""
    met, ok = [], 0
    for draw in fault_draws():
        met.append(draw)
        ok += not draw
        if ok == n:
            return met
    raise AssertionError("unreachable")


def replay_problems(stats: dict[str, Any], met: Sequence[str]) -> list[str]:
    """Where the simulator's counters disagree with the replayed draws (empty if nowhere)."""
    statuses = Counter(_STATUS.get(kind, "200") for kind in met)
    problems = []
    if stats["requests_received"] != len(met):
        problems.append(f"{stats['requests_received']:,} attempts, replay {len(met):,}")
    faults = sum(1 for kind in met if kind)
    if stats["faults_injected"] != faults:
        problems.append(f"{stats['faults_injected']:,} faults, replay {faults:,}")
    if stats["by_status"] != dict(statuses):
        problems.append(f"by status {stats['by_status']}, replay {dict(statuses)}")
    return problems


Pause = Callable[[str, int], float]


def forced_pause(kind: str, tries: int) -> float:
    """What the server makes a client wait before retrying a ``kind`` fault: its retry-after
    (the HTTP-date form names a whole second 1.1 s ahead: at least 0.1 s), else nothing."""
    return RETRY_AFTER_S if kind in _NAMED_WAIT else 0.0


def sdk_pause(kind: str, tries: int) -> float:
    """The openai SDK's pause at its shortest jitter (× 0.75) after attempt ``tries``, where
    the server names no wait."""
    if kind in _NAMED_WAIT:
        return forced_pause(kind, tries)
    return 0.75 * min(INITIAL_RETRY_DELAY_S * 2.0 ** (tries - 1), MAX_RETRY_DELAY_S)


def ideal_wall_s(
    draws: Iterator[str],
    n: int,
    pause: Pause,
    *,
    concurrency: int = CONCURRENCY,
    latency_s: float = LATENCY_MS / 1000,
    timeout_s: float = TIMEOUT_S,
    max_attempts: int = MAX_ATTEMPTS,
) -> float:
    """The wall time of the ideal client of the module docstring meeting ``draws`` in order.

    Attempts start in time order (each takes the next draw, as at the simulator); a freed
    place takes a due retry first, else a fresh request, else idles until the next retry is
    due. A request waiting out its pause holds no place.
    """
    places = [0.0] * concurrency  # when each place is next free
    due: list[tuple[float, int, int]] = []  # (when, order, attempts so far) of waiting retries
    fresh, order, end = n, 0, 0.0
    while fresh or due:
        now = heapq.heappop(places)
        if due and due[0][0] <= now:
            tries = heapq.heappop(due)[2]
        elif fresh:
            fresh, tries = fresh - 1, 0
        else:  # nothing to send before the next retry is due
            heapq.heappush(places, due[0][0])
            continue
        kind, tries = next(draws), tries + 1
        held = timeout_s if kind == "stall" else latency_s
        heapq.heappush(places, now + held)
        if kind and tries < max_attempts:
            order += 1
            heapq.heappush(due, (now + held + pause(kind, tries), order, tries))
        else:
            end = max(end, now + held)
    return end


@dataclass(frozen=True, kw_only=True)
class Floor:
    """What the faults of a run of ``n`` add to the ideal client, with and without backoff."""

    forced_s: float
    sdk_s: float
    met: list[str]

    @classmethod
    def of(cls, n: int) -> Floor:
        clean = math.ceil(n / CONCURRENCY) * LATENCY_MS / 1000
        return cls(
            forced_s=ideal_wall_s(fault_draws(), n, forced_pause) - clean,
            sdk_s=ideal_wall_s(fault_draws(), n, sdk_pause) - clean,
            met=draws_met(n),
        )

    def describe(self) -> str:
        """The faults met, and the place-time the stalls hold spread over the 128 places."""
        faults = sum(1 for kind in self.met if kind)
        stalls = self.met.count("stall")
        spread = stalls * TIMEOUT_S / CONCURRENCY
        return (
            f"{len(self.met):,} attempts, {faults:,} faults, {stalls} stalls "
            f"({stalls} × {TIMEOUT_S:g} s / {CONCURRENCY} = {spread:.2f} s); the ideal client "
            f"loses {self.forced_s:.2f} s to them, {self.sdk_s:.2f} s with the SDK's backoff"
        )


# -- the run -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--raw", action="store_true", help="a bare aiohttp loop beside batcher")
    parser.add_argument("--http", help="batcher run's HTTP client (default: its default)")
    parser.add_argument(
        "--backoff", type=float, help="batcher run's retry.backoff_initial_s (default 0.5)"
    )
    args = parser.parse_args()
    names = ["clean", "clean raw", "faulty", "faulty raw"] if args.raw else ["clean", "faulty"]
    runs: dict[str, list[Run]] = {name: [] for name in names}
    floor = Floor.of(args.n)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="batcher-soak-") as tmp:
        src = write_jsonl(Path(tmp) / "in.jsonl", args.n, model="gpt-4o-mini")
        for round_no in range(args.repeat):
            for name in names:
                faulty = name.startswith("faulty")
                run = one_run(src, Path(tmp) / "out.parquet", args.n, faults=faulty,
                              raw=name.endswith(" raw"), http=args.http,
                              backoff_s=args.backoff)  # fmt: skip
                mismatch = replay_problems(run.stats, floor.met if faulty else [""] * args.n)
                if mismatch:
                    run.problems.append("not the replayed faults: " + "; ".join(mismatch))
                runs[name].append(run)
                failed += bool(run.problems)
                chain = f"most attempts {max(run.attempts)}" if run.attempts else "no output"
                busy = f"simulator busy {run.sim_cpu_s / run.wall_s:.0%}"
                note = "; ".join([f"{run.stats['requests_received']:,} attempts", chain, busy,
                                  *run.problems])  # fmt: skip
                print(f"round {round_no + 1} {name:10} {run.wall_s:6.2f} s  {note}", flush=True)
    print(
        f"\nN={args.n:,}, {CONCURRENCY} in flight, {LATENCY_MS:g} ms, timeout {TIMEOUT_S:g} s, "
        f"{ERROR_RATE:.0%} faults, medians of {args.repeat}:"
    )
    for name in names:
        wall = statistics.median(r.wall_s for r in runs[name])
        line = f"  {name:10} {wall:6.2f} s"
        if name.startswith("faulty"):
            clean = statistics.median(r.wall_s for r in runs[name.replace("faulty", "clean")])
            replayed = all(not replay_problems(r.stats, floor.met) for r in runs[name])
            line += f" ({wall / clean:.2f}× clean)"
            if replayed:
                low, sdk = clean + floor.forced_s, clean + floor.sdk_s
                line += (
                    f"; floor {low:.2f} s ({low / clean:.2f}×), with the SDK's backoff "
                    f"{sdk:.2f} s ({sdk / clean:.2f}×)"
                )
        print(line)
    print(f"faults met (replayed from the seed): {floor.describe()}")
    print(f"every id once and ok, the faults as replayed: {'yes' if not failed else 'NO'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
