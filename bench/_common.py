"""Shared pieces of the benchmark scripts: the simulator process, inputs, rusage, tables.

The simulator always runs as its own process (``python -m batcher sim``) so that its CPU is not
the client's; the client under test runs in another process, measured with ``os.wait4`` (the
child's own user+system CPU and peak RSS) or with ``getrusage(RUSAGE_SELF)`` from inside it.
With two or more cores the simulator is pinned to core 1 and the clients to core 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIM_CORE = 1
CLIENT_CORE = 0
MODEL = "gpt-4o-mini"
_TICKS = os.sysconf("SC_CLK_TCK")
_LAUNCHER = Path(__file__).resolve().parent / "_launch.py"
_TOPICS = ("rivers", "bridges", "compilers", "volcanoes", "tea", "chess", "orbits", "bees")


_compiled = False


def compile_bytecode() -> None:
    """Compile batcher's and bench/'s modules to ``__pycache__``, as installing a package does.

    With ``PYTHONDONTWRITEBYTECODE`` set (this machine sets it) an editable checkout is never
    cached, so every measured process would compile batcher from source: ~25 ms of CPU a run
    that no installed copy pays. Site-packages (aiohttp, the openai SDK) were compiled by pip.
    Called once by the parent scripts (``running_sim``, ``floor.py``), never in a measured
    child. Nothing is printed: a read-only checkout just stays uncompiled.
    """
    global _compiled
    if _compiled:
        return
    _compiled = True
    import compileall

    root = Path(__file__).resolve().parent.parent
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet):
        for folder in (root / "batcher", root / "bench"):
            compileall.compile_dir(folder, quiet=2, workers=1)


def default_pin() -> bool:
    """Pin by default when there are at least two cores to pin to."""
    return len(os.sched_getaffinity(0)) >= 2


def pin_prefix(core: int | None) -> list[str]:
    """``taskset -c CORE`` when pinning is asked for and taskset exists, else nothing."""
    if core is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(core)]


def pin_preexec(core: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` pinning the child to ``core`` (used when taskset is missing)."""
    if core is None or shutil.which("taskset") is not None:
        return None
    return lambda: os.sched_setaffinity(0, {core})


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the simulator process -----------------------------------------------------------------------


