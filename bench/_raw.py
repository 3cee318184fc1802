"""A bare aiohttp client with the retry rules a careful client uses; run as a child process.

    python bench/_raw.py BASE_URL INPUT.jsonl OUTPUT.parquet [--concurrency 128]
        [--timeout 600] [--max-attempts 12]

``sporadic.py --raw`` and ``soak.py --raw`` run it beside ``batcher run`` on the same simulator
and input (``raw_cmd``). ``--concurrency`` workers take the lines from one queue and POST each
body to ``BASE_URL/chat/completions`` on one ``aiohttp.ClientSession`` whose connector allows as
many connections.

Retried, up to ``--max-attempts`` attempts in all: 408, 409, 429 and 5xx answers, connection
errors (a reset after the headers or mid-body), timeouts (``--timeout`` seconds for a whole
attempt, the body included) and 200s whose body is not a chat completion (not JSON, no
``choices``). Any other answer is an error at once. The pause before a retry is the openai
SDK's: on a 429 or 503, the server's ``retry-after-ms``, else its ``retry-after`` in seconds or
as an HTTP date, when that is within (0, 60] s; otherwise exponential backoff, 0.5 s doubling
per retry up to 8 s, times a jitter drawn from [0.75, 1]. A worker sits out its request's pause
itself, holding its place, as a loop over a semaphore does. Every line's answer (``custom_id``,
``status``, ``attempts``, ``content``) is written to Parquet at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import json
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The openai SDK's backoff bounds (``openai._constants``): 0.5 s, doubling, at most 8 s.
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
#: A server's wait is honoured when it lies in (0, MAX_SERVER_WAIT_S], as the SDK does.
MAX_SERVER_WAIT_S = 60.0
_RETRIED_STATUSES = frozenset({408, 409, 429})
_SCRIPT = Path(__file__).resolve()


def raw_cmd(
    base_url: str,
    src: Path,
    out: Path,
    *,
    concurrency: int = 128,
    timeout_s: float = 600.0,
    max_attempts: int = 12,
) -> list[str]:
    """The command that runs this client as a child over ``src`` into ``out``."""
    return [
        sys.executable, str(_SCRIPT), base_url, str(src), str(out),
        "--concurrency", str(concurrency), "--timeout", str(timeout_s),
        "--max-attempts", str(max_attempts),
    ]  # fmt: skip


def server_wait(headers: Mapping[str, str]) -> float | None:
    """The wait a 429/503 asks for (``retry-after-ms``, then ``retry-after`` as seconds or as
    an HTTP date), or ``None`` when it asks for none, or for none within (0, 60] s."""
    wait: float | None = None
    millis = headers.get("retry-after-ms")
    value = headers.get("retry-after")
    if millis is not None:
        with contextlib.suppress(ValueError):
            wait = float(millis) / 1000
    if wait is None and value is not None:
        try:
            wait = float(value)
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                wait = email.utils.mktime_tz(parsed) - time.time()
    return wait if wait is not None and 0 < wait <= MAX_SERVER_WAIT_S else None


def backoff_s(retry: int) -> float:
    """The SDK's pause before retry number ``retry`` (0 for the first) when the server named
    none: 0.5 s × 2^retry, at most 8 s, times a jitter in [0.75, 1]."""
    base = min(INITIAL_RETRY_DELAY_S * 2.0**retry, MAX_RETRY_DELAY_S)
    return base * (1 - 0.25 * random.random())


def _content(data: bytes) -> str | None:
    """The first choice's content of a chat completion, or ``None`` for a body that is not one
    (malformed JSON, an HTML page, no ``choices``)."""
    try:
        answer = json.loads(data)
        content = answer["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


async def _ask(
    session: Any, url: str, body: dict[str, Any], max_attempts: int
) -> tuple[str, int, str | None]:
    """``(status, attempts, content)`` of one request, retried as the module docstring says."""
    import aiohttp

    for attempt in range(1, max_attempts + 1):
        wait: float | None = None
        try:
            async with session.post(url, json=body) as response:
                data = await response.read()
                status = response.status
                if status == 200:
                    content = _content(data)
                    if content is not None:
                        return "ok", attempt, content
                elif status < 500 and status not in _RETRIED_STATUSES:
                    return "error", attempt, None
                elif status in (429, 503):
                    wait = server_wait(response.headers)
        except (aiohttp.ClientError, TimeoutError):
            pass  # a reset, a refused connection, or the attempt's timeout: retried
        if attempt < max_attempts:
            await asyncio.sleep(wait if wait is not None else backoff_s(attempt - 1))
    return "error", max_attempts, None


async def raw_client(
    base_url: str,
    lines: Sequence[dict[str, Any]],
    out: Path,
    *,
    concurrency: int = 128,
    timeout_s: float = 600.0,
    max_attempts: int = 12,
) -> None:
    """Send every line (``custom_id`` plus the body) with ``concurrency`` workers; write the
    answers to Parquet at ``out``."""
    import aiohttp
    import pyarrow as pa
    import pyarrow.parquet as pq

    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for line in lines:
        queue.put_nowait(line)
    rows: list[dict[str, object]] = []
    url = base_url + "/chat/completions"

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            line = queue.get_nowait()
            body = {k: v for k, v in line.items() if k != "custom_id"}
            status, attempts, content = await _ask(session, url, body, max_attempts)
            rows.append(
                {"custom_id": line["custom_id"], "status": status, "attempts": attempts,
                 "content": content}
            )  # fmt: skip

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    pq.write_table(pa.Table.from_pylist(rows), out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the client over a JSONL file (as ``raw_cmd`` builds the command)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_url")
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per attempt")
    parser.add_argument("--max-attempts", type=int, default=12)
    args = parser.parse_args(argv)
    lines = [json.loads(line) for line in args.input.read_text().splitlines() if line]
    asyncio.run(
        raw_client(
            args.base_url,
            lines,
            args.output,
            concurrency=args.concurrency,
            timeout_s=args.timeout,
            max_attempts=args.max_attempts,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
