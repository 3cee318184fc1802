"""The ``batcher`` command: thin; turns a ``BatcherError`` into one line and an exit code."""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from batcher import __version__
from batcher.errors import BatcherError

if TYPE_CHECKING:
    from batcher.config import JobConfig
    from batcher.output.resume import RetryErrors

RUN_EPILOG = """\
Re-running the same command resumes: requests recorded in OUTPUT.journal.jsonl are not sent
again (unless --retry-errors), a line whose request changed is re-sent, --restart starts over.
With --engine ray, OUTPUT (.parquet) is a folder of part files, and the ids in it are done.

exit codes:
  0  every request succeeded
  1  the run finished, but some requests failed or input lines were rejected
  2  usage or configuration error: nothing was sent, or the endpoint showed at once that
     it cannot work (its host does not resolve; every answer a 404/405): its failed
     requests not recorded (a re-run after the fix sends them)
  3  stopped early (Ctrl+C, SIGTERM, --max-cost reached, key refused, quota exhausted,
     journal or output not writable): run again (with a new --max-cost) to resume

The API key is read from $OPENAI_API_KEY (or the variable named by the job's
endpoint.api_key_env) and is never written anywhere. The base URL is --base-url, else the
job's, else $OPENAI_BASE_URL, else OpenAI's. --base-url sim runs the built-in simulator
in-process: no key, no network.
"""


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say what a job is: shared by ``run`` and ``estimate``."""
    parser.add_argument("job", nargs="?", type=Path, help="job file (TOML), e.g. jobs/demo.toml")
    parser.add_argument(
        "--input", "-i", help="input JSONL file (.jsonl, .jsonl.gz, or - for stdin)"
    )
    parser.add_argument("--output", "-o", help="output file (.parquet or .jsonl)")
    parser.add_argument("--model", "-m", help="default model for lines that name none")
    parser.add_argument(
        "--base-url",
        help='endpoint base URL, e.g. http://127.0.0.1:8080/v1, or "sim" (else the job\'s, '
        "else $OPENAI_BASE_URL, else https://api.openai.com/v1)",
    )
    parser.add_argument("--concurrency", "-c", type=_positive_int, help="requests in flight")
    parser.add_argument("--rpm", type=_positive_float, help="client-side requests-per-minute limit")
    parser.add_argument("--tpm", type=_positive_float, help="client-side tokens-per-minute limit")


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batcher",
        description="Run large batches of chat-completion requests against any "
        "OpenAI-compatible endpoint.",
    )
    parser.add_argument("--version", action="version", version=f"batcher {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a job: JSONL prompts in, responses and usage out",
        description="Run a job. Flags override the job file; without a job file, "
        "--input, --output and --model are enough.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_job_arguments(run)
    run.add_argument("--max-attempts", type=_positive_int, help="attempts per request")
    run.add_argument(
        "--max-cost",
        type=_positive_float,
        metavar="USD",
        help="spending cap for this output (earlier runs included): stop before passing it",
    )
    run.add_argument("--timeout", type=_positive_float, help="seconds per attempt")
    run.add_argument(
        "--validate-schema",
        action="store_true",
        default=None,
        help="check answers against the request's response_format (JSON schema or json_object)",
    )
    run.add_argument(
        "--max-reasks",
        type=_non_negative_int,
        metavar="N",
        help="ask again up to N times when an answer is invalid (1; implies --validate-schema)",
    )
    run.add_argument(
        "--grace", type=_non_negative_float, help="seconds in-flight requests get after Ctrl+C"
    )
    run.add_argument(
        "--retry-errors",
        action="store_true",
        help="re-send the requests an earlier run recorded as errors",
    )
    run.add_argument(
        "--only-retryable",
        action="store_true",
        help="with --retry-errors: only those that may clear by themselves "
        "(408, 409, 429, 5xx, timeouts, connection errors, malformed answers)",
    )
    run.add_argument(
        "--restart", action="store_true", help="forget earlier runs of this output; start over"
    )
    run.add_argument(
        "--no-progress", action="store_true", help="log lines instead of a progress bar"
    )
    run.add_argument(
        "--engine",
        choices=("local", "ray"),
        help="local: this process (default); ray: Ray Data workers (the ray extra; the output "
        "is a folder of Parquet part files)",
    )
    run.add_argument(
        "--ray-workers",
        type=_positive_int,
        metavar="N",
        help="with --engine ray: worker actors, each with 1/N of the limits (one per CPU)",
    )

    est = sub.add_parser(
        "estimate",
        help="pre-flight: requests, tokens, cost low/high and ETA; sends nothing",
        description="Estimate a job before running it: the same inputs as run; nothing is sent.",
    )
    _add_job_arguments(est)
    est.add_argument("--max-cost", type=_positive_float, metavar="USD", help=argparse.SUPPRESS)
    est.add_argument(
        "--sample",
        type=Path,
        metavar="OUTPUT",
        help="an earlier output: base the low estimate on its answers' real lengths",
    )
    est.add_argument(
        "--low-fraction",
        type=_fraction,
        default=0.25,
        help="without --sample: share of max_tokens the low estimate assumes (0.25)",
    )
    est.add_argument(
        "--latency",
        type=_positive_float,
        default=2.0,
        metavar="S",
        help="seconds an answer is assumed to take, for the ETA (2)",
    )
    est.add_argument("--json", action="store_true", help="print JSON (for scripts)")

    rep = sub.add_parser(
        "report",
        help="totals, latency percentiles, throughput, errors and cost of an output",
        description="Report on a finished output (.parquet or .jsonl).",
    )
    rep.add_argument("output", type=Path, help="an output file of batcher run")
    rep.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    rep.add_argument(
        "--html", type=Path, metavar="FILE", help="also write a self-contained page with charts"
    )

    sim = sub.add_parser(
        "sim",
        help="serve the OpenAI-compatible simulator",
        description="Serve the simulator: POST /v1/chat/completions, GET /v1/models, GET /stats.",
    )
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000)
    sim.add_argument("--latency-ms", type=_non_negative_float, default=0.0)
    sim.add_argument("--latency-jitter-ms", type=_non_negative_float, default=0.0)
    sim.add_argument("--rpm", type=_positive_int, help="requests-per-minute limit (429 beyond)")
    sim.add_argument("--tpm", type=_positive_int, help="tokens-per-minute limit (429 beyond)")
    sim.add_argument("--error-rate", type=_non_negative_float, default=0.0, help="0..1")
    sim.add_argument(
        "--error-kinds",
        default="500,502,503,malformed",
        help="comma-separated: 500,502,503,504,malformed,no_usage,no_choices,"
        "wrong_content_type,huge,400,429,overloaded,retry_after_date,401,quota,reset_headers,"
        "reset_body,stall,stream_error",
    )
    sim.add_argument(
        "--fault-retry-after",
        type=_non_negative_float,
        default=5.0,
        help="retry-after (seconds) of injected 429 faults",
    )
    sim.add_argument(
        "--burst-s",
        type=_positive_float,
        default=1.0,
        help="seconds' worth of --rpm/--tpm that may be spent at once",
    )
    sim.add_argument(
        "--stream-chunk-ms",
        type=_non_negative_float,
        default=0.0,
        help="pause between the chunks of a streamed answer (the first comes after the latency)",
    )
    sim.add_argument(
        "--schema-error-rate",
        type=_non_negative_float,
        default=0.0,
        help="0..1: share of JSON answers (response_format) made not to match their schema",
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--max-completion-tokens", type=_positive_int, default=64)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (the process's arguments by default), run the command, return its exit
    code. The ``batcher`` command itself is ``console_main``."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "estimate":
            return _estimate(args)
        if args.command == "report":
            return _report(args)
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
    """The ``batcher`` command and ``python -m batcher``: ``main`` in a process that ends with it.

    The interpreter's shutdown runs full garbage collections over every object still alive
    (aiohttp's, pyarrow's, the run's). Objects frozen out of the collector's sight are
    skipped: the shutdown took ~60 ms after a 5,000-request run, ~18 ms frozen.
    Nothing is owed a finalizer by then: the run has closed its output, journal and
    connections, and the interpreter flushes stdout and stderr itself. Not in ``main``, which
    tests and other programs call in a process that goes on.
    """
    from batcher.runner.quiet_stream import flush_standard_streams

    code = main()
    gc.freeze()
    flush_standard_streams()  # a reader gone from stdout or stderr does not change the code
    return code


def _job(args: argparse.Namespace) -> JobConfig:
    from batcher.config import JobConfig
    from batcher.job_file import load_job, with_overrides

    job = load_job(args.job) if args.job else JobConfig()
    return with_overrides(
        job,
        input=args.input,
        output=args.output,
        model=args.model,
        base_url=args.base_url,
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
    )


def _run(args: argparse.Namespace) -> int:
    job = _job(args)
    if job.engine == "ray":
        return _run_on_ray(job, args)
    _lean_process()  # before pyarrow is imported
    if job.input is not None and job.counts_tokens:  # before the HTTP stack is imported
        from batcher.input.reader import load_first_encoding

        load_first_encoding(job.input, job.request, job.limits.encoding)
    from batcher.runner.run import run_job
    from batcher.sim import sim_server

    report = run_job(
        job,
        restart=args.restart,
        retry_errors=_retry_errors(args),
        handle_signals=True,
        sim=sim_server,
    )
    return report.exit_code


def _run_on_ray(job: JobConfig, args: argparse.Namespace) -> int:
    """``--engine ray``: no lean process (Ray Data needs pandas), and Ray imported only now."""
    from batcher.ray.driver import run_job_on_ray

    report = run_job_on_ray(
        job, restart=args.restart, retry_errors=_retry_errors(args), handle_signals=True
    )
    return report.exit_code


#: Modules a ``batcher run`` process refuses to import (see ``_lean_process``).
_UNUSED_MODULES = (
    "numpy",
    "pandas",
    "pyarrow._s3fs",
    "pyarrow._gcsfs",
    "pyarrow._azurefs",
    "pyarrow._hdfs",
)


class _Refuse(importlib.abc.MetaPathFinder):
    """Refuses to import the given modules (and their submodules)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._names = names

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if any(name == n or name.startswith(n + ".") for n in self._names):
            raise ModuleNotFoundError(f"batcher run does not import {name}", name=name)
        return None


def _lean_process() -> None:
    """Settings that keep a ``batcher run`` process small (its peak RSS).

    A ``run`` process is this command's own and ends with it, so these change nothing else;
    library callers of ``run_job`` are not affected.

    - pandas is refused: the first time pyarrow turns a Python list into an array it imports
      pandas, if installed, only to check whether the list is a pandas object (about 50 MB
      resident that the Parquet writer never uses).
    - numpy is refused: pyarrow (18 and later) imports it if installed and works without it;
      the writer converts Python lists. About 11 MB resident and 50 ms of import time.
    - pyarrow's S3, GCS, Azure and HDFS filesystems are refused: ``pyarrow.parquet`` imports
      ``pyarrow.fs``, which loads each of them if it can (about 8 MB, the AWS SDK among them)
      and carries on without those it cannot, as with a pyarrow built without them. The
      output is a local file.
    - pyarrow allocates with the system malloc rather than its bundled mimalloc, which keeps
      about 15 MB more resident while writing Parquet. Read by pyarrow when it is first
      imported, so set before that; a value the user set is kept.
    """
    unused = tuple(name for name in _UNUSED_MODULES if name not in sys.modules)
    if unused:
        sys.meta_path.insert(0, _Refuse(unused))
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


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

    from batcher.errors import InputError
    from batcher.output.report import build_report
    from batcher.output.report_html import write_html
    from batcher.output.report_text import format_report

    if not args.output.exists():
        raise InputError(f"no such output: {args.output}")
    report, series = build_report(args.output)
    if args.json:
        _show(json.dumps(report.as_dict(), indent=2))
    else:
        _show(format_report(report))
    if args.html:
        write_html(report, series, args.html)
        _say(f"batcher report: wrote {args.html}")
    return 0


def _retry_errors(args: argparse.Namespace) -> RetryErrors:
    from batcher.errors import ConfigError

    if args.only_retryable and not args.retry_errors:
        raise ConfigError("--only-retryable", "only applies with --retry-errors")
    if not args.retry_errors:
        return "none"
    return "retryable" if args.only_retryable else "all"


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
        )
    except ValueError as exc:
        raise ConfigError("sim", str(exc)) from None
    print(
        f"batcher sim: serving http://{args.host}:{args.port}/v1 (Ctrl+C to stop)",
        file=sys.stderr,
    )
    try:
        serve(config, host=args.host, port=args.port)
    except OSError as exc:
        raise ConfigError(
            "--port", f"cannot listen on {args.host}:{args.port}: {exc.strerror}"
        ) from None
    return 0