class SimProcess:
    """``batcher sim`` in its own process; ``stats()``/``reset()`` talk to its ``/stats``."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, latency_ms: float) -> None:
        self.proc = proc
        self.port = port
        self.latency_ms = latency_ms
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._root = f"http://127.0.0.1:{port}"

    def stats(self) -> dict[str, Any]:
        """The simulator's counters (``GET /stats``)."""
        with urllib.request.urlopen(self._root + "/stats", timeout=10) as response:
            data: dict[str, Any] = json.load(response)
            return data

    def reset(self) -> None:
        """Zero the counters (``POST /stats/reset``)."""
        request = urllib.request.Request(self._root + "/stats/reset", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def cpu_s(self) -> float:
        """User+system CPU seconds the simulator process has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _TICKS


@contextmanager
def running_sim(
    latency_ms: float,
    *,
    pin: bool,
    startup_timeout: float = 20.0,
    extra_args: Sequence[str] = (),
    port: int | None = None,
) -> Iterator[SimProcess]:
    """Start ``python -m batcher sim`` (on ``port``, or a free one) with ``extra_args`` (limits,
    faults); wait until ``GET /stats`` answers."""
    compile_bytecode()
    port = port or free_port()
    core = SIM_CORE if pin else None
    cmd = [
        *pin_prefix(core), sys.executable, "-m", "batcher", "sim",
        "--port", str(port), "--latency-ms", str(latency_ms), *extra_args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=pin_preexec(core)
    )
    sim = SimProcess(proc, port, latency_ms)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"the simulator exited with {proc.returncode}: {err.strip()}")
            try:
                sim.stats()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the simulator did not answer on port {port}") from None
                time.sleep(0.05)
        yield sim
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()


# -- inputs --------------------------------------------------------------------------------------


def make_bodies(n: int, model: str = MODEL) -> list[dict[str, Any]]:
    """``n`` deterministic, distinct chat-completion bodies (the same for every client)."""
    bodies = []
    for i in range(n):
        topic = _TOPICS[i % len(_TOPICS)]
        prompt = f"Request {i}: write two sentences about {topic}, in plain words."
        bodies.append(
            {
                "model": model,
                "messages": [
                    {"role": "system", "content": "You are a concise assistant."},
                    {"role": "user", "content": prompt},
                ],
                "max_tokens": 64,
            }
        )
    return bodies


def write_jsonl(path: Path, n: int, model: str = MODEL) -> Path:
    """Write ``n`` request lines (``{"custom_id", "messages", ...}``) to ``path``."""
    with path.open("w", encoding="utf-8") as f:
        for i, body in enumerate(make_bodies(n, model)):
            f.write(json.dumps({"custom_id": f"req-{i}", **body}, separators=(",", ":")))
            f.write("\n")
    return path


def read_bodies(path: Path) -> list[dict[str, Any]]:
    """The request bodies of a file written by ``write_jsonl`` (without ``custom_id``)."""
    bodies = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            obj.pop("custom_id", None)
            bodies.append(obj)
    return bodies


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary folder for inputs and outputs, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="batcher-bench-") as name:
        yield Path(name)


# -- measuring a child process -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ChildRun:
    """What ``os.wait4`` says about a finished child, plus its output."""

    returncode: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    stdout: str
    stderr: str


def run_child(cmd: Sequence[str], *, core: int | None, timeout_s: float = 1800.0) -> ChildRun:
    """Run ``cmd`` to completion; measure wall time, its own CPU and peak RSS via ``wait4``.

    ``cmd`` is started by ``bench/_launch.py``, a lean stdlib-only process, which waits for it
    with ``wait4``: that reports the resources of that one child (user+system CPU, peak RSS),
    so neither the simulator nor this script's own memory leaks into the figures.
    """
    launcher = [*pin_prefix(core), sys.executable, "-I", "-S", str(_LAUNCHER)]
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile(suffix=".json") as result,
    ):
        subprocess.run(
            [*launcher, result.name, str(timeout_s), *cmd],
            stdout=out,
            stderr=err,
            preexec_fn=pin_preexec(core),
            check=True,
        )
        figures = json.load(result)
        out.seek(0)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        if figures["timed_out"]:
            stderr += f"\n(killed after {timeout_s:g} s)"
        return ChildRun(
            returncode=figures["returncode"],
            wall_s=figures["wall_s"],
            cpu_s=figures["utime_s"] + figures["stime_s"],
            maxrss_mb=figures["maxrss_kb"] / 1024,  # Linux reports KiB
            stdout=out.read().decode(errors="replace"),
            stderr=stderr,
        )


@dataclass(frozen=True, kw_only=True)
class Observed:
    """A child's run against the simulator, with what else the machine was doing meanwhile.

    ``other_pct`` is the CPU used by every other process on the machine during the run, in
    percent of one core: the busy time of the whole machine (``/proc/stat``) less the child's
    and the simulator's. Other people's work on a shared machine shows up here.
    """

    child: ChildRun
    sim_cpu_s: float
    other_pct: float


def run_against_sim(cmd: Sequence[str], sim: SimProcess, *, pin: bool) -> Observed:
    """Reset the simulator's counters, run ``cmd`` (pinned to core 0 with ``pin``), observe."""
    sim.reset()
    sim_before, busy_before = sim.cpu_s(), machine_busy_s()
    child = run_child(cmd, core=CLIENT_CORE if pin else None)
    sim_cpu = sim.cpu_s() - sim_before
    other = max(0.0, machine_busy_s() - busy_before - child.cpu_s - sim_cpu)
    return Observed(child=child, sim_cpu_s=sim_cpu, other_pct=100 * other / child.wall_s)


def check_sim_count(sim: SimProcess, n: int, label: str) -> list[str]:
    """Problems with the simulator's counters after a run of ``n`` requests (empty if none)."""
    stats = sim.stats()
    problems = []
    if stats["requests_received"] != n:
        problems.append(f"{label}: the simulator received {stats['requests_received']}, not {n}")
    if stats["answered_ok"] != n:
        problems.append(f"{label}: the simulator answered {stats['answered_ok']} ok, not {n}")
    return problems


def add_measuring_flags(parser: argparse.ArgumentParser) -> None:
    """The flags both scripts share: repeats, pinning, and what to do on a busy machine."""
    parser.add_argument("--repeat", type=int, default=1, help="rounds, interleaved; medians (1)")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=default_pin(),
        help="simulator on core 1, clients on core 0 (default: on with 2+ cores)",
    )
    parser.add_argument(
        "--max-other",
        type=float,
        default=25.0,
        metavar="PCT",
        help="measure a run again when other processes used more than PCT%% of a core "
        "meanwhile (25; 0 = never)",
    )
    parser.add_argument(
        "--busy-retries",
        type=int,
        default=2,
        metavar="K",
        help="at most K more tries per run on a busy machine; the last one is kept (2)",
    )
    parser.add_argument("--json", type=Path, help="also write every run's figures to this file")


def add_selection_flags(
    parser: argparse.ArgumentParser, names: Sequence[str], *, what: str, slow: str
) -> None:
    """``--only``, ``--skip`` and ``--n-for NAME=N`` over ``names`` (clients or peers).

    ``slow`` names the usual candidate for a smaller N, for the help text.
    """

    def name_list(text: str) -> list[str]:
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in names]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(names)}"
            )
        return chosen

    def n_for(text: str) -> tuple[str, int]:
        name, _, value = text.partition("=")
        if name not in names or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(
                f"expected {what.upper()}=N with one of {', '.join(names)}, e.g. {slow}=2000; "
                f"got {text}"
            )
        return name, int(value)

    parser.add_argument("--only", type=name_list, help=f"comma-separated {what}s to run")
    parser.add_argument(
        "--skip", type=name_list, default=[], help=f"comma-separated {what}s to skip"
    )
    parser.add_argument(
        "--n-for",
        type=n_for,
        action="append",
        default=[],
        metavar=f"{what.upper()}=N",
        help=f"another N for one {what} (e.g. {slow}=2000); repeatable",
    )


