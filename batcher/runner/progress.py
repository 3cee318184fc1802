"""What the user sees during and after a run: a tqdm bar (or periodic log lines) and a summary.

On a terminal: one bar for the run (and one per variant of a sweep) and a status line below
them (tokens, cost, errors, retries, requests in flight, any pause or outage), each fitted to
the terminal's width. Without one (a log file, ``--no-progress``): a line with a UTC timestamp
every ``LOG_EVERY_S`` while requests finish, and at least one every ``SILENT_MAX_S`` while
none do (``heartbeat``, beside the engine), so a log never goes quiet through an outage.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import anyio

from batcher.cost.money import usd
from batcher.errors import INPUT_UNREADABLE
from batcher.input.sources import count_lines
from batcher.runner.quiet_stream import quiet
from batcher.runner.stats import RunStats

if TYPE_CHECKING:
    from batcher.config import JobConfig
    from batcher.engine.endpoints import Endpoint

#: Seconds between log lines while requests finish (no terminal, or --no-progress).
LOG_EVERY_S = 10.0
#: The longest a log goes without a line, even when nothing finishes (an outage, a long answer).
SILENT_MAX_S = 60.0
#: Seconds between two looks of the heartbeat (a log line due, the status line refreshed).
HEARTBEAT_S = 1.0
#: Seconds between refreshes of the bar's status line: cheap enough to ignore.
_POSTFIX_EVERY_S = 0.5
#: The widest a variant's name is shown beside its bar.
_NAME_WIDTH = 12
#: The widest a variant's name is shown in the summary (its row then fits 80 columns).
_SUMMARY_NAME_WIDTH = 40


async def progress_for(
    stats: RunStats,
    input_path: Path,
    *,
    passes: int,
    enabled: bool,
    stream: IO[str],
    variants: Sequence[str] = (),
) -> Progress:
    """The display of a run over ``input_path``: its total is the input's lines (counted in a
    thread: the bar's and the log lines' done/total), once per pass over it (one pass per
    variant of ``variants``)."""
    total = await anyio.to_thread.run_sync(count_lines, input_path)
    if total is not None:
        total *= passes
    return Progress(stats, total=total, enabled=enabled, stream=stream, variants=variants)


class Progress:
    """Shows progress of a run: tqdm bars on a terminal, else a log line every ``LOG_EVERY_S``
    (at least every ``SILENT_MAX_S`` while ``heartbeat`` runs).

    ``width`` fixes the bars' width (else the terminal's, as it changes); ``clock`` (seconds,
    monotonic) and ``wall`` (seconds since the epoch, for the log's timestamps) are
    injectable for tests.
    """

    def __init__(
        self,
        stats: RunStats,
        *,
        total: int | None,
        enabled: bool = True,
        stream: IO[str] | None = None,
        variants: Sequence[str] = (),
        width: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._stats = stats
        self._stream = quiet(stream or sys.stderr)  # a closed stderr does not stop the run
        self._clock = clock
        self._wall = wall
        self._start = clock()
        self._next_postfix = 0.0
        self._next_log = self._start + LOG_EVERY_S
        self._last_line = self._start
        self._done_at_line = 0
        self._total = total
        self._variants = tuple(variants)
        self._endpoints: Sequence[Endpoint] = ()
        self._bar: Any = None
        self._variant_bars: list[Any] = []
        self._status_bar: Any = None
        self._log = enabled is False or not _isatty(self._stream)
        self.status = ""  # e.g. "WAITING: endpoint unreachable", shown until cleared
        if not self._log:
            self._open_bars(width)

    @property
    def total(self) -> int | None:
        """The requests (and rejected lines) the run is expected to finish, when known."""
        return self._total

    def watch_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        """The endpoints whose requests in flight, pauses and outages the display shows."""
        self._endpoints = endpoints

    def advance(self, n: int = 1) -> None:
        """Count ``n`` finished lines (requests or rejects)."""
        now = self._clock()
        if self._bar is not None:
            self._bar.update(n)
            if now >= self._next_postfix:
                self._next_postfix = now + _POSTFIX_EVERY_S
                self._refresh_lines()
        elif now >= self._next_log:
            self._write_log_line(now)

    def tick(self) -> None:
        """One look of the heartbeat: the status line refreshed, or a log line when none was
        written for ``SILENT_MAX_S``."""
        now = self._clock()
        if self._bar is not None:
            self._next_postfix = now + _POSTFIX_EVERY_S
            self._refresh_lines()
        elif self._log and now + HEARTBEAT_S > self._last_line + SILENT_MAX_S:
            self._write_log_line(now)  # the next look would come too late

    async def heartbeat(self) -> None:
        """``tick`` every ``HEARTBEAT_S`` until cancelled (run beside the engine)."""
        while True:
            await anyio.sleep(HEARTBEAT_S)
            self.tick()

    def note(self, message: str) -> None:
        """A one-line message that does not break the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._refresh_lines()
            # top to bottom: tqdm prints each closed bar at the top of what is left of them
            for bar in [self._bar, *self._variant_bars, self._status_bar]:
                bar.close()
            self._bar = self._status_bar = None
            self._variant_bars = []

    def set_status(self, status: str) -> None:
        """Show (or, with "", clear) a state such as waiting out an outage, at once."""
        self.status = status
        if self._bar is not None:
            self._refresh_lines()

    def state(self) -> str:
        """Requests in flight and any pause or outage in force: ``3 in flight; default
        unreachable for 45 s (outage)``."""
        parts = []
        for endpoint in self._endpoints:
            name = endpoint.name
            if endpoint.outage.active:
                down = format_duration(endpoint.outage.down_for_s)
                parts.append(f"OUTAGE: {name} unreachable for {down}")
            elif endpoint.limits.paused_s > 0:
                parts.append(f"PAUSED: {name} for {endpoint.limits.paused_s:.0f} s more (429)")
        if self.status and not parts:
            parts.append(self.status)
        if self._endpoints:  # else unknown here (the Ray engine's driver)
            in_flight = sum(e.limits.in_flight_requests for e in self._endpoints)
            parts.insert(0, f"{in_flight} in flight")
        return "; ".join(parts)

    def silent_s(self) -> float:
        """Seconds since the last log line (or since the display opened)."""
        return self._clock() - self._last_line

    def log_line(self) -> None:
        """A log line now: UTC timestamp, done/total, rate, tokens, cost, errors, state."""
        self._write_log_line(self._clock())

    def _open_bars(self, width: int | None) -> None:
        from tqdm import tqdm

        fit = {"ncols": width} if width else {"dynamic_ncols": True}
        line = 0
        if self._total is not None:
            # n/total, elapsed<remaining and rate kept short, so the bar keeps its width
            fmt = (
                "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                "[{elapsed}<{remaining}, {rate_fmt}]"
            )
        else:
            fmt = "{desc}{n_fmt} [{elapsed}, {rate_fmt}]"
        desc = f"{'all':<{_NAME_WIDTH}} " if self._variants else ""
        self._bar = tqdm(
            total=self._total, unit="req", file=self._stream, smoothing=0.1, desc=desc,
            bar_format=fmt, position=line, **fit,
        )  # fmt: skip
        share = None if self._total is None else self._total // len(self._variants or (1,))
        for name in self._variants:
            line += 1
            shown = name if len(name) <= _NAME_WIDTH else name[: _NAME_WIDTH - 1] + "…"
            bar = tqdm(
                total=share, unit="req", file=self._stream, desc=f"{shown:<{_NAME_WIDTH}} ",
                bar_format=fmt.replace(", {rate_fmt}", "") if share else "{desc}{n_fmt}",
                position=line, **fit,
            )  # fmt: skip
            self._variant_bars.append(bar)
        self._status_bar = tqdm(
            total=0, file=self._stream, bar_format="{desc}", position=line + 1, desc="", **fit
        )

    def _refresh_lines(self) -> None:
        s = self._stats
        for name, bar in zip(self._variants, self._variant_bars, strict=True):
            bar.n = s.variant_ok[name] + s.variant_error[name]
            bar.refresh()
        self._status_bar.set_description_str(self._status_line(), refresh=True)

    def _status_line(self) -> str:
        s = self._stats
        tokens = _si(s.total_tokens) if s.tokens_known else "?"
        state = self.state()
        return f"  tok={tokens} {self._cost()} err={s.error} rej={s.rejected} retry={s.retries}" + (
            f" | {state}" if state else ""
        )

    def _cost(self) -> str:
        s = self._stats
        if s.cost_by_model:
            return usd(sum(s.cost_by_model.values())) + ("+?" if s.unpriced else "")
        return "$?" if s.unpriced else "$0"

    def _write_log_line(self, now: float) -> None:
        s = self._stats
        done = s.done + s.rejected
        since = now - self._last_line
        rate = (done - self._done_at_line) / since if since > 0 else 0.0
        self._last_line, self._done_at_line = now, done
        self._next_log = now + LOG_EVERY_S
        elapsed = now - self._start
        total = f"/{self._total}" if self._total is not None else ""
        eta = ""
        if self._total and done and elapsed > 0:
            eta = f", eta {format_duration((self._total - done) / (done / elapsed))}"
        tokens = f"{s.total_tokens} tokens" if s.tokens_known else "tokens unknown"
        state = f"; {self.state()}" if self.state() else ""
        stamp = utc_stamp(self._wall())
        print(
            f"{stamp} batcher: {done}{total} done, {rate:.1f} req/s, {tokens}, {s.error} errors, "
            f"{s.rejected} rejected, {s.retries} retries, cost {self._cost()}{eta}{state}",
            file=self._stream,
            flush=True,
        )


def utc_stamp(seconds: float) -> str:
    """A log line's timestamp: ``2026-01-02T03:04:05Z`` for ``seconds`` since the epoch."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_summary(
    stats: RunStats,
    *,
    name: str,
    output: str,
    rejects: str | None,
    engine: str | None = None,
    failed: str | None = None,
) -> str:
    """The one-screen summary printed at the end of every run; ``engine``: how the work was
    spread (the Ray engine's line), when there is more to say than a local run; ``failed``:
    where the failed requests went when they are split off the output (``split_errors``)."""
    s = stats
    if s.stopped_early:
        head = f"batcher: {name} stopped early after {format_duration(s.wall_s)} ({s.stop_reason})"
        tail = f"  resume    run the same command again{how_to_go_on(s.stop_reason)} to continue"
    else:
        head = f"batcher: {name} finished in {format_duration(s.wall_s)}"
        tail = ""
    lines = [
        head,
        f"  requests  {s.done:,} done: {s.ok:,} ok, {s.error:,} error; "
        f"{s.rejected:,} lines rejected",
        f"  tokens    {format_tokens(s)}",
        f"  speed     {s.requests_per_s:,.1f} requests/s; {s.attempts:,} attempts"
        f" ({s.retries:,} retries)",
    ]
    if s.cost_by_model or s.unpriced:
        lines.append(f"  cost      {format_cost(s)}")
    if s.few_choices:
        lines.append(f"  choices   {s.few_choices:,} answers had fewer choices than their n asked")
    if s.skipped or s.resent:
        lines.append(
            f"  resume    {s.skipped:,} skipped (done before), {s.resent:,} re-sent, "
            f"{s.submitted - s.resent:,} new"
        )
    if s.output_ok is not None and (s.skipped or s.resent):
        lines.append(
            f"  in all    {s.output_ok + (s.output_error or 0):,} records in the output: "
            f"{s.output_ok:,} ok, {s.output_error or 0:,} error"
        )
    if len(s.by_endpoint) > 1:
        parts = ", ".join(f"{name} {n:,}" for name, n in sorted(s.by_endpoint.items()))
        lines.append(f"  endpoints {parts}")
    if s.variant_ok or s.variant_error:
        lines += _variant_rows(s)
    if s.schema_valid or s.schema_invalid:
        lines.append(
            f"  schema    {s.schema_valid:,} valid, {s.schema_invalid:,} invalid "
            f"({s.reasks:,} re-asks)"
        )
    if s.rate_limited:
        lines.append(
            f"  429s      {s.rate_limited:,}: {s.rate_limited - s.overloaded:,} at a rate limit "
            f"(the pool paused and slowed), {s.overloaded:,} from a busy server (retried alone)"
        )
    if s.error_codes:
        top = ", ".join(f"{code} ×{n}" for code, n in s.error_codes.most_common(5))
        lines.append(f"  errors    {top}")
    if engine:
        lines.append(f"  engine    {engine}")
    lines.append(f"  output    {output}")
    if failed:
        lines.append(f"  failed    {failed}")
    if rejects:
        lines.append(f"  rejects   {rejects}")
    if tail:
        lines.append(tail)
    return "\n".join(lines)


def how_to_go_on(reason: str | None) -> str:
    """What the command that stopped for ``reason`` needs to go on, as words after "run the
    same command again": the same command would stop again at once after a spent
    ``--max-cost`` (earlier runs' spending counts), a ``--detach`` or a ``--cancel``, and at
    the same line of an input that could not be read (a truncated ``.gz``) or of a request
    ``--max-cost`` cannot bound (no ``max_tokens``, a model with no price)."""
    reason = reason or ""
    if reason.startswith("--max-cost") and " reached" in reason:
        return " with a higher --max-cost"
    if reason.startswith("detached:"):
        return " without --detach"
    if reason.startswith("cancelled "):
        return " without --cancel"
    if reason.startswith(INPUT_UNREADABLE):  # a damaged file would stop at the same line
        return " once the input can be read past that line"
    from batcher.cost.budget import NO_COMPLETION_LIMIT, UNPRICED

    if reason.startswith(NO_COMPLETION_LIMIT):  # the same line would stop it again
        return " once every request has max_tokens"
    if reason.startswith(UNPRICED):
        return " once every model has a price"
    return ""


def split_off(job: JobConfig, output: Path) -> str | None:
    """The file a ``split_errors`` job's failed requests went to (``OUTPUT.errors.jsonl``,
    beside the remote output a local one stands in for), for the summary: the output alone
    does not hold them. ``None`` when none was written."""
    from batcher.output.formats import errors_path
    from batcher.storage import origin_beside

    path = errors_path(output)
    return origin_beside(output, path) if job.split_errors and path.exists() else None


def _variant_rows(s: RunStats) -> list[str]:
    """The summary's variants: a heading, then a row per variant (a name longer than
    ``_SUMMARY_NAME_WIDTH`` cut), so each line fits 80 columns."""
    names = sorted(set(s.variant_ok) | set(s.variant_error))
    shown = [
        n if len(n) <= _SUMMARY_NAME_WIDTH else n[: _SUMMARY_NAME_WIDTH - 1] + "…" for n in names
    ]
    width = max(len(n) for n in shown)
    rows = ["  variants  this run's answers (batcher report compares them)"]
    for name, label in zip(names, shown, strict=True):
        rows.append(
            f"    {label:<{width}}  {s.variant_ok[name]:,} ok, {s.variant_error[name]:,} error"
        )
    return rows


def format_tokens(s: RunStats) -> str:
    """The token counts, or ``unknown`` when the server sent no usage for any answer."""
    if not s.tokens_known:
        return f"unknown (the server sent no usage for any of the {s.ok:,} answers)"
    text = f"{s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion = {s.total_tokens:,}"
    if s.usage_missing:
        text += f" (usage missing for {s.usage_missing:,} answers)"
    return text


def format_cost(s: RunStats) -> str:
    """The cost of the priced answers: exact, ``at least`` when some had none, or unknown."""
    if not s.cost_by_model:
        return (
            f"unknown: none of the {s.unpriced:,} answers has a price (no known price or no usage)"
        )
    parts = ", ".join(f"{m} {usd(c)}" for m, c in sorted(s.cost_by_model.items()))
    total = sum(s.cost_by_model.values())
    text = f"{usd(total)} ({parts})"
    if s.unpriced:
        text = f"at least {text}; {s.unpriced:,} answers unpriced (no known price or no usage)"
    return text


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _si(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_duration(seconds: float) -> str:
    """``12.3 s``, ``4m05s``, ``1h02m03s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"
