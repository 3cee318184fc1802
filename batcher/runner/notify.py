"""A run's notices, sent through Apprise: finished, stopped early, stalled, 80% of ``--max-cost``.

A job's ``[notify] urls`` (or ``--notify``) are Apprise URLs, so one setting reaches a webhook
(``json://``, ``form://``), Slack, Discord, e-mail, ntfy and the rest. Notices never fail or
slow the run: they are sent one after the other by a daemon thread; a notice that cannot be
delivered is one line on stderr, the exit code unchanged; at the end of the run the thread
gets ``END_WAIT_S`` more to deliver what is pending, then the run ends without it.

The URLs hold tokens (a webhook's path, a password), so they are secrets: never printed,
logged, put in an error or an output. A URL is shown as ``notify URL 2 (slack://***)``, its
scheme alone; Apprise's own log records are kept from the application's handlers and only a
scrubbed last message of a failed delivery is shown.

The command that resumes a stopped run is the CLI's, set in ``RESUME_COMMAND`` (a context
variable) by ``batcher run``; a run started from Python says "run the same job again".
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import shlex
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote

import anyio

from batcher.cost.money import usd
from batcher.errors import BatcherError, ConfigError
from batcher.http.redact import REDACTED, redact_url, scheme_only
from batcher.storage import is_uri, origin_of

if TYPE_CHECKING:
    from batcher.config import JobConfig, NotifyConfig
    from batcher.cost.budget import Budget
    from batcher.runner.progress import Progress
    from batcher.runner.stats import RunStats

#: Seconds the end of a run waits for notices still being sent (then gives up, one line).
END_WAIT_S = 0.6
#: Share of ``--max-cost`` spent that is told once.
BUDGET_WARN_AT = 0.8
#: Seconds between two looks at the run (stall, budget) while it runs.
WATCH_EVERY_S = 1.0
#: The longest a notice may wait on a server's connect or answer (Apprise's ``cto``/``rto``,
#: unless the URL sets them): the thread sends one notice at a time.
SEND_TIMEOUT_S = 4.0
#: The command that resumes the run, shown in a "stopped early" notice (``batcher run`` sets it).
RESUME_COMMAND: ContextVar[str | None] = ContextVar("batcher_resume_command", default=None)

_APPRISE_LOGGER = "apprise"


def notify_label(url: str, index: int) -> str:
    """How a notify URL is shown: its position and scheme, never the rest (it holds tokens)."""
    return f"notify URL {index + 1} ({scheme_only(url)})"


def check_notify_urls(urls: object, where: str) -> tuple[str, ...]:
    """The URLs as a tuple, each one Apprise can send to; else ``ConfigError`` naming the
    entry (``notify.urls[1]``), without the URL. Apprise is imported only when there are some."""
    if isinstance(urls, str) or not isinstance(urls, Sequence):
        raise ConfigError(where, 'must be a list of Apprise URLs, e.g. ["json://host/path"]')
    checked = []
    for i, url in enumerate(urls):
        name = f"{where}[{i}]"
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(name, "must be a non-empty string (an Apprise URL)")
        if url != url.strip() or not url.isprintable():
            raise ConfigError(name, "has surrounding whitespace or control characters")
        with warnings.catch_warnings():
            # Apprise's plugins import the standard library's deprecated imghdr: not ours to
            # report (and an error under -W error)
            warnings.simplefilter("ignore", DeprecationWarning)
            plugin = _plugin(url)
        if plugin is None:
            raise ConfigError(
                name,
                f"not a notification URL Apprise can use ({scheme_only(url)}; see "
                "https://github.com/caronc/apprise/wiki for the forms); the URL is not shown: "
                "it may hold a token",
            )
        checked.append(url)
    return tuple(checked)


def resume_command(argv: Sequence[str]) -> str:
    """``batcher ARGV`` as a shell line, its secrets out: ``--notify`` URLs and credentials
    in a ``--base-url`` or an object-storage URI (``-i``/``-o``) redacted."""
    shown: list[str] = []
    hide_next: Callable[[str], str] | None = None
    for arg in argv:
        if hide_next is not None:
            shown.append(hide_next(arg))
            hide_next = None
        elif arg == "--notify":
            shown.append(arg)
            hide_next = scheme_only
        elif arg.startswith("--notify="):
            shown.append("--notify=" + scheme_only(arg.partition("=")[2]))
        elif arg == "--base-url":
            shown.append(arg)
            hide_next = redact_url
        elif arg.startswith("--base-url="):
            shown.append("--base-url=" + redact_url(arg.partition("=")[2]))
        else:
            flag, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
            shown.append(flag + sep + redact_url(value) if is_uri(value) else arg)
    return shlex.join(["batcher", *shown])


@dataclass(frozen=True)
class Notice:
    """One notice: what happened (``event``), a title and a body of ``key  value`` lines."""

    event: str  # finished, stopped, stalled, budget
    title: str
    body: str
    kind: str = "info"  # Apprise's notify type: info, success, warning, failure


class Notices:
    """The notices of one run; does nothing (no thread, no Apprise) for a job without URLs.

    The runner calls ``follow`` once the run's counts exist, runs ``watch`` beside the
    engine (stall and budget), and calls ``ended`` (or ``failed``) then ``close``.
    """

    def __init__(
        self,
        config: NotifyConfig,
        *,
        name: str,
        stream: IO[str],
        command: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._name = name
        self._command = command
        self._clock = clock
        self._sender = _Sender(config.urls, stream) if config.urls else None
        self._stats: RunStats | None = None
        self._budget: Budget | None = None
        self._progress: Progress | None = None
        self._last_done = -1
        self._since = clock()
        self._stall_told = False
        self._budget_told = False
        self._ended = False

    @property
    def enabled(self) -> bool:
        return self._sender is not None

    def follow(self, stats: RunStats, budget: Budget | None, progress: Progress | None) -> None:
        """The run's counts, budget and display (requests in flight, outages), to watch."""
        self._stats, self._budget, self._progress = stats, budget, progress
        self._last_done, self._since = stats.done, self._clock()
        if self._sender is not None:
            self._sender.start()  # its services built now: the end's wait is for sending alone

    async def watch(self) -> None:
        """Look at the run every ``WATCH_EVERY_S`` until cancelled (a run without notify
        URLs returns at once)."""
        if self._sender is None:
            return
        while True:
            await anyio.sleep(WATCH_EVERY_S)
            self.check()

    def check(self) -> None:
        """Send a stalled notice (once per stall) and the budget's 80% notice (once) when due."""
        stats = self._stats
        if self._sender is None or stats is None:
            return
        now = self._clock()
        if stats.done != self._last_done:
            self._last_done, self._since, self._stall_told = stats.done, now, False
        elif not self._stall_told and now - self._since >= self._config.stall_s:
            self._stall_told = True
            self._send(self._stalled(stats, now - self._since))
        budget = self._budget
        spent = budget is not None and budget.spent >= BUDGET_WARN_AT * budget.cap
        if budget is not None and spent and not self._budget_told:
            self._budget_told = True
            self._send(self._budget_notice(stats, budget))

    def ended(self, stats: RunStats, output: Path) -> None:
        """The run's end: finished, or stopped early (why, and the command that resumes)."""
        if self._sender is None or self._ended:
            return
        self.check()  # the budget's 80% notice, had the run ended before the watch saw it
        self._ended = True
        from batcher.runner.progress import format_cost, format_duration, format_tokens

        lines = [
            self._counts(stats),
            f"tokens    {format_tokens(stats)}",
            f"cost      {format_cost(stats) if stats.cost_by_model or stats.unpriced else '$0'}",
            f"wall time {format_duration(stats.wall_s)}",
            f"exit code {stats.exit_code}",
            f"output    {_where(output)}",
        ]
        if stats.stopped_early:
            reason = stats.stop_reason or "stopped"
            lines.insert(0, f"why       {reason}")
            lines.append(f"resume    {self._resume(reason)}")
            title = f"batcher: {self._name} stopped early ({reason})"
            self._send(Notice("stopped", title, "\n".join(lines), "failure"))
            return
        kind = "success" if stats.exit_code == 0 else "warning"
        title = f"batcher: {self._name} finished" + ("" if stats.exit_code == 0 else " with errors")
        self._send(Notice("finished", title, "\n".join(lines), kind))

    def failed(self, error: BatcherError) -> None:
        """The run ended on an error (its one line, already free of secrets)."""
        if self._sender is None or self._ended:
            return
        self._ended = True
        lines = [f"why       {error}", f"exit code {error.exit_code}"]
        if self._stats is not None:
            lines.insert(1, self._counts(self._stats))
        title = f"batcher: {self._name} stopped: error"
        self._send(Notice("stopped", title, "\n".join(lines), "failure"))

    def close(self, wait_s: float = END_WAIT_S) -> None:
        """Give what is being sent at most ``wait_s`` seconds more, then leave it."""
        if self._sender is not None:
            self._sender.close(wait_s)

    def _send(self, notice: Notice) -> None:
        assert self._sender is not None
        self._sender.put(notice)

    def _counts(self, stats: RunStats) -> str:
        """The requests line: this run's counts; for a run that resumed an output (some done
        before), the whole job's (what the output holds) first, then this run's."""
        total = self._progress.total if self._progress is not None else None
        of = f"/{total:,}" if total else ""
        if stats.output_ok is None or not (stats.skipped or stats.resent):
            return (
                f"requests  {stats.done + stats.rejected:,}{of} done: {stats.ok:,} ok, "
                f"{stats.error:,} error, {stats.rejected:,} rejected; {stats.retries:,} retries"
            )
        error = stats.output_error or 0
        in_all = stats.output_ok + error + stats.rejected
        return (
            f"requests  {in_all:,}{of} done in all: {stats.output_ok:,} ok, {error:,} error, "
            f"{stats.rejected:,} rejected\n"
            f"this run  {stats.done:,} done: {stats.ok:,} ok, {stats.error:,} error; "
            f"{stats.skipped:,} done before; {stats.retries:,} retries"
        )

    def _budget_notice(self, stats: RunStats, budget: Budget) -> Notice:
        share = budget.spent / budget.cap
        body = (
            f"spent     {usd(budget.spent)} of ${budget.cap:g} (earlier runs of this output "
            f"included)\n{self._counts(stats)}"
        )
        title = f"batcher: {self._name} has spent {share:.0%} of --max-cost"
        return Notice("budget", title, body, "warning")

    def _stalled(self, stats: RunStats, quiet_s: float) -> Notice:
        from batcher.runner.progress import format_duration

        lines = [
            f"stalled   no request finished for {format_duration(quiet_s)}",
            self._counts(stats),
        ]
        if self._progress is not None:
            lines.append(f"now       {self._progress.state()}")
        return Notice("stalled", f"batcher: {self._name} stalled", "\n".join(lines), "warning")

    def _resume(self, reason: str) -> str:
        from batcher.runner.progress import how_to_go_on

        command = self._command or "run the same job again (it resumes from its journal)"
        how = how_to_go_on(reason)  # a spent cap, a --detach, a --cancel: the same stops again
        if how:
            command += f"  ({how.strip()})"
        if self._command and "--notify" in self._command:
            command += "  (the --notify URLs are not shown: give them again)"
        return command


