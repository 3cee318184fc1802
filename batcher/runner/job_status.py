"""``batcher status``: a running or finished job seen from another terminal.

Per-request facts (counts, tokens, cost, finish times, error messages) come from the job's
journal (``output.journal_facts``: streamed, memory flat), what only the run knows (total,
in flight, 429 pauses, outage, pid, how it ended) from its status file
(``runner.status_file``), and each batch's state in batch mode from ``OUTPUT.batches.jsonl``.
A run whose file says ``running`` but whose process holds the journal no more (killed, the
machine restarted) is shown as not running, with how to resume it.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batcher.cost.money import usd
from batcher.errors import InputError
from batcher.output.journal import journal_path, lock_holder
from batcher.output.journal_facts import (
    RATE_WINDOW_S,
    JournalFacts,
    JournalReader,
    journal_facts,
    output_facts,
)
from batcher.runner.progress import format_duration, how_to_go_on
from batcher.runner.status_file import read_status_file
from batcher.storage import origin_of

#: The state of a run whose process died without writing how it ended.
DIED = "not running"
#: Batches listed in the text (the JSON has them all).
SHOWN_BATCHES = 20


@dataclass(frozen=True, slots=True)
class BatchLine:
    """A batch-mode chunk as its state journal last recorded it."""

    chunk: str
    batch_id: str | None
    model: str | None
    round: int
    status: str
    requests: int  # in the chunk, as uploaded
    total: int  # as the server counts them (0 while it validates)
    completed: int
    failed: int
    updated_at: float


@dataclass(kw_only=True)
class JobStatus:
    """What ``batcher status`` shows of one output."""

    output: Path
    state: str  # running, finished, stopped, not running, or unknown (no status file)
    facts: JournalFacts
    info: dict[str, Any] = field(default_factory=dict)  # the status file, when there is one
    batches: list[BatchLine] = field(default_factory=list)
    now: float = 0.0

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def total(self) -> int | None:
        total = self.info.get("total")
        return total if isinstance(total, int) else None

    @property
    def rejected(self) -> int:
        return int(self.info.get("rejected") or 0)

    @property
    def rate(self) -> tuple[float, float]:
        """Requests a second over the recent window, and the window (seconds): up to now
        while running, up to the newest finish otherwise; no longer than the run."""
        facts = self.facts
        if not self.running and facts.last_finished_at is None:
            return 0.0, 0.0  # ended with nothing finished: no rate to tell
        end = self.now if self.running else (facts.last_finished_at or self.now)
        start = max(end - RATE_WINDOW_S, self._run_start or 0.0)
        window = end - start
        if window <= 0:
            return 0.0, 0.0
        return facts.finished_since(start) / window, window

    @property
    def _run_start(self) -> float | None:
        started = self.info.get("started_at")
        if isinstance(started, int | float):
            return float(started)
        return self.facts.first_started_at

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the recent rate, while running with a known total."""
        rate, _ = self.rate
        total = self.total
        if not self.running or total is None or rate <= 0:
            return None
        return max(0, total - self.facts.done - self.rejected) / rate

    @property
    def resume(self) -> str | None:
        """How to go on, when the run did not finish."""
        if self.state in (DIED, "stopped"):
            again = (
                "run the same batcher run command again: it continues from "
                f"{journal_path(self.output).name}"
            )
            if self.info.get("exit_code") == 2:  # refused by its job or endpoint: as it was
                return f"fix what stopped it ({self.info.get('stop_reason')}), then {again}"
            how = how_to_go_on(self.info.get("stop_reason"))
            return again.replace(" again:", f" again{how}:", 1)
        return None

    def as_dict(self) -> dict[str, Any]:
        """The status as one JSON object (the keys are listed in the README)."""
        f, info = self.facts, self.info
        rate, window = self.rate
        return {
            "output": str(self.output),
            "job": info.get("job"),
            "mode": info.get("mode"),
            "state": self.state,
            "running": self.running,
            "pid": info.get("pid"),
            "started_at": _iso(info.get("started_at")),
            "updated_at": _iso(info.get("updated_at")),
            "ended_at": _iso(info.get("ended_at")),
            "exit_code": info.get("exit_code"),
            "stop_reason": info.get("stop_reason"),
            "resume": self.resume,
            "total": self.total,
            "done": f.done,
            "ok": f.ok,
            "error": f.error,
            "rejected": self.rejected,
            "in_flight": int(info.get("in_flight") or 0) if self.running else 0,
            "prompt_tokens": f.prompt_tokens,
            "completion_tokens": f.completion_tokens,
            "total_tokens": f.total_tokens,
            "cost_usd": f.cost_usd if f.priced or not f.unpriced else None,
            "unpriced": f.unpriced,
            "rate_per_s": round(rate, 3),
            "rate_window_s": round(window, 1),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "rate_limited": int(info.get("rate_limited") or 0),
            "overloaded": int(info.get("overloaded") or 0),
            "paused_s": float(info.get("paused_s") or 0.0) if self.running else 0.0,
            "outage": list(info.get("outage") or []) if self.running else [],
            "error_codes": dict(f.error_codes.most_common()),
            "last_errors": [
                {
                    "custom_id": e.custom_id,
                    "variant": e.variant,
                    "error_code": e.error_code,
                    "message": e.message,
                    "finished_at": _iso(e.finished_at),
                }
                for e in f.last_errors
            ],
            "batches": [
                {
                    "chunk": b.chunk,
                    "batch_id": b.batch_id,
                    "model": b.model,
                    "round": b.round,
                    "status": b.status,
                    "requests": b.requests,
                    "total": b.total,
                    "completed": b.completed,
                    "failed": b.failed,
                    "updated_at": _iso(b.updated_at),
                }
                for b in self.batches
            ],
        }


