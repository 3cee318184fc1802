"""The concurrent core: one task group owns the readers and the workers.

    reader ──[requests, bounded]──► N workers ──► journal (+ stats, progress)
    (thread-batched file     (ask: limits, POST with retries, re-asks;
     reading, resume plan)    record each result before taking the next request)

A bounded memory object stream gives backpressure, so memory stays flat whatever the input
size. A job with variants runs one ``Lane`` per variant: its own pass over the input, stream and
workers, routed among the variant's endpoints, so variants progress side by side and a slow
endpoint holds back only the variants that use it.

The parts, each with one job: ``asking.py`` (a request priced, reserved under ``--max-cost``
and made into its ``Result``), ``attempt.py`` (sent with its retries, within its endpoint's
limits and outages), ``reasks.py`` (the ``response_format`` check), ``recording.py`` (the
journal, or why a result is left for a re-run), ``control.py`` (stopping). On SIGINT/SIGTERM
dispatch stops at once, requests in flight get ``grace_s`` to finish, and the run returns with
everything finished recorded. A refused key, an exhausted quota, a spent budget or an outage
past its patience stops dispatch too; so does a configuration error the endpoint's first
answers show (``setup_check.py``): the run then ends with ``RunStats.config_error`` set.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from batcher.cost.budget import Budget
from batcher.cost.pricing import Pricer
from batcher.engine.asking import Asker
from batcher.engine.attempt import Sender
from batcher.engine.control import EngineSettings, RunControl, Sinks
from batcher.engine.endpoints import Endpoint, Router
from batcher.engine.pool import BUDGET_LEND_FACTOR, LEND_FACTOR, WorkerPool, lending
from batcher.engine.reasks import Reasker
from batcher.engine.recording import Recorder
from batcher.engine.retry import Sleep
from batcher.engine.watermark import LaneMark, Watermark
from batcher.errors import InputError
from batcher.input.idset import IdSet
from batcher.input.requests import LateCounter
from batcher.output.resume import ResumePlan
from batcher.records import Reject, Request
from batcher.runner.stats import RunStats

#: Lines read per trip to the reading thread (fewer at first: runner.lanes.FIRST_READ_BATCH).
READ_BATCH = 256


@dataclass(frozen=True, kw_only=True)
class Lane:
    """One variant's share of a run: its line batches and the endpoints it may use (all of the
    engine's when ``None``). Lanes read the same input, so a line that every variant rejects
    is written to the rejects file and counted by whichever lane comes to it first, once.
    """

    batches: Iterator[list[Request | Reject]]
    endpoints: Sequence[Endpoint] | None = None


class Engine:
    """Runs requests from an iterator of line batches through the pool into the sinks."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        settings: EngineSettings,
        sinks: Sinks,
        *,
        pricer: Pricer,
        plan: ResumePlan | None = None,
        budget: Budget | None = None,
        on_token_limit: Callable[[], object] | None = None,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        """``pricer``: the job's (``runner.wiring.build_pricer``: its ``[pricing]`` first).
        ``plan``: what earlier runs recorded (requests it marks done are skipped).
        ``budget``: ``--max-cost``'s. ``on_token_limit``: see ``requests.LateCounter``'s
        ``on_first``. ``sleep``: the retries' waits (tests replace it)."""
        self._router = Router(endpoints)
        self._settings = settings
        self._concurrency = settings.concurrency or sum(e.limits.max_concurrency for e in endpoints)
        self._rejects = sinks.rejects
        self._stats = sinks.stats
        self._progress = sinks.progress
        self._plan = plan
        self._control = control = RunControl(sinks.stats, sinks.progress)
        self._stopping = control.stopping
        self._recorder = recorder = Recorder(sinks, control, endpoints)
        late_counter = LateCounter(settings.encoding, on_first=on_token_limit)
        sender = Sender(
            self._router, settings.retry, recorder, control, budget, late_counter, lending(sleep)
        )
        self._asker = Asker(sender, control, pricer, budget, plan, settings.encoding)
        self._budget = budget
        validate = settings.validate
        self._reasker = (
            Reasker(validate, self._asker, recorder, control)
            if validate is not None and validate.json_schema
            else None
        )
        self._rejected_lines: IdSet | None = None
        #: How far the input is settled (the live output writes the rows below it).
        self.watermark = Watermark()
        self._signalled = False
        self._signal_scope = anyio.CancelScope()

    async def run(
        self,
        batches: Iterator[list[Request | Reject]] | Sequence[Lane],
        *,
        handle_signals: bool = False,
    ) -> RunStats:
        """Process every batch (of every lane); return the statistics (also kept in ``stats``).

        One lane (an iterator of batches) gets the engine's ``concurrency`` workers; with
        several, each lane gets as many workers as its endpoints allow in flight.
        """
        start = time.monotonic()
        lanes = [Lane(batches=batches)] if isinstance(batches, Iterator) else list(batches)
        if len(lanes) > 1:
            self._rejected_lines = IdSet()  # a line rejected by every variant counts once
        try:
            async with anyio.create_task_group() as outer:
                if handle_signals:
                    outer.start_soon(self._watch_signals)
                with self._control.work_scope:
                    async with anyio.create_task_group() as work:
                        for lane in lanes:
                            self._start_lane(work, lane)
                self._recorder.release_held()
                self._signal_scope.cancel()
        finally:
            if self._rejected_lines is not None:
                self._rejected_lines.close()
        self._stats.wall_s = time.monotonic() - start
        return self._stats

    def stop(self, reason: str, *, at_once: bool = False, quiet: bool = False) -> None:
        """Stop dispatching; requests in flight may finish (cancelled now if ``at_once``).

        Only the first reason counts; a second stop never cuts off answers in flight (only a
        second Ctrl+C does). ``quiet``: no note (the caller tells).
        """
        self._control.stop(reason, at_once=at_once, quiet=quiet)

    def stop_within(self, reason: str, grace_s: float) -> None:
        """Stop as ``stop`` does, and cut off the requests still in flight after ``grace_s``
        (what a first Ctrl+C does; the Ray engine's workers when the driver is interrupted)."""
        self._control.stop_within(reason, grace_s)

    @property
    def record_error(self) -> OSError | None:
        """The error that stopped the journal, if any."""
        return self._recorder.error

    def _start_lane(self, work: anyio.abc.TaskGroup, lane: Lane) -> None:
        router = self._router
        workers = self._concurrency
        if lane.endpoints is not None:
            router = Router(lane.endpoints)
            workers = sum(e.limits.max_concurrency for e in lane.endpoints)
        req_send, req_recv = anyio.create_memory_object_stream[Request](2 * workers)
        mark = self.watermark.lane()
        reading = True

        def start() -> bool:
            """Start a worker on a clone of the lane's stream, while the lane still reads (the
            requests left in the stream go to the workers there are)."""
            if reading:
                work.start_soon(self._work, req_recv.clone(), router, mark, pool)
            return reading

        # Workers start as requests are read, so a short input never pays for a large pool it
        # cannot use; one waiting out a retry's pause lends its place (``pool``).
        lend_factor = LEND_FACTOR if self._budget is None else BUDGET_LEND_FACTOR
        pool = WorkerPool(workers, start, steady=router.steady, lend_factor=lend_factor)

        async def read() -> None:
            nonlocal reading
            try:
                with self._control.read_scope():
                    await self._read(lane.batches, req_send, pool.grow, mark)
            finally:
                mark.read_all()  # no more lines come from this lane
                reading = False
                req_recv.close()  # the workers hold their own clones

        work.start_soon(read)

    async def _read(
        self,
        batches: Iterator[list[Request | Reject]],
        send: MemoryObjectSendStream[Request],
        spawn: Callable[[], None],
        mark: LaneMark,
    ) -> None:
        async with send:
            while not self._stopping.is_set():
                # File reading and JSON parsing run in a thread, a batch at a time, so a slow
                # stdin never blocks the event loop.
                try:
                    batch = await anyio.to_thread.run_sync(
                        next, batches, None, abandon_on_cancel=True
                    )
                except InputError as exc:
                    self.stop(str(exc))  # what was read is sent; the rest waits for a re-run
                    return
                if batch is None:
                    return
                for item in batch:
                    if isinstance(item, Reject):
                        mark.passed(item.line)
                        if not self._reject(item):
                            return
                    elif self._plan and self._plan.decide(item.key, item.body_hash) == "skip":
                        mark.passed(item.line)
                        self._stats.skipped += 1
                        self._progress.advance()
                    else:
                        mark.dispatch(item.line)
                        spawn()
                        try:
                            try:
                                send.send_nowait(item)  # no trip round the loop when there is room
                            except anyio.WouldBlock:
                                await send.send(item)
                        except anyio.BrokenResourceError:
                            return  # every worker has stopped

                    if self._stopping.is_set():
                        return

    def _reject(self, reject: Reject) -> bool:
        """Write a rejected line (once, whichever lane comes to it first); false if the
        rejects file cannot be written (the run stops)."""
        seen = self._rejected_lines
        if seen is None or seen.add(str(reject.line)):
            try:
                self._rejects.write(reject)
            except OSError as exc:
                self.stop(f"cannot write the rejects file: {exc.strerror or exc}")
                return False
            self._stats.rejected += 1
        self._progress.advance()
        return True

    async def _work(
        self,
        recv: MemoryObjectReceiveStream[Request],
        router: Router,
        mark: LaneMark,
        pool: WorkerPool,
    ) -> None:
        ask, reasker, finish = self._asker.ask, self._reasker, self._recorder.finish
        pool.join()
        async with recv:
            while not pool.leave_if_surplus():
                request = await _next_request(recv)
                if request is None or self._stopping.is_set():
                    pool.leave()
                    return  # a request taken as the run stops is left for the next run
                result = await ask(request, router)
                if result is None:
                    pool.leave()
                    return  # the budget is spent: this one and the rest wait for a re-run
                reasks = 0
                if reasker is not None and result.status == "ok":
                    result, reasks = await reasker.check(request, result, router)
                finish(request, result, router, reasks)
                mark.settle(request.line)  # recorded, held back or left for a re-run

    async def _watch_signals(self) -> None:
        grace_s = self._settings.grace_s
        with self._signal_scope, anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
            async for signum in sigs:
                if self._signalled:  # asked twice: stop now
                    self._control.work_scope.cancel()
                    continue
                self._signalled = True
                self.stop_within(f"interrupted by {signal.Signals(signum).name}", grace_s)
                self._progress.note(
                    f"batcher: waiting up to {grace_s:g} s for requests in flight "
                    "(press Ctrl+C again to stop at once)"
                )


async def _next_request(recv: MemoryObjectReceiveStream[Request]) -> Request | None:
    """The next request, ``None`` at the end; without a trip round the event loop when one is
    waiting (``receive()`` always makes one): the worker yields soon enough, on its request."""
    try:
        return recv.receive_nowait()
    except anyio.WouldBlock:
        pass
    except anyio.EndOfStream:
        return None
    try:
        return await recv.receive()
    except anyio.EndOfStream:
        return None
