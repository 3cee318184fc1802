"""The worker side of the Ray engine: the actor that runs blocks of requests through batcher's
own ``Engine`` (see ``batcher.ray.driver`` for the whole picture).

Imported in Ray's worker processes, and by the driver for ``WorkerSpec``; nothing here imports
Ray, so the logic can be tested without it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batcher import jsonfast
from batcher.config import JobConfig
from batcher.errors import ConfigError
from batcher.records import Reject, Request, Result
from batcher.runner.checks import worker_api_keys
from batcher.runner.progress import Progress
from batcher.runner.stats import RunStats

if TYPE_CHECKING:
    import pyarrow as pa

    from batcher.engine.dispatch import Engine
    from batcher.output.shape import OutputShape
    from batcher.ray.folder import PartFiles

#: The status of the extra row a worker adds to a block it could not finish, with the reason
#: in ``error_message`` (Ray drops empty blocks and their schema metadata, so a row it is).
#: The driver takes it out before writing.
STOPPED = "stopped"
#: The stop row's ``error_code`` when the job's setup cannot work at an endpoint.
CONFIG_ERROR = "config_error"
#: The status of the marker row a worker adds to each block: ``line`` is how many of its
#: requests it took.
SENT = "sent"
#: Prefix of errors a worker raises on purpose, so the driver can find them in Ray's wrapping.
ERROR_MARK = "[batcher] "


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What every worker actor needs: the job, where each endpoint is, and the pool size.

    No API key: a worker reads it from its own environment (the variable the job names).
    """

    job: JobConfig
    urls: list[str]  # each endpoint's base URL, in the job's order
    needs_key: list[bool]  # whether the driver found a key for each endpoint
    workers: int
    #: The driver's stop flag (a Ray actor handle, ``stopping.StopFlag``): its ``reason``
    #: is set when the driver is interrupted. ``None``: nothing to watch.
    stop_flag: Any = None
    #: The output's typed columns (``output.shape``); ``None``: those of a plain job.
    shape: OutputShape | None = None
    #: This run's part files when the output is in object storage: each worker writes its
    #: blocks' parts there itself (``blocks.write_on_worker``). ``None``: the driver writes.
    parts: PartFiles | None = None


#: How often a worker asks the driver's stop flag whether to stop (seconds).
STOP_POLL_S = 0.3
#: How long a worker waits for the flag's answer before asking again (seconds).
STOP_POLL_TIMEOUT_S = 2.0


