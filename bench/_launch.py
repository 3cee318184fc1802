"""Run one command and write what ``os.wait4`` says about it as JSON: a tiny, lean launcher.

    python -I -S bench/_launch.py RESULT.json TIMEOUT_S CMD [ARG...]

Why a launcher: on Linux a child's ``ru_maxrss`` is at least the RSS of the process that forked
it (``execve`` folds the old address space's high-water mark in), so children forked straight
from a benchmark script that has imported pyarrow would all report the script's RSS. This
launcher imports only the standard library (about 11 MB resident), so the peak RSS it reports
is the command's own whenever that is above 11 MB, as any Python client is.
"""

import json
import os
import signal
import subprocess
import sys
import time


def main() -> int:
    """Run the command, wait for it with ``wait4``, write the figures; exit 0 unless misused."""
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    result_path, timeout_s, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    timed_out = False

    def kill(_signum: int, _frame: object) -> None:
        nonlocal timed_out
        timed_out = True
        proc.kill()

    signal.signal(signal.SIGALRM, kill)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    _, status, usage = os.wait4(proc.pid, 0)  # blocking: this launcher uses no CPU meanwhile
    signal.setitimer(signal.ITIMER_REAL, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    figures = {
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "wall_s": wall,
        "utime_s": usage.ru_utime,
        "stime_s": usage.ru_stime,
        "maxrss_kb": usage.ru_maxrss,
    }
    with open(result_path, "w") as f:
        json.dump(figures, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