def read_job_status(
    output: Path, *, reader: JournalReader | None = None, now: float | None = None
) -> JobStatus:
    """The status of the job writing (or that wrote) ``output``; ``reader``: the journal's
    reader kept between two calls (``--watch``: only what was appended is read again).
    Raises ``InputError`` when there is neither a journal nor an output there."""
    output = Path(output)
    journal = journal_path(output)
    info = read_status_file(output) or {}
    facts: JournalFacts | None = None
    try:
        facts = journal_facts(journal) if reader is None else reader.facts()
    except FileNotFoundError:
        if not output.exists():
            raise InputError(
                f"no job at {output}: neither it nor its journal {journal} exists"
            ) from None
    except OSError as exc:
        raise InputError(f"cannot read {journal}: {exc.strerror or exc}") from None
    if facts is None:  # no journal (the Ray engine's output, or deleted): the output's rows
        facts = _facts_of_output(output)
    return JobStatus(
        output=output,
        state=_state(info, journal),
        facts=facts,
        info=info,
        batches=_batches(output),
        now=time.time() if now is None else now,
    )


def _facts_of_output(output: Path) -> JournalFacts:
    """An output's facts (and its split-off errors', when there is such a file)."""
    from itertools import chain

    from batcher.output.reading import read_results

    errors = output.with_name(output.name + ".errors.jsonl")
    parts = [read_results(output)] if output.exists() else []
    if errors.exists():
        parts.append(read_results(errors))
    return output_facts(chain.from_iterable(parts))


def _state(info: dict[str, Any], journal: Path) -> str:
    """The run's state; ``not running`` for a ``running`` one whose process is gone."""
    state = info.get("state")
    if not isinstance(state, str):
        return "unknown"
    if state == "running" and _alive(info, journal) is False:
        return DIED
    return state


def _alive(info: dict[str, Any], journal: Path) -> bool | None:
    """Whether the run's process still holds its journal: the system's list of locks says
    (read, never taken: a lock taken here could refuse a run starting at that moment), else
    whether its pid lives; ``None`` when it ran on another machine."""
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("host") != socket.gethostname():
        return None
    if os.path.exists("/proc/locks"):
        try:
            fd = os.open(journal, os.O_RDONLY)
        except OSError:
            return False  # no journal: no run holds it
        try:
            return lock_holder(fd) is not None
        finally:
            os.close(fd)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _batches(output: Path) -> list[BatchLine]:
    """Each batch-mode chunk's latest state (none for an online job)."""
    from batcher.batch.state import latest_states, state_path

    lines = []
    for s, size in latest_states(state_path(output)).values():
        counts = s.request_counts
        lines.append(
            BatchLine(
                chunk=s.chunk,
                batch_id=s.batch_id,
                model=s.model,
                round=s.round,
                status=s.status,
                requests=size,
                total=counts.total,
                completed=counts.completed,
                failed=counts.failed,
                updated_at=s.updated_at,
            )
        )
    return lines


