"""The record path alone: CPU a result from the engine's hand-off to the output, in process.

    python bench/record_path.py              # 20,000 results, 5 rounds, the median
    python bench/record_path.py --n 100000 --repeat 3

Each round journals N answers shaped as the simulator's through a fresh ``LiveOutput`` (the
journal line, the held row, its Parquet conversion and write, the compact journal record) and
closes it, timing the process's CPU. No HTTP and no engine: what the output side costs a
result, to compare changes to it in isolation (inside a run the same work costs 2-3× more).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

from batcher.output.body_hash import request_hash
from batcher.output.journal import Journal
from batcher.output.live_output import LiveOutput
from batcher.records import Result, Usage


def _results(n: int) -> list[Result]:
    usage = Usage(prompt_tokens=20, completion_tokens=30, total_tokens=50)
    start = 1.7e9
    results = []
    for i in range(n):
        body = {
            "id": f"chatcmpl-{i}", "object": "chat.completion", "created": 1700000000,
            "model": "m", "usage": {"prompt_tokens": 20, "completion_tokens": 30,
                                    "total_tokens": 50},
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": {
                "role": "assistant", "content": f"Answer number {i}: " + "lorem ipsum " * 6}}],
        }  # fmt: skip
        results.append(
            Result(
                custom_id=f"req-{i}",
                line=i + 1,
                status="ok",
                model="m",
                attempts=1,
                latency_s=0.0213,
                started_at=start + i / 1000,
                finished_at=start + i / 1000 + 0.02,
                status_code=200,
                request_id=f"r{i}",
                body=body,
                usage=usage,
                cost_usd=1.2e-5,
                endpoint="default",
                messages=[{"role": "user", "content": f"Question {i}?"}],
            )
        )
    return results


def one_round(results: list[Result], hashes: list[str]) -> float:
    """CPU µs a result of journaling ``results`` through a fresh live output and closing it."""
    with tempfile.TemporaryDirectory(prefix="batcher-record-") as folder:
        journal = Journal(Path(folder) / "out.parquet.journal")
        output = LiveOutput(journal, Path(folder) / "out.parquet", dict)
        output._prepare()  # the writer's import and metadata, made in a thread in a run
        settled = 0
        output.follow(lambda: settled)  # the watermark: every line before this one is settled
        started = time.process_time()
        for result, body_hash in zip(results, hashes, strict=True):
            settled = result.line
            output.append(result, body_hash)
        output.close(compact=True)
        elapsed = time.process_time() - started
        journal.close()
    return elapsed / len(results) * 1e6


def main() -> int:
    """Run the rounds and print each and their median."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = _results(args.n)
    hashes = [request_hash({"model": "m", "messages": r.messages}) for r in results]
    gc.freeze()  # the results made above are not the record path's garbage
    rounds = [one_round(results, hashes) for _ in range(args.repeat)]
    listed = ", ".join(f"{x:.1f}" for x in rounds)
    print(f"record path: {statistics.median(rounds):.1f} µs a result (rounds: {listed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
