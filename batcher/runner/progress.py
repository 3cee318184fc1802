"""What the user sees during and after a run: a tqdm bar (or periodic log lines) and a summary."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO, Any

import anyio

from batcher.input.sources import count_lines
from batcher.runner.quiet_stream import quiet
from batcher.runner.stats import RunStats

#: Seconds between log lines when there is no terminal (or with --no-progress).
LOG_EVERY_S = 10.0
#: Seconds between refreshes of the bar's postfix (tokens, errors): cheap enough to ignore.
_POSTFIX_EVERY_S = 0.5


async def progress_for(
    stats: RunStats, input_path: Path, *, passes: int, enabled: bool, stream: IO[str]
) -> Progress:
    """The display of a run over ``input_path``: its total is the input's lines (counted in a
    thread, when it is shown), once per pass over it."""
    total = await anyio.to_thread.run_sync(count_lines, input_path) if enabled else None
    if total is not None:
        total *= passes
    return Progress(stats, total=total, enabled=enabled, stream=stream)


class Progress:
    """Shows progress of a run: a tqdm bar on a terminal, else a log line every ``LOG_EVERY_S``."""

    def __init__(
        self,
        stats: RunStats,
        *,
        total: int | None,
        enabled: bool = True,
        stream: IO[str] | None = None,
    ) -> None:
        self._stats = stats
        self._stream = quiet(stream or sys.stderr)  # a closed stderr does not stop the run
        self._start = time.monotonic()
        self._next_postfix = 0.0
        self._next_log = self._start + LOG_EVERY_S
        self._total = total
        self._bar: Any = None
        self._log = enabled is False or not _isatty(self._stream)
        self._quiet = False
        self.status = ""  # e.g. "WAITING: endpoint unreachable", shown in the bar until cleared
        if not self._log:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, unit="req", file=self._stream, dynamic_ncols=True, smoothing=0.1
            )

    def advance(self, n: int = 1) -> None:
        """Count ``n`` finished lines (requests or rejects)."""
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(n)
            if now >= self._next_postfix:
                self._next_postfix = now + _POSTFIX_EVERY_S
                self._bar.set_postfix_str(self._postfix(), refresh=False)
        elif now >= self._next_log:
            self._next_log = now + LOG_EVERY_S
            self._write_log_line(now)

    def note(self, message: str) -> None:
        """A one-line message that does not break the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.close()
            self._bar = None

    def _postfix(self) -> str:
        s = self._stats
        cost = ""
        if s.cost_by_model:
            cost = f" ${sum(s.cost_by_model.values()):.4f}" + ("+?" if s.unpriced else "")
        status = f" {self.status}" if self.status else ""
        tokens = _si(s.total_tokens) if s.tokens_known else "?"
        return f"tok={tokens}{cost} err={s.error} rej={s.rejected} retry={s.retries}{status}"

    def set_status(self, status: str) -> None:
        """Show (or, with "", clear) a state such as waiting out an outage, at once."""
        self.status = status
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=True)

    def _write_log_line(self, now: float) -> None:
        s = self._stats
        elapsed = now - self._start
        rate = s.done / elapsed if elapsed > 0 else 0.0
        total = f"/{self._total}" if self._total is not None else ""
        eta = ""
        if self._total and rate > 0:
            eta = f" eta {format_duration((self._total - s.done - s.rejected) / rate)}"
        tokens = f"{s.total_tokens} tokens" if s.tokens_known else "tokens unknown"
        print(
            f"batcher: {s.done + s.rejected}{total} done, {rate:.1f} req/s, "
            f"{tokens}, {s.error} errors, {s.rejected} rejected{eta}",
            file=self._stream,
            flush=True,
        )


def format_summary(
    stats: RunStats, *, name: str, output: str, rejects: str | None, engine: str | None = None
) -> str:
    """The one-screen summary printed at the end of every run; ``engine``: how the work was
    spread (the Ray engine's line), when there is more to say than a local run."""
    s = stats
    if s.stopped_early:
        head = f"batcher: {name} stopped early after {format_duration(s.wall_s)} ({s.stop_reason})"
        tail = "  resume    run the same command again to continue"
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
        names = sorted(set(s.variant_ok) | set(s.variant_error))
        parts = ", ".join(
            f"{name} {s.variant_ok[name]:,} ok/{s.variant_error[name]:,} error" for name in names
        )
        lines.append(f"  variants  {parts} (this run; batcher report compares them)")
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
    if rejects:
        lines.append(f"  rejects   {rejects}")
    if tail:
        lines.append(tail)
    return "\n".join(lines)


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
    parts = ", ".join(f"{m} ${c:.4f}" for m, c in sorted(s.cost_by_model.items()))
    total = sum(s.cost_by_model.values())
    text = f"${total:.4f} ({parts})"
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