def selected(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The names ``--only`` and ``--skip`` leave, in the order of ``names``."""
    wanted = set(args.only or names) - set(args.skip)
    return [name for name in names if name in wanted]


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def child_problems(label: str, child: ChildRun, n: int, *, outcome: bool) -> list[str]:
    """Problems with a finished child: a non-zero exit, or (``outcome``: it prints a final JSON
    line ``{"ok", "failed", "errors"}``, as ``transports.py --child`` does) failed requests."""
    if child.returncode != 0:
        tail = " / ".join(child.stderr.strip().splitlines()[-5:])
        return [f"{label}: the child exited {child.returncode}: {tail}"]
    if not outcome:
        return []
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    problems = [f"{label}: {error}" for error in figures["errors"]]
    if figures["failed"]:
        problems.append(f"{label}: {figures['failed']} of {n} requests failed")
    return problems


def measure_quietly(
    run: Callable[[], tuple[Measure | None, list[str]]],
    *,
    label: str,
    max_other: float,
    retries: int,
) -> tuple[Measure | None, list[str]]:
    """Call ``run`` until other processes stayed under ``max_other`` % of a core, or give up.

    Problems (failed requests, wrong counts) of every try are kept: a failure on a busy
    machine is still a failure.
    """
    problems: list[str] = []
    for attempt in range(retries + 1):
        result, found = run()
        problems += found
        busy = result is not None and max_other > 0 and result.other_pct > max_other
        if not busy or attempt == retries:
            return result, problems
        assert result is not None
        print(
            f"  {label}: other processes used {result.other_pct:.0f}% of a core meanwhile; "
            "measuring again",
            file=sys.stderr,
            flush=True,
        )
    raise AssertionError("unreachable")


def log_run(round_no: int, repeat: int, m: Measure) -> None:
    """One progress line on stderr for a finished run."""
    print(
        f"round {round_no}/{repeat} {m.name:16} N={m.n:<6} {m.wall_s:8.2f} s  "
        f"cpu {m.cpu_s:6.2f} s  rss {m.maxrss_mb:5.0f} MB  other {m.other_pct:4.0f}%",
        file=sys.stderr,
        flush=True,
    )


# -- results and tables --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Measure:
    """One measured run of one client."""

    name: str
    n: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    sim_cpu_s: float = 0.0
    other_pct: float = 0.0
    ok: int = 0
    failed: int = 0


def median(values: Sequence[float]) -> float:
    """The median (the mean of the middle two for an even count)."""
    return float(statistics.median(values))


def ideal_s(n: int, latency_ms: float, concurrency: int) -> float:
    """The wall time of a perfect client: N × latency / concurrency."""
    return n * latency_ms / 1000 / concurrency


HEADERS = (
    "client", "N", "wall s", "× ideal", "req/s", "CPU µs/req", "peak RSS MB", "sim CPU %",
    "other CPU %",
)  # fmt: skip
NET_CPU_HEADER = "net CPU µs/req"


def summary_row(
    runs: Sequence[Measure], ideal: float, fixed_cpu_s: float | None = None
) -> list[str]:
    """A table row of the medians of ``runs`` (all of the same client).

    With ``fixed_cpu_s`` (the CPU of the same command on a one-line input) a ``net CPU µs/req``
    column follows ``CPU µs/req``: the CPU of each further request, without start-up, imports
    and what the first request loads.
    """
    n = runs[0].n
    wall = median([r.wall_s for r in runs])
    cpu = median([r.cpu_s for r in runs])
    rss = median([r.maxrss_mb for r in runs])
    sim_busy = median([100 * r.sim_cpu_s / r.wall_s for r in runs])
    other_busy = median([r.other_pct for r in runs])
    ratio = f"{wall / ideal:.2f}" if ideal > 0 else "-"
    row = [runs[0].name, str(n), f"{wall:.2f}", ratio, f"{n / wall:,.0f}", f"{1e6 * cpu / n:,.0f}"]
    if fixed_cpu_s is not None:
        row.append(f"{1e6 * (cpu - fixed_cpu_s) / max(n - 1, 1):,.0f}")
    return [*row, f"{rss:.0f}", f"{sim_busy:.0f}", f"{other_busy:.0f}"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded (first column left-aligned, the rest right)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]
    return "\n".join([line(headers), "|" + "|".join(rule) + "|", *(line(r) for r in rows)])


# the openai SDK sits on httpx2 (and httpcore2), not on httpx
_VERSIONS_SHOWN = (
    "httpx", "httpcore", "aiohttp", "httpx-aiohttp", "openai", "httpx2", "uvicorn", "uvloop",
)  # fmt: skip


def environment_note() -> str:
    """One line about the machine and the packages that matter to the figures."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [_git_state(), f"Python {sys.version.split()[0]}", f"{os.cpu_count()} cores"]
    for dist in _VERSIONS_SHOWN:
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} -")
    return ", ".join(parts)


def _git_state() -> str:
    """The commit the measured code is at, and whether the work tree differs from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "batcher"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {head}" + (" + uncommitted changes in batcher/" if dirty else "")
