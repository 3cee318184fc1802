"""The ``batcher`` command line (argparse): the parser, one small function per command."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from batcher import __version__

if TYPE_CHECKING:
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

RUN_EPILOG = """\
Re-running the same command resumes: requests recorded in OUTPUT.journal are not sent
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


#: The highest TCP port number; a larger one would wrap around (70000 binds port 4464).
MAX_PORT = 65535


def _port(text: str) -> int:
    """A TCP port: 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"must be a port number 0..{MAX_PORT}, got {value}")
    return value


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
        "--input",
        "-i",
        help="input: JSONL requests (.jsonl, .jsonl.gz, or - for stdin), or a table "
        "(.csv, .tsv, .parquet) with --template-user",
    )
    parser.add_argument(
        "--input-format",
        choices=("jsonl", "csv", "tsv", "parquet"),
        help="the form of standard input (-i -; default jsonl): a file's comes from its suffix",
    )
    parser.add_argument("--output", "-o", help="output file (.parquet or .jsonl)")
    parser.add_argument("--model", "-m", help="default model for lines that name none")
    parser.add_argument(
        "--base-url",
        help='endpoint base URL, e.g. http://127.0.0.1:8080/v1, or "sim" (else the job\'s, '
        "else $OPENAI_BASE_URL, else https://api.openai.com/v1)",
    )
    parser.add_argument(
        "--http",
        choices=("httptools", "aiohttp", "pyreqwest"),
        help="the HTTP client (default httptools: batcher's own, the least CPU a request; "
        "pyreqwest needs the native extra)",
    )
    parser.add_argument("--concurrency", "-c", type=_positive_int, help="requests in flight")
    parser.add_argument("--rpm", type=_positive_float, help="client-side requests-per-minute limit")
    parser.add_argument("--tpm", type=_positive_float, help="client-side tokens-per-minute limit")
    _add_request_arguments(parser)


def _add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say what each request is: the template for rows, and request fields."""
    parser.add_argument(
        "--template-user",
        metavar="TEXT",
        help="the user message for each row of a table, with {column} placeholders "
        "({{ and }} for braces); JSONL lines are then rows too",
    )
    parser.add_argument(
        "--template-system", metavar="TEXT", help="a system message for each row, likewise"
    )
    parser.add_argument(
        "--id-column", metavar="NAME", help="the column holding each row's id (else its number)"
    )
    parser.add_argument(
        "--system",
        metavar="TEXT",
        help="a system message put first in every request that has none",
    )
    parser.add_argument("--max-tokens", type=_positive_int, help="request default max_tokens")
    parser.add_argument("--temperature", type=_number, help="request default temperature")
    parser.add_argument(
        "--param",
        "-p",
        action="append",
        type=_param,
        metavar="KEY=VALUE",
        help="any other request default (repeatable); VALUE is read as JSON if it parses "
        "(-p seed=7, -p 'stop=[\"\\n\"]'), else as a string (-p user=me)",
    )


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _param(text: str) -> tuple[str, object]:
    """``KEY=VALUE``: VALUE as JSON when it parses (numbers, true, lists...), else the text."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: object = json.loads(raw, parse_constant=_no_constant)
    except ValueError:
        value = raw
    return key, value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON a server accepts")  # NaN, Infinity: kept as text


def params_of(pairs: list[tuple[str, object]] | None) -> dict[str, object] | None:
    """The ``-p`` pairs as request fields (a later KEY wins), ``None`` when none was given."""
    return dict(pairs) if pairs else None


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``batcher`` command line: one subcommand each for run, estimate, report, status
    and sim."""
    parser = argparse.ArgumentParser(
        prog="batcher",
        description="Run large batches of chat-completion requests against any "
        "OpenAI-compatible endpoint.",
    )
    parser.add_argument("--version", action="version", version=f"batcher {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_estimate(sub)
    _add_report(sub)
    _add_status(sub)
    _add_sim(sub)
    for command in sub.choices.values():
        # which subcommand's usage an unknown flag is reported with (``parse_command_line``)
        command.set_defaults(command_parser=command)
    return parser


def parse_command_line(argv: Sequence[str] | None) -> argparse.Namespace:
    """``argv`` parsed; an unknown flag is reported by its subcommand (``batcher run: error:
    unrecognized arguments: --bogus`` under run's usage line, exit 2), not by ``batcher``."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _add_run(sub: _Subparsers) -> None:
    """``batcher run``: the job flags, then attempts, cost, schema checks, resume, engine."""
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
        "--split-errors",
        action="store_true",
        default=None,
        help="write failed requests to OUTPUT.errors.jsonl instead of the output",
    )
    run.add_argument(
        "--notify",
        action="append",
        metavar="URL",
        help="an Apprise URL told when the run finishes, stops early, stalls or has spent 80%% "
        "of --max-cost (json://host/path, slack://..., ntfy://...; repeatable; replaces the "
        "job's [notify] urls). It holds a token: prefer [notify] in the job file to the "
        "command line, which other users of the machine can see",
    )
    _add_resume_arguments(run)
    _add_engine_arguments(run)


def _add_resume_arguments(run: argparse.ArgumentParser) -> None:
    """What ``run`` does with an earlier run of the same output, and how it shows progress."""
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


def _add_engine_arguments(run: argparse.ArgumentParser) -> None:
    """Where ``run`` sends from: this process, or Ray Data workers; online or in batches."""
    run.add_argument(
        "--mode",
        choices=("online", "batch"),
        help="online: one request at a time (default); batch: through the Batch API, at its "
        "price (answers within the completion window)",
    )
    run.add_argument(
        "--detach",
        action="store_true",
        help="with --mode batch: create every batch, then exit 3; run again to collect",
    )
    run.add_argument(
        "--cancel",
        action="store_true",
        help="with --mode batch: cancel the job's running batches",
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


def _add_estimate(sub: _Subparsers) -> None:
    """``batcher estimate``: the job flags, then the estimate's own."""
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


def _add_report(sub: _Subparsers) -> None:
    """``batcher report``: an output file, as text, JSON or a page."""
    rep = sub.add_parser(
        "report",
        help="totals, latency percentiles, throughput, errors and cost of an output",
        description="Report on an output (.parquet or .jsonl); on a job still running (no "
        "output yet), on what its journal holds so far.",
    )
    rep.add_argument(
        "output", type=_output_arg, help="an output file of batcher run (or its s3://... URI)"
    )
    rep.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    rep.add_argument(
        "--html", type=Path, metavar="FILE", help="also write a self-contained page with charts"
    )


def _add_status(sub: _Subparsers) -> None:
    """``batcher status``: a running or finished job's progress, from another terminal."""
    status = sub.add_parser(
        "status",
        help="a running or finished job: done/total, errors, tokens, cost, rate, ETA, batches",
        description="Show how a job writing OUTPUT is doing (or how it ended), from its "
        "journal and the OUTPUT.status.json its run keeps; sends nothing.",
    )
    status.add_argument(
        "output", type=_output_arg, help="the job's output file or URI (--output of run)"
    )
    status.add_argument("--json", action="store_true", help="print one JSON object (scripts)")
    status.add_argument(
        "--watch", action="store_true", help="refresh every 2 s until the job ends (Ctrl+C quits)"
    )


def _add_sim(sub: _Subparsers) -> None:
    """``batcher sim``: the simulator's latency, limits and faults."""
    sim = sub.add_parser(
        "sim",
        help="serve the OpenAI-compatible simulator",
        description="Serve the simulator: POST /v1/chat/completions, GET /v1/models, the Files "
        "and Batches API (/v1/files, /v1/batches), GET /stats.",
    )
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=_port, default=8000, help="0..65535; 0: any free port")
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
    _add_sim_batch_arguments(sim)
    sim.add_argument("--max-completion-tokens", type=_positive_int, default=64)


def _add_sim_batch_arguments(sim: argparse.ArgumentParser) -> None:
    """The simulated Batches API's time scale and faults (``[sim.batch]`` in a job file)."""
    for stage, default in (("validating", 1.0), ("in-progress", 2.0), ("finalizing", 1.0)):
        sim.add_argument(
            f"--batch-{stage}-s",
            type=_non_negative_float,
            default=default,
            metavar="S",
            help=f"seconds a batch spends {stage.replace('-', ' ')} ({default:g})",
        )
    sim.add_argument(
        "--batch-window-s",
        type=_positive_float,
        metavar="S",
        help="a batch expires after this many seconds, whatever completion_window it asks for",
    )
    sim.add_argument(
        "--batch-error-rate",
        type=_non_negative_float,
        default=0.0,
        help="0..1: share of a batch's requests answered with an error",
    )


def _output_arg(text: str) -> Path | str:
    """An output named on the command line: a path, or a URI's text (``cli.main`` finds its
    local side, ``runner.staging.fetched_output``: errors there are one line)."""
    from batcher.storage import location

    return location(text)
