"""A worker waiting out a retry's pause lends its place (``engine.pool``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq

from batcher.engine.pool import BUDGET_LEND_FACTOR, LEND_FACTOR, WorkerPool, lending
from tests.helpers import run_batcher
from tests.loopback import chat_answer, read_body, serving


def test_requests_go_on_while_refused_ones_wait_for_their_retry(tmp_path: Path) -> None:
    # Two in flight; the first two requests are refused once by a busy server (a 429 saying
    # it is overloaded, retry-after 1 s). Their workers lend their places while they wait,
    # so every other request is sent before either retry, instead of after both.
    seen: list[str] = []
    refused: set[str] = set()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = json.loads(await read_body(receive))
        cid = body["messages"][0]["content"]
        seen.append(cid)
        if cid in ("q0", "q1") and cid not in refused:
            refused.add(cid)
            status, headers = 429, [(b"retry-after", b"1")]
            answer: dict[str, Any] = {
                "error": {"message": "The server is overloaded", "code": "overloaded"}
            }
        else:
            status, headers = 200, []
            answer = chat_answer("m", {"prompt_tokens": 1, "completion_tokens": 1})
        head = [(b"content-type", b"application/json"), *headers]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    src = tmp_path / "in.jsonl"
    lines = [{"custom_id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}]}
             for i in range(10)]  # fmt: skip
    src.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out.parquet"
    with serving(app) as url:
        proc = run_batcher(
            "run", "-i", str(src), "-o", str(out), "-m", "m", "--base-url", url, "-c", "2",
            "--no-progress",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    retries = [i for i, cid in enumerate(seen) if cid in ("q0", "q1")][2:]
    assert len(seen) == 12 and len(retries) == 2
    assert set(seen[: min(retries)]) == {f"q{i}" for i in range(10)}, seen
    rows = pq.read_table(out).to_pylist()
    assert [r["custom_id"] for r in rows] == [f"r{i}" for i in range(10)]
    assert all(r["status"] == "ok" for r in rows)
    assert [r["attempts"] for r in rows[:3]] == [2, 2, 1]


def _waits_while_lending(pool: WorkerPool, waits: int) -> tuple[int, int]:
    """``waits`` workers of ``pool`` each start a retry's wait at once: the pool's (running,
    waiting) while they wait."""

    async def main() -> tuple[int, int]:
        sleep = lending(anyio.sleep)

        async def long_wait() -> None:
            pool.join()  # the pool is this task's (a context variable)
            await sleep(0.05)

        async with anyio.create_task_group() as tg:
            for _ in range(waits):
                tg.start_soon(long_wait)
            await anyio.sleep(0.01)
            during = (pool.running, pool.waiting)
        return during

    return anyio.run(main)


def test_a_lane_lends_at_most_its_factor_of_places_and_shrinks_back() -> None:
    started: list[int] = []

    def start() -> bool:
        started.append(1)
        return True

    pool = WorkerPool(2, start)
    pool.grow()
    pool.grow()
    pool.grow()
    assert pool.running == 2 and len(started) == 2
    lent = LEND_FACTOR * 2
    # one wait more than may lend: that one holds its own place
    during = _waits_while_lending(pool, lent + 1)
    assert during == (2 + lent, lent)  # every lent place taken by a new worker
    assert pool.waiting == 0
    # the places came back: the lane is over its size until workers leave
    for _ in range(lent):
        assert pool.leave_if_surplus()
    assert not pool.leave_if_surplus() and pool.running == 2


def test_a_lane_under_a_budget_lends_at_most_its_size() -> None:
    # each waiting request keeps its --max-cost reservation: at most the lane's size of them
    pool = WorkerPool(2, lambda: True, lend_factor=BUDGET_LEND_FACTOR)
    pool.grow()
    pool.grow()
    assert _waits_while_lending(pool, 3) == (4, 2)


def test_a_lane_whose_endpoints_fail_often_lends_nothing() -> None:
    steady = True
    pool = WorkerPool(2, lambda: True, steady=lambda: steady)
    pool.grow()
    pool.grow()
    assert _waits_while_lending(pool, 2) == (4, 2)  # steady: both places lent
    while pool.leave_if_surplus():
        pass
    steady = False
    assert _waits_while_lending(pool, 2) == (2, 0)  # the waits keep their places
