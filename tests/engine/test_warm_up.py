"""``WarmUp``: the end-of-run work starts in a thread once the event loop has gone idle."""

from __future__ import annotations

import threading
import time

import anyio
import anyio.lowlevel
import pytest

from batcher.engine.warm_up import WarmUp


class Work:
    """Records when, in which thread and how often it ran."""

    def __init__(self) -> None:
        self.ran: list[tuple[float, int]] = []
        self.done = threading.Event()

    def __call__(self) -> None:
        self.ran.append((time.monotonic(), threading.get_ident()))
        self.done.set()


async def busy_loop(seconds: float) -> float:
    """Keep the event loop busy, yielding every 3 ms (as a pool being opened does); return
    when the busy spell ended."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        # blocking on purpose: the loop's own work
        time.sleep(0.003)  # noqa: ASYNC251
        await anyio.lowlevel.checkpoint()
    return time.monotonic()


def test_the_work_waits_while_the_loop_is_busy_then_runs_once_in_a_thread() -> None:
    work = Work()
    busy_until: list[float] = []

    async def main() -> None:
        warm = WarmUp(work, latest_s=10)
        async with anyio.create_task_group() as tg:
            tg.start_soon(warm.run)
            warm.start()
            warm.start()  # later requests: nothing more
            busy_until.append(await busy_loop(0.15))
            assert await anyio.to_thread.run_sync(work.done.wait, 10)

    anyio.run(main)
    assert len(work.ran) == 1
    started, thread = work.ran[0]
    assert thread != threading.get_ident()
    # not while the loop was busy: only once it had idled a few milliseconds
    assert started >= busy_until[0]


def test_on_an_idle_loop_the_work_starts_at_once_and_not_before_the_first_request() -> None:
    work = Work()
    times: dict[str, float] = {}

    async def main() -> None:
        warm = WarmUp(work, latest_s=10)
        async with anyio.create_task_group() as tg:
            tg.start_soon(warm.run)
            await anyio.sleep(0.05)
            assert not work.ran  # no request yet
            times["start"] = time.monotonic()
            warm.start()
            assert await anyio.to_thread.run_sync(work.done.wait, 10)

    anyio.run(main)
    assert work.ran[0][0] - times["start"] < 5  # far sooner than latest_s


def test_a_loop_that_never_idles_gets_the_work_at_latest_s() -> None:
    work = Work()

    async def main() -> None:
        warm = WarmUp(work, latest_s=0.05)
        async with anyio.create_task_group() as tg:
            tg.start_soon(warm.run)
            warm.start()
            await busy_loop(0.3)
            assert work.done.is_set()  # well before the busy spell ended

    anyio.run(main)
    assert len(work.ran) == 1


@pytest.mark.parametrize("first_request", [False, True])
def test_a_run_that_ends_first_cancels_the_work(first_request: bool) -> None:
    work = Work()

    async def main() -> None:
        warm = WarmUp(work, latest_s=10)
        with anyio.fail_after(5):  # a cancel that did not take would hang here
            async with anyio.create_task_group() as tg:
                tg.start_soon(warm.run)
                if first_request:
                    warm.start()
                await busy_loop(0.02)  # the run: the loop was never idle
                warm.cancel()  # the task group now ends at once

    anyio.run(main)
    time.sleep(0.05)
    assert not work.ran


def test_without_work_the_task_returns_at_once() -> None:
    async def main() -> None:
        warm = WarmUp(None)
        with anyio.fail_after(5):
            await warm.run()
        warm.start()

    anyio.run(main)
