"""The concurrent core: one task group owns the reader, the workers and the single writer.

    reader ──[requests, bounded]──► N workers ──[results, bounded]──► writer
    (thread-batched   (limits, POST with retries)           (output, stats,
     file reading)                                            progress)

Bounded memory object streams give backpressure, so memory stays flat whatever the input size.
The concurrency limit is the number of workers; the RPM/TPM meters are waited on before every
attempt. On SIGINT/SIGTERM dispatch stops at once, requests in flight get ``grace_s`` to finish,
and everything finished is written before the run returns.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Protocol

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from batcher.client import Attempt, ChatClient
from batcher.config import RetryConfig
from batcher.limits import Limits
from batcher.progress import Progress
from batcher.records import Reject, Request, Result
from batcher.retry import RetryableAttempt, Sleep, retry_policy
from batcher.stats import RunStats

#: Pool-wide pause after a 429 that carried no retry-after header.
DEFAULT_COOLDOWN_S = 1.0
#: Lines read per trip to the reading thread.
READ_BATCH = 256


class ResultSink(Protocol):
    def write(self, result: Result) -> None: ...


class RejectSink(Protocol):
    def write(self, reject: Reject) -> None: ...


class Engine:
    """Runs requests from an iterator of line batches through the pool into the sinks."""

    def __init__(
        self,
        *,
        client: ChatClient,
        limits: Limits,
        retry: RetryConfig,
        concurrency: int,
        results: ResultSink,
        rejects: RejectSink,
        stats: RunStats,
        progress: Progress,
        grace_s: float = 10.0,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        self._client = client
        self._limits = limits
        self._retry = retry
        self._concurrency = concurrency
        self._results = results
        self._rejects = rejects
        self._stats = stats
        self._progress = progress
        self._grace_s = grace_s
        self._sleep = sleep
        self._stopping = anyio.Event()
        self._work_scope = anyio.CancelScope()
        self._signal_scope = anyio.CancelScope()

    async def run(
        self, batches: Iterator[list[Request | Reject]], *, handle_signals: bool = False
    ) -> RunStats:
        """Process every batch; return the statistics (also kept in the ``stats`` given)."""
        start = time.monotonic()
        req_send, req_recv = anyio.create_memory_object_stream[Request](2 * self._concurrency)
        res_send, res_recv = anyio.create_memory_object_stream[Result](2 * self._concurrency)
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._write_results, res_recv)
            if handle_signals:
                outer.start_soon(self._watch_signals)
            with self._work_scope:
                async with anyio.create_task_group() as work:
                    work.start_soon(self._read, batches, req_send)
                    for _ in range(self._concurrency):
                        work.start_soon(self._work, req_recv.clone(), res_send.clone())
                    req_recv.close()
                    res_send.close()
            self._signal_scope.cancel()
        self._stats.wall_s = time.monotonic() - start
        return self._stats

    def stop(self, reason: str) -> None:
        """Stop dispatching; requests in flight get the grace period, then are cancelled."""
        if self._stopping.is_set():
            self._work_scope.cancel()  # asked twice: stop now
            return
        self._stats.stopped_early = True
        self._stats.stop_reason = reason
        self._stopping.set()
        self._progress.note(
            f"batcher: {reason}: no new requests; waiting up to {self._grace_s:g} s "
            "for those in flight (press Ctrl+C again to stop at once)"
        )

    async def _read(
        self, batches: Iterator[list[Request | Reject]], send: ObjectSendStream[Request]
    ) -> None:
        async with send:
            while not self._stopping.is_set():
                # File reading and JSON parsing run in a thread, a batch at a time, so a slow
                # stdin never blocks the event loop.
                batch = await anyio.to_thread.run_sync(next, batches, None, abandon_on_cancel=True)
                if batch is None:
                    return
                for item in batch:
                    if isinstance(item, Reject):
                        self._rejects.write(item)
                        self._stats.rejected += 1
                        self._progress.advance()
                    else:
                        self._stats.submitted += 1
                        try:
                            await send.send(item)
                        except anyio.BrokenResourceError:
                            return  # every worker has stopped

                    if self._stopping.is_set():
                        return

    async def _work(
        self, recv: ObjectReceiveStream[Request], send: ObjectSendStream[Result]
    ) -> None:
        async with recv, send:
            async for request in recv:
                if self._stopping.is_set():
                    return  # not sent: it is left for the next run
                await send.send(await self._send(request))

    async def _send(self, request: Request) -> Result:
        started = time.time()
        attempts = 0
        last: Attempt | None = None
        try:
            async for attempt in retry_policy(self._retry, sleep=self._sleep):
                with attempt:
                    attempts += 1
                    await self._limits.acquire(request.est_tokens)
                    last = await self._client.post(request.body)
                    used = last.usage.total_tokens if last.usage else None
                    self._limits.settle(request.est_tokens, used if last.ok else 0)
                    if last.status_code == 429:
                        self._limits.cool_down(last.retry_after or DEFAULT_COOLDOWN_S)
                    if last.retryable:
                        raise RetryableAttempt(last)
        except RetryableAttempt:
            pass  # retries exhausted: ``last`` is the final failed attempt
        assert last is not None
        return _result_of(request, last, attempts, started)

    async def _write_results(self, recv: ObjectReceiveStream[Result]) -> None:
        async with recv:
            async for result in recv:
                self._results.write(result)
                self._stats.add(result)
                self._progress.advance()

    async def _watch_signals(self) -> None:
        with self._signal_scope, anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
            async for signum in sigs:
                self.stop(f"interrupted by {signal.Signals(signum).name}")
                if not self._work_scope.cancel_called:
                    self._work_scope.deadline = anyio.current_time() + self._grace_s


def _result_of(request: Request, last: Attempt, attempts: int, started: float) -> Result:
    body = last.body
    model = body.get("model") if last.ok and isinstance(body, dict) else None
    return Result(
        custom_id=request.custom_id,
        line=request.line,
        status="ok" if last.ok else "error",
        model=model if isinstance(model, str) else request.body.get("model"),
        attempts=attempts,
        latency_s=last.latency_s,
        started_at=started,
        finished_at=time.time(),
        status_code=last.status_code,
        request_id=last.request_id,
        body=body,
        usage=last.usage,
        error_code=last.error_code,
        error_message=last.error_message,
        metadata=request.metadata,
    )