def format_status(status: JobStatus) -> str:
    """The status as a few lines of text, the way the end-of-run summary reads."""
    f, info = status.facts, status.info
    lines = [_head(status)]
    total = status.total
    progress = f"{f.done:,}"
    if total:
        share = 100 * (f.done + status.rejected) / total
        progress += f"/{total:,} ({share:.0f}%)"
    flight = f"; {int(info.get('in_flight') or 0):,} in flight" if status.running else ""
    lines.append(
        f"  requests  {progress} done: {f.ok:,} ok, {f.error:,} error; "
        f"{status.rejected:,} lines rejected{flight}"
    )
    lines.append(
        f"  tokens    {f.prompt_tokens:,} prompt + {f.completion_tokens:,} completion = "
        f"{f.total_tokens:,}"
    )
    if f.unread:
        lines.append(
            f"  note      {f.unread:,} requests' tokens and times unknown: the output their "
            "compacted journal points into is gone"
        )
    if f.priced or f.unpriced:
        cost = usd(f.cost_usd) if f.priced else "unknown"
        if f.unpriced:
            cost += f"; {f.unpriced:,} answers unpriced"
        lines.append(f"  cost      {cost}")
    rate, window = status.rate
    if window > 0:
        speed = f"  rate      {rate:,.1f} requests/s over the last {format_duration(window)}"
        if status.eta_s is not None:
            speed += f"; ETA {format_duration(status.eta_s)}"
        lines.append(speed)
    lines.extend(_pauses(status))
    if f.error_codes:
        top = ", ".join(f"{code} ×{n}" for code, n in f.error_codes.most_common(5))
        lines.append(f"  errors    {top}")
        for e in f.last_errors:
            who = e.custom_id + (f" ({e.variant})" if e.variant else "")
            lines.append(f"    {who}: {e.error_code or 'error'}: {e.message or ''}".rstrip())
    lines.extend(_batch_lines(status.batches, running=status.running))
    lines.append(f"  output    {origin_of(status.output)}")
    return "\n".join(lines)


def _head(status: JobStatus) -> str:
    info = status.info
    name = info.get("job") or status.output.name
    started, ended = info.get("started_at"), info.get("ended_at")
    since = f", started {_clock(started)}" if isinstance(started, int | float) else ""
    state = status.state
    if state == "running":
        return f"batcher status: {name}: running (pid {info.get('pid')}{since})"
    if state == DIED:
        return (
            f"batcher status: {name}: not running (stopped without a word: resume with the "
            f"same batcher run command; pid {info.get('pid')} is gone{since})"
        )
    if state == "unknown":
        return f"batcher status: {name}: no status file (a run of another version or engine)"
    took = ""
    if isinstance(started, int | float) and isinstance(ended, int | float):
        took = f" in {format_duration(ended - started)}, at {_clock(ended)}"
    head = f"batcher status: {name}: {state}{took}, exit code {info.get('exit_code')}"
    reason = info.get("stop_reason")
    if state == "stopped":
        head += f" ({reason})" if reason else ""
        head += f"\n  resume    {status.resume}"
    return head


def _pauses(status: JobStatus) -> list[str]:
    info = status.info
    lines = []
    limited = int(info.get("rate_limited") or 0)
    if limited:
        busy = int(info.get("overloaded") or 0)
        text = f"  429s      {limited:,}: {limited - busy:,} at a rate limit, {busy:,} busy server"
        paused = float(info.get("paused_s") or 0.0)
        if status.running and paused > 0:
            text += f"; paused for {paused:.1f} s more"
        lines.append(text)
    outage = info.get("outage") or []
    if status.running and outage:
        lines.append(f"  outage    waiting for {', '.join(str(n) for n in outage)} to answer again")
    return lines


def _batch_lines(batches: list[BatchLine], *, running: bool) -> list[str]:
    if not batches:
        return []
    # once the run is gone, the server's batches may have moved on since it last looked
    seen = "" if running else " (as the run last saw them: batcher run again follows them)"
    lines = [f"  batches   {len(batches):,}{seen}"]
    for b in batches[:SHOWN_BATCHES]:
        name = b.batch_id or f"chunk {b.chunk[:12]}"
        lines.append(
            f"    {name} ({b.model or '?'}, round {b.round}): {b.status}, "
            f"{b.completed:,}/{b.total or b.requests:,} done, {b.failed:,} failed, "
            f"as of {_clock(b.updated_at)}"
        )
    if len(batches) > SHOWN_BATCHES:
        lines.append(f"    ... {len(batches) - SHOWN_BATCHES:,} more (--json lists them all)")
    return lines


def _iso(value: Any) -> str | None:
    if not isinstance(value, int | float) or value <= 0:
        return None
    return dt.datetime.fromtimestamp(value, dt.UTC).isoformat(timespec="seconds")


def _clock(value: float) -> str:
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