class BlockWorker:
    """A Ray Data actor: runs blocks of requests through batcher's Engine, returns records.

    One event loop lives as long as the actor (in a thread, behind an anyio blocking portal),
    and on it one ``Engine``, with one HTTP client and one ``Limits`` per endpoint: the same
    pool of workers, retries, 429 pauses and outage handling as a local run, fed by every block
    the actor is given. Each ``__call__`` (Ray runs ``CALLS_PER_WORKER`` at once, in threads)
    queues its block for the engine and waits until each of its requests is recorded; blocks
    overlap in the pool, so one block's stragglers leave no slot idle. When the engine stops (a
    refused key, no quota left, an outage past its patience) the requests not recorded are left
    out of their blocks, and every later block comes back empty, with the reason. The same
    when the driver is interrupted (its stop flag, polled every ``STOP_POLL_S``): no new
    requests, those in flight get the job's ``grace_s``, and what was answered comes back.
    """

    spec: WorkerSpec  # set on the subclass the driver makes for a run

    def __init__(self) -> None:
        import anyio.from_thread

        spec = self._spec = self.spec
        self._lock = threading.Lock()
        self._pending: dict[str, _Block] = {}  # custom_id -> the block it came in
        self._queue: queue.SimpleQueue[list[Request | Reject]] = queue.SimpleQueue()
        self._stopped: str | None = None
        #: The endpoint whose setup cannot work (``setup_check``), when that stopped the engine.
        self._config_error_endpoint: str | None = None
        self._setup_error: str | None = None
        self._engine: Engine | None = None
        self._keys: list[str | None] = []
        try:
            self._keys = worker_api_keys(spec.job, spec.needs_key)
        except ConfigError as exc:
            self._setup_error = str(exc)
        self._exit = contextlib.ExitStack()
        self._portal = self._exit.enter_context(anyio.from_thread.start_blocking_portal())
        if self._setup_error is None:
            self._portal.call(self._open)
            self._portal.start_task_soon(self._serve)
            if spec.stop_flag is not None:
                self._portal.start_task_soon(self._watch_stop_flag, spec.stop_flag)

    async def _open(self) -> None:
        from batcher.runner.wiring import build_pricer, endpoint_targets, open_endpoints

        job = self._spec.job
        targets = endpoint_targets(job, self._spec.urls, self._keys, known=None)
        self._clients = contextlib.AsyncExitStack()
        self._endpoints = await open_endpoints(
            job, targets, self._clients, workers=self._spec.workers
        )
        self._pricer = build_pricer(job)

    async def _serve(self) -> None:
        """Run the engine over every block queued, for as long as the actor lives or until
        the engine stops; then release every block still waiting."""
        from batcher.engine.control import Sinks
        from batcher.engine.dispatch import Engine
        from batcher.runner.wiring import engine_settings

        stats = RunStats()
        progress = _WorkerProgress(stats, total=None, enabled=False)
        sinks = Sinks(results=self, rejects=self, stats=stats, progress=progress)
        engine = Engine(
            self._endpoints, engine_settings(self._spec.job), sinks, pricer=self._pricer
        )
        self._engine = engine
        reason = "the worker's engine ended"
        try:
            await engine.run(iter(self._queue.get, None))  # blocks in the engine's read thread
            reason = stats.stop_reason or reason
            if stats.config_error is not None:  # the driver stops the run with exit 2
                reason = stats.config_error
                self._config_error_endpoint = stats.config_error_endpoint or ""
        except BaseException as exc:
            reason = f"the worker's engine failed: {exc!r}"
            raise
        finally:
            with self._lock:
                self._stopped = reason
                for block in set(self._pending.values()):
                    block.done.set()
                self._pending.clear()

    async def _watch_stop_flag(self, flag: Any) -> None:
        """Until the engine ends: ask the driver's flag whether to stop; when it says so, stop
        the engine (no new requests; those in flight get ``grace_s``)."""
        import anyio

        while True:
            await anyio.sleep(STOP_POLL_S)
            with self._lock:
                if self._stopped is not None:
                    return
            reason = await anyio.to_thread.run_sync(_ask_flag, flag)
            if reason is not None and self._engine is not None:
                self._engine.stop_within(reason, self._spec.job.grace_s)
                return

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Run each block packed in ``batch`` (``reading.pack``); each block's records packed
        the same way, one row a block (``run_block``)."""
        import pyarrow as pa

        from batcher.ray.reading import pack, unpack

        if self._setup_error is not None:
            raise RuntimeError(ERROR_MARK + self._setup_error)
        return pa.concat_tables([pack(self.run_block(block)) for block in unpack(batch)])

    def run_block(self, block: pa.Table) -> pa.Table:
        """Send the block's requests; its records (``writers.SCHEMA`` and the typed columns),
        once all are in, then its marker rows (``reading.MARKERS``: status is the marker), a
        ``SENT`` row, and the ``body_hash`` column (each record's request hash)."""
        import pyarrow.compute as pc

        from batcher.output.rows import PLAIN
        from batcher.output.writers import results_table
        from batcher.ray.reading import SEND

        if self._setup_error is not None:
            raise RuntimeError(ERROR_MARK + self._setup_error)
        sending = pc.equal(block["kind"], SEND)
        rows = block.filter(sending).to_pylist()
        requests = [_request_of(row) for row in rows]
        waiting = _Block(len(requests))
        with self._lock:
            if self._stopped is None:
                for request in requests:
                    self._pending[request.custom_id] = waiting
                self._queue.put([*requests])
            else:
                waiting.done.set()  # a refused key, no quota, an outage: not worth trying
        waiting.done.wait()
        table = results_table(waiting.results.values(), shape=self._spec.shape or PLAIN)
        if len(waiting.results) < len(requests):
            table = _with_stop_row(
                table, self._stopped or "stopped", config_error=self._config_error_endpoint
            )
        markers = block.filter(pc.invert(sending)).to_pylist()
        markers.append({"kind": SENT, "line": len(requests)})
        hashes = {row["custom_id"]: row["body_hash"] for row in rows}
        finished = _with_markers(table, markers, hashes)
        if self._spec.parts is None:
            return finished
        from batcher.errors import OutputError
        from batcher.ray.blocks import write_on_worker

        try:
            return write_on_worker(finished, self._spec.parts)
        except OutputError as exc:  # named in the driver's error, without Ray's wrapping
            raise RuntimeError(ERROR_MARK + str(exc)) from None

    def append(self, result: Result, body_hash: str, *, provisional: bool = False) -> None:
        """The engine's result sink (on the loop's thread): file the record with its block.

        A provisional record (an answer about to be re-asked) is replaced by the final one."""
        with self._lock:
            block = self._pending.get(result.custom_id)
            if block is None:
                return  # its block was released when the engine stopped
            block.results[result.custom_id] = result
            if not provisional:
                del self._pending[result.custom_id]
                block.left -= 1
                if block.left == 0:
                    block.done.set()

    def write(self, reject: Reject) -> None:
        """The engine's rejects sink: never used, the read task rejected bad lines already."""
        raise AssertionError(f"a worker was given a reject: line {reject.line}")

    def __del__(self) -> None:
        # Close the HTTP clients on their own loop when the pool lets the actor go, instead of
        # leaving aiohttp to complain about unclosed sessions at exit.
        with contextlib.suppress(Exception):
            self._portal.call(self._clients.aclose)
        with contextlib.suppress(Exception):
            self._exit.close()


class _Block:
    """A block a ``__call__`` waits on: its records so far, and how many are still out."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.results: dict[str, Result] = {}
        self.done = threading.Event()
        if size == 0:
            self.done.set()


def _ask_flag(flag: Any) -> str | None:
    """The stop flag's reason (``None``: go on, also when it does not answer in time)."""
    import ray

    try:
        reason: str | None = ray.get(flag.reason.remote(), timeout=STOP_POLL_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        return None
    except ray.exceptions.RayError:
        # The flag is gone: its driver went without a word (killed); Ray ends this actor.
        return None
    return reason


def _with_stop_row(table: pa.Table, reason: str, *, config_error: str | None = None) -> pa.Table:
    """``table`` and the row saying why its worker stopped; ``config_error`` names the endpoint
    when the job's setup cannot work there (``error_code`` ``CONFIG_ERROR``)."""
    import pyarrow as pa

    row = {"custom_id": "", "status": STOPPED, "error_message": reason}
    if config_error is not None:
        row |= {"error_code": CONFIG_ERROR, "endpoint": config_error}
    row_table = pa.Table.from_pylist([row], schema=table.schema)
    return pa.concat_tables([table, row_table])


def _with_markers(
    table: pa.Table, markers: list[dict[str, Any]], hashes: Mapping[str, str]
) -> pa.Table:
    """``table``, then a row per marker (status: its kind; ``line``; a reject's reason in
    ``error_message`` and its text in ``content``), then the ``body_hash`` column."""
    import pyarrow as pa

    rows = [
        {
            "custom_id": m.get("custom_id") or "",
            "status": m["kind"],
            "line": m.get("line"),
            "error_message": m.get("reason"),
            "content": m.get("text"),
        }
        for m in markers
    ]
    table = pa.concat_tables([table, pa.Table.from_pylist(rows, schema=table.schema)])
    ids = table["custom_id"].to_pylist()
    return table.append_column("body_hash", pa.array([hashes.get(c) for c in ids], pa.string()))


def _request_of(row: Mapping[str, Any]) -> Request:
    meta, row_input = row["metadata"], row["input"]
    return Request(
        custom_id=row["custom_id"],
        line=row["line"],
        body=jsonfast.loads_exact(row["body"]),
        metadata=None if meta is None else jsonfast.loads_exact(meta),
        prompt_tokens=row["prompt_tokens"],
        completion_budget=row["completion_budget"],
        body_hash=row["body_hash"],
        input=None if row_input is None else jsonfast.loads_exact(row_input),
    )


class _WorkerProgress(Progress):
    """No progress lines from workers (the driver counts blocks); notes go to stderr, which
    Ray forwards to the driver."""

    def advance(self, n: int = 1) -> None:
        pass