@contextlib.contextmanager
def notices_for(job: JobConfig, stream: IO[str]) -> Iterator[Notices]:
    """A run's notices for the ``with`` block: an error that ends the run is told, and the
    thread gets ``END_WAIT_S`` to deliver what is pending when the block ends."""
    notices = Notices(job.notify, name=job.name, stream=stream, command=RESUME_COMMAND.get())
    try:
        yield notices
    except BatcherError as exc:
        notices.failed(exc)
        raise
    finally:
        notices.close()


class _Sender:
    """Notices delivered in order by one daemon thread (started as the run starts, or with
    the first notice), each to every URL; a failed delivery is one line on ``stream``."""

    def __init__(self, urls: Sequence[str], stream: IO[str]) -> None:
        self._urls = tuple(urls)
        self._stream = stream
        self._queue: queue.SimpleQueue[Notice | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0

    def start(self) -> None:
        """Start the thread (once), which builds each URL's service before any notice."""
        if self._thread is None:
            # a daemon: a server that never answers cannot hold the process at exit
            self._thread = threading.Thread(target=self._loop, name="batcher-notify", daemon=True)
            self._thread.start()

    def put(self, notice: Notice) -> None:
        with self._lock:
            self._pending += 1
        self.start()
        self._queue.put(notice)

    def close(self, wait_s: float) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(wait_s)
        with self._lock:
            pending = self._pending
        if self._thread.is_alive() and pending:
            self._say(
                f"batcher: notify: {pending} notice(s) still being sent after {wait_s:g} s: "
                "not waiting for them"
            )

    def _loop(self) -> None:
        plugins = [
            (url, notify_label(url, i), _plugin(url, timeout_s=SEND_TIMEOUT_S))
            for i, url in enumerate(self._urls)
        ]
        while (notice := self._queue.get()) is not None:
            for url, label, plugin in plugins:
                self._deliver(url, label, plugin, notice)
            with self._lock:
                self._pending -= 1

    def _deliver(self, url: str, label: str, plugin: Any, notice: Notice) -> None:
        reason = ""
        with _captured_warnings() as messages:
            try:
                delivered = plugin is not None and bool(
                    plugin.notify(title=notice.title, body=notice.body, notify_type=notice.kind)
                )
            except Exception as exc:  # a plugin's bug must not end the thread
                delivered, reason = False, type(exc).__name__
        if delivered:
            return
        if messages:
            reason = _scrubbed(messages[-1], url)
        self._say(
            f"batcher: notify: the {notice.event} notice was not delivered to {label}"
            + (f": {reason}" if reason else "")
        )

    def _say(self, message: str) -> None:
        with contextlib.suppress(Exception):  # the stream may be gone: the run goes on
            print(message, file=self._stream, flush=True)


def _apprise() -> Any:
    """Apprise, imported on first use, its log records kept from the application's handlers
    (they may name a token-bearing host): a failed delivery is told by ``_Sender`` instead."""
    import apprise

    logging.getLogger(_APPRISE_LOGGER).propagate = False
    return apprise


def _plugin(url: str, *, timeout_s: float | None = None) -> Any:
    """The Apprise service for ``url``, or ``None`` when Apprise cannot use it. With
    ``timeout_s``, its connect and read timeouts unless the URL sets its own (``cto``,
    ``rto``), and no throttling between notices (a run sends few)."""
    apprise = _apprise()
    try:
        plugin = apprise.Apprise.instantiate(url)
    except Exception:
        return None
    if plugin is not None and timeout_s is not None:
        query = url.partition("?")[2].lower()
        if "cto=" not in query:
            plugin.socket_connect_timeout = timeout_s
        if "rto=" not in query:
            plugin.socket_read_timeout = timeout_s
        plugin.request_rate_per_sec = 0
    return plugin


class _Warnings(logging.Handler):
    """Apprise's warnings and errors raised in one thread."""

    def __init__(self, thread: int) -> None:
        super().__init__(logging.WARNING)
        self.thread = thread
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            with contextlib.suppress(Exception):
                self.messages.append(record.getMessage())


@contextlib.contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    handler = _Warnings(threading.get_ident())
    logger = logging.getLogger(_APPRISE_LOGGER)
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _scrubbed(message: str, url: str) -> str:
    """``message`` with every part of ``url`` after its scheme (host, user, password, path
    segments, query values: any may be a token) replaced, on one line, at most 200 chars."""
    rest = url.partition("://")[2] or url
    pieces = {p for p in re.split(r"[/:@?&=#,;+\s]+", rest) if len(p) >= 3}
    pieces |= {unquote(p) for p in pieces}
    for piece in sorted(pieces, key=len, reverse=True):
        message = message.replace(piece, REDACTED)
    return " ".join(message.split())[:200]


def _where(output: Path) -> str:
    """Where a run's output is: its URI for a remote one, else its absolute path."""
    origin = origin_of(output)
    return origin if origin != str(output) else str(output.resolve())
