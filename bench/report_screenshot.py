"""A screenshot of ``batcher report --html`` for a sweep, rendered by headless Chromium.

Runs a three-variant sweep of ``sample_data/prompts.jsonl`` against the built-in simulator
(in this process; its RPM limit below the job's so 429s come, 2 % injected faults of which
some are final errors), writes the report page, opens it in headless Chromium with every host
name mapped to "not found", and writes a PNG of the whole page. It prints the page's console
errors and the requests it made (both should be none but the page itself).

    python bench/report_screenshot.py --out /tmp/report         # sweep.parquet, .html, .png
    python bench/report_screenshot.py --output out/x.parquet    # an existing output instead

Needs the ``[report]`` extra (matplotlib) and Chromium (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batcher.job_file import job_from_dict  # noqa: E402
from batcher.output.report import build_report  # noqa: E402
from batcher.output.report_html import write_html  # noqa: E402
from batcher.runner.run import run_job  # noqa: E402
from batcher.sim import sim_server  # noqa: E402
from tests.chromium import chromium_path, render  # noqa: E402


def run_sweep(output: Path) -> None:
    """The sweep: 200 prompts × 3 variants on two simulated endpoints."""
    job = job_from_dict(
        {
            "job": {"name": "sweep", "input": str(ROOT / "sample_data" / "prompts.jsonl"),
                    "output": str(output), "progress": False},
            "endpoints": [
                {"name": "cloud", "base_url": "sim", "rpm": 12000, "concurrency": 16},
                {"name": "local", "base_url": "sim", "concurrency": 8},
            ],
            "request": {"model": "gpt-4o-mini", "max_tokens": 64},
            "variants": [
                {"name": "mini-t0", "temperature": 0, "endpoint": "cloud"},
                {"name": "mini-t1-terse", "temperature": 1.0, "endpoint": "cloud",
                 "system": "Answer in one short sentence."},
                {"name": "nano-local", "model": "gpt-4.1-nano", "n": 2, "endpoint": "local"},
            ],
            "retry": {"max_attempts": 3, "backoff_initial_s": 0.05, "backoff_max_s": 1},
            "sim": {"latency_ms": 40, "latency_jitter_ms": 20, "error_rate": 0.02, "seed": 1,
                    "rpm": 2400, "burst_s": 0.2, "error_kinds": ["500", "503", "400"]},
        }
    )  # fmt: skip
    report = run_job(job, restart=True, stream=io.StringIO(), sim=sim_server)
    print(report.summary)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/report-shot"), help="folder")
    parser.add_argument("--output", type=Path, help="report on this output instead of a sweep")
    parser.add_argument("--width", type=int, default=1400, help="window width, CSS pixels")
    args = parser.parse_args()
    if chromium_path() is None:
        print("no chromium on this machine (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    output = args.output
    if output is None:
        output = args.out / "sweep.parquet"
        run_sweep(output)
    page = args.out / (output.stem + ".html")
    report, series = build_report(output)
    write_html(report, series, page)
    seen = render(page, width=args.width)
    png = page.with_suffix(".png")
    png.write_bytes(seen.png)
    others = [url for url in seen.requests if url != page.resolve().as_uri()]
    print(f"page {page} ({page.stat().st_size:,} bytes), screenshot {png}")
    print(f"console errors: {len(seen.console_errors)}; requests leaving the page: {len(others)}; "
          f"elements cut off: {len(seen.overflowing)}")  # fmt: skip
    for line in seen.console_errors + others + seen.overflowing:
        print("  " + line)
    return 1 if seen.console_errors or others or seen.overflowing else 0


if __name__ == "__main__":
    raise SystemExit(main())
