"""The ``batcher`` command: thin; turns a ``BatcherError`` into one line and an exit code.

The parser is ``batcher.cli.parser``; what the command tunes in its own process is
``batcher.cli.tuning``, applied by ``console_main`` alone.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from batcher.cli.parser import parse_command_line
from batcher.errors import BatcherError

if TYPE_CHECKING:
    from batcher.cli.tuning import ProcessTuning
    from batcher.config import JobConfig
    from batcher.output.resume import RetryErrors


def main(argv: Sequence[str] | None = None, *, tuning: ProcessTuning | None = None) -> int:
    """Parse ``argv`` (the process's arguments by default), run the command, return its exit
    code. The ``batcher`` command itself is ``console_main``, which passes its process's
    ``tuning`` (none by default: ``main`` changes nothing process-wide)."""
    args = parse_command_line(argv)
    try:
        if args.command == "run":
            from batcher.runner.notify import RESUME_COMMAND, resume_command

            # what a "stopped early" notice says to run (its secrets out)
            token = RESUME_COMMAND.set(resume_command(sys.argv[1:] if argv is None else argv))
            try:
                return _run(args, tuning)
            finally:
                RESUME_COMMAND.reset(token)
        if args.command == "estimate":
            return _estimate(args)
        if args.command == "report":
            return _report(args)
        if args.command == "status":
            return _status(args)
        return _sim(args)
    except BatcherError as exc:
        _say(f"batcher: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _say("batcher: interrupted")
        return 3


def _say(message: str) -> None:
    """A line to stderr that a reader gone away cannot turn into a traceback."""
    from batcher.runner.quiet_stream import quiet

    print(message, file=quiet(sys.stderr), flush=True)


def _show(text: str) -> None:
    """A command's output to stdout (``| head`` may stop reading it: no traceback then)."""
    from batcher.runner.quiet_stream import quiet

    print(text, file=quiet(sys.stdout), flush=True)


def console_main() -> int:
    """The ``batcher`` command and ``python -m batcher``: ``main`` in a process that ends with
    it, tuned for that (``batcher.cli.tuning``)."""
    from batcher.cli.tuning import ProcessTuning
    from batcher.runner.quiet_stream import flush_standard_streams

    tuning = ProcessTuning()
    tuning.start()
    try:
        code = main(tuning=tuning)
    finally:
        tuning.finish()
    flush_standard_streams()  # a reader gone from stdout or stderr does not change the code
    return code


def _job(args: argparse.Namespace) -> JobConfig:
    from batcher.cli.parser import params_of
    from batcher.config import JobConfig
    from batcher.job_file import load_job, with_overrides

    job = load_job(args.job) if args.job else JobConfig()
    return with_overrides(
        job,
        input=args.input,
        input_format=args.input_format,
        output=args.output,
        model=args.model,
        base_url=args.base_url,
        http=getattr(args, "http", None),
        concurrency=args.concurrency,
        rpm=args.rpm,
        tpm=args.tpm,
        max_attempts=getattr(args, "max_attempts", None),
        timeout_s=getattr(args, "timeout", None),
        progress=False if getattr(args, "no_progress", False) else None,
        grace_s=getattr(args, "grace", None),
        max_cost_usd=args.max_cost,
        # --max-reasks N means checking: it would do nothing otherwise
        validate_schema=getattr(args, "validate_schema", None)
        or (True if getattr(args, "max_reasks", None) is not None else None),
        max_reasks=getattr(args, "max_reasks", None),
        engine=getattr(args, "engine", None),
        ray_workers=getattr(args, "ray_workers", None),
        mode=getattr(args, "mode", None),
        detach=getattr(args, "detach", None) or None,
        cancel=getattr(args, "cancel", None) or None,
        template_user=args.template_user,
        template_system=args.template_system,
        id_column=args.id_column,
        system=args.system,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        params=params_of(args.param),
        split_errors=getattr(args, "split_errors", None),
        notify=getattr(args, "notify", None),
    )


def _run(args: argparse.Namespace, tuning: ProcessTuning | None) -> int:
    job = _job(args)
    if job.engine == "ray":
        return _run_on_ray(job, args)
    if isinstance(job.input, Path) and job.counts_tokens:  # before the HTTP stack is imported
        from batcher.input.reader import load_first_encoding

        load_first_encoding(job.input, job.request, job.limits.encoding)
        if tuning is not None:
            tuning.tables_loaded()
    from batcher.runner.run import run_job
    from batcher.sim import sim_server

    report = run_job(
        job,
        restart=args.restart,
        retry_errors=_retry_errors(args),
        handle_signals=True,
        sim=sim_server,
        housekeeping=tuning,
        detach=args.detach,
        cancel=args.cancel,
    )
    return report.exit_code


def _run_on_ray(job: JobConfig, args: argparse.Namespace) -> int:
    """``--engine ray``: Ray imported only now."""
    from batcher.ray.driver import run_job_on_ray

    report = run_job_on_ray(
        job, restart=args.restart, retry_errors=_retry_errors(args), handle_signals=True
    )
    return report.exit_code


def _estimate(args: argparse.Namespace) -> int:
    import json

    from batcher.cost.estimate import estimate, format_estimate

    job = _job(args)
    est = estimate(job, sample=args.sample, low_fraction=args.low_fraction, latency_s=args.latency)
    if args.json:
        _show(json.dumps(est.as_dict(), indent=2))
    else:
        _show(format_estimate(est, name=job.name))
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    from batcher.output.report import build_report
    from batcher.output.report_html import write_html
    from batcher.output.report_text import format_report

    report, series = build_report(_local_output(args.output))
    if args.html:  # first: a page that cannot be written is the one error line, exit 2
        write_html(report, series, args.html)
    if args.json:
        _show(json.dumps(report.as_dict(), indent=2))
    else:
        _show(format_report(report))
    if args.html:
        _say(f"batcher report: wrote {args.html}")
    return 0


def _local_output(output: Path | str) -> Path:
    """The local file ``status`` and ``report`` read for an output: itself, or for a URI
    this machine's run of it, else its upload fetched to a fresh folder."""
    if isinstance(output, Path):
        return output
    from batcher.runner.staging import fetched_output

    return fetched_output(output)


#: Seconds between two refreshes of ``batcher status --watch``.
WATCH_EVERY_S = 2.0


def _status(args: argparse.Namespace) -> int:
    """``batcher status OUTPUT``: once, or every ``WATCH_EVERY_S`` until the job ends."""
    import json
    import time

    from batcher.output.journal import journal_path
    from batcher.output.journal_facts import JournalReader
    from batcher.runner.job_status import format_status, read_job_status

    # on a terminal each refresh replaces the last; else they follow (JSON: one a line)
    clear = args.watch and not args.json and sys.stdout.isatty()
    gap = ""
    output = _local_output(args.output)
    reader = JournalReader(journal_path(output))  # refreshes read what was appended
    try:
        while True:
            status = read_job_status(output, reader=reader)
            if args.json:
                text = json.dumps(status.as_dict(), indent=None if args.watch else 2)
            else:
                text = format_status(status)
                gap = "\x1b[H\x1b[2J" if clear else gap
            _show(gap + text)
            gap = "" if args.json else "\n"
            if not args.watch or not status.running:
                return 0
            time.sleep(WATCH_EVERY_S)
    except KeyboardInterrupt:  # the way out of --watch: quietly
        return 0
    finally:
        reader.close()


def _retry_errors(args: argparse.Namespace) -> RetryErrors:
    from batcher.errors import ConfigError

    if args.only_retryable and not args.retry_errors:
        raise ConfigError("--only-retryable", "only applies with --retry-errors")
    if not args.retry_errors:
        return "none"
    return "retryable" if args.only_retryable else "all"


def sim_batch_settings(args: argparse.Namespace) -> dict[str, float]:
    """``batcher sim``'s ``--batch-*`` flags as ``[sim.batch]`` settings."""
    batch = {
        "validating_s": args.batch_validating_s,
        "in_progress_s": args.batch_in_progress_s,
        "finalizing_s": args.batch_finalizing_s,
        "error_rate": args.batch_error_rate,
    }
    if args.batch_window_s is not None:
        batch["window_s"] = args.batch_window_s
    return batch


def _sim(args: argparse.Namespace) -> int:
    from batcher.errors import ConfigError
    from batcher.sim.config import SimConfig
    from batcher.sim.serve import serve

    try:
        config = SimConfig(
            latency_ms=args.latency_ms,
            latency_jitter_ms=args.latency_jitter_ms,
            rpm=args.rpm,
            tpm=args.tpm,
            error_rate=args.error_rate,
            error_kinds=tuple(k.strip() for k in args.error_kinds.split(",") if k.strip()),
            seed=args.seed,
            max_completion_tokens=args.max_completion_tokens,
            fault_retry_after_s=args.fault_retry_after,
            burst_s=args.burst_s,
            stream_chunk_ms=args.stream_chunk_ms,
            schema_error_rate=args.schema_error_rate,
            batch=sim_batch_settings(args),
        )
    except ValueError as exc:
        raise ConfigError("sim", str(exc)) from None

    def listening(url: str) -> None:
        print(f"batcher sim: serving {url} (Ctrl+C to stop)", file=sys.stderr)

    try:
        serve(config, host=args.host, port=args.port, on_listening=listening)
    except OSError as exc:
        # a port in use or not allowed is the port's fault; an address that does not resolve
        # or is not this machine's is the host's
        host_at_fault = isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
        raise ConfigError(
            "--host" if host_at_fault else "--port",
            f"cannot listen on {args.host}:{args.port}: {exc.strerror}",
        ) from None
    return 0
