"""What a notify URL costs a run: none, a receiver that answers, one that refuses, one that never
answers.

    python bench/notify.py                  # 5 rounds of 200 requests, in-process simulator
    python bench/notify.py --repeat 9 --n 1000

Each round runs `batcher run` (the whole command, process start to exit) four ways, in turn:
no `--notify`; `--notify` to a loopback receiver that answers 200; to a closed port (refused at
once); to a port that accepts and never answers (`?rto=30`: Apprise would wait 30 s). Prints
the median wall time and exit code of each, and each one's difference from the run without
notices and from the run whose receiver answers (which pays Apprise's import and URL check,
~0.2 s, as every run with a notify URL does): the promise is that an unreachable URL changes
neither the exit code nor the wall time by more than a second (the end of a run waits at most
`END_WAIT_S` for pending notices).
"""

from __future__ import annotations

import argparse
import http.server
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import free_port, write_jsonl


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepted by the kernel, never read
    ways = {
        "none": [],
        "answers": ["--notify", f"json://127.0.0.1:{receiver.server_address[1]}/hook"],
        "refused": ["--notify", f"json://127.0.0.1:{free_port()}/hook"],
        "never answers": ["--notify", f"json://127.0.0.1:{silent.getsockname()[1]}/hook?rto=30"],
    }
    walls: dict[str, list[float]] = {name: [] for name in ways}
    codes: dict[str, set[int]] = {name: set() for name in ways}
    with tempfile.TemporaryDirectory(prefix="batcher-notify-") as tmp:
        src = write_jsonl(Path(tmp) / "in.jsonl", args.n, model="gpt-4o-mini")
        for _ in range(args.repeat):
            for name, extra in ways.items():
                cmd = [
                    sys.executable, "-m", "batcher", "run", "-i", str(src),
                    "-o", str(Path(tmp) / "out.parquet"), "--restart", "--base-url", "sim",
                    "-m", "gpt-4o-mini", "--no-progress", *extra,
                ]  # fmt: skip
                start = time.monotonic()
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                walls[name].append(time.monotonic() - start)
                codes[name].add(proc.returncode)
    plain = statistics.median(walls["none"])
    answered = statistics.median(walls["answers"])
    print(f"{args.repeat} rounds of {args.n} requests (batcher run, process start to exit)")
    print(
        f"{'notify URL':<16}{'median wall':>12}{'vs none':>10}{'vs answers':>12}{'max':>8}  "
        "exit codes"
    )
    for name in ways:
        median = statistics.median(walls[name])
        print(
            f"{name:<16}{median:>11.2f}s{median - plain:>+9.2f}s{median - answered:>+11.2f}s"
            f"{max(walls[name]):>7.2f}s  {sorted(codes[name])}"
        )
    receiver.shutdown()
    silent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
