"""Peak memory of reading a Parquet table through ``[template]``: does it stay flat as N grows?

    python bench/tabular_memory.py                        # N = 10⁵ and 10⁶: about a minute
    python bench/tabular_memory.py --sizes 10000 100000   # quicker

For each size a Parquet file of N rows (an id, a question of ~60 characters, a gold answer, an
integer and a float) is written in one row group, as pandas' ``to_parquet`` writes up to a
million rows, the worst case for a streaming reader. A child process then reads it through the
reader ``batcher run`` uses (``batcher.input.tabular.reader_for``: every row rendered into a
request, ids checked for duplicates, ``Request.input`` set) and drops each request, as the
engine does once it is sent; its peak RSS comes from ``os.wait4``. The engine is left out: its
own memory is ``bench/memory.py``'s. Exits 1 if a child failed or read the wrong number of rows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READ_CHILD = """
import sys, time
from pathlib import Path
from batcher.config import JobConfig, TemplateConfig
from batcher.input.tabular import reader_for
from batcher.records import Request
path = Path(sys.argv[1])
job = JobConfig(input=path, request={"model": "m"},
                template=TemplateConfig(user="Q: {question} (n={n})", id_column="id"))
started = time.perf_counter()
ok = 0
with path.open("rb") as stream:
    for item in reader_for(job, stream, count_tokens=False):
        ok += isinstance(item, Request)
print(ok, time.perf_counter() - started)
"""


WRITE_CHILD = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
path, n = sys.argv[1], int(sys.argv[2])
table = pa.table({
    "id": [f"q{i}" for i in range(n)],
    "question": [f"What is the capital of country number {i}, and why is it so?" for i in range(n)],
    "gold": [f"city {i}" for i in range(n)],
    "n": pa.array(range(n), pa.int64()),
    "score": pa.array([i / 7 for i in range(n)], pa.float64()),
})
pq.write_table(table, path, row_group_size=n)
"""


def write_table(path: Path, n: int) -> None:
    """N rows in one row group (pyarrow's largest by default), written by a child: building
    them here would raise this process's peak RSS, which Linux hands on to the reading child
    (``ru_maxrss`` survives ``exec``)."""
    subprocess.run([sys.executable, "-c", WRITE_CHILD, str(path), str(n)], check=True)


def measure(path: Path) -> tuple[int, float, float]:
    """(requests read, seconds, peak RSS in MB) of a child reading ``path``."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    child = subprocess.Popen(
        [sys.executable, "-c", READ_CHILD, str(path)], stdout=subprocess.PIPE, env=env, text=True
    )
    assert child.stdout is not None
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"the reading child failed (exit {child.returncode})")
    count, seconds = out.split()
    return int(count), float(seconds), usage.ru_maxrss / 1024  # KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    failed = False
    print(f"{'rows':>10} {'file MB':>8} {'read s':>7} {'rows/s':>9} {'peak RSS MB':>12}")
    with tempfile.TemporaryDirectory(prefix="batcher-bench-") as tmp:
        for n in args.sizes:
            path = Path(tmp) / f"rows-{n}.parquet"
            started = time.perf_counter()
            write_table(path, n)
            written_s = time.perf_counter() - started
            count, seconds, peak = measure(path)
            size_mb = path.stat().st_size / 2**20
            print(f"{n:>10} {size_mb:>8.1f} {seconds:>7.1f} {n / seconds:>9.0f} {peak:>12.1f}")
            print(f"{'':>10} (written in {written_s:.1f} s, one row group)", file=sys.stderr)
            path.unlink()
            if count != n:
                print(f"  read {count} requests, expected {n}", file=sys.stderr)
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
