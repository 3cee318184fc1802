"""Requests a batch did not answer, sent through the online engine (``[batch] unanswered =
"online"``) in the same run, at the online price, under the same ``--max-cost`` budget.

``collect`` journals a chunk ``collected`` with the keys it hands over (``ChunkState.online``)
and queues them on ``BatchRun.online``; a rerun finds the ones the journal does not record
(``pending``) and sends them, never in a batch. Each answer goes to the batch run's own
journal as an online row (``batch_id`` null), once: what is recorded is never sent again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from batcher.batch.submit import BatchRun
from batcher.records import Reject, Request, Result, record_key
from batcher.runner.progress import Progress
from batcher.runner.wiring import build_pricer, endpoint_targets, engine_settings, open_endpoints

#: Requests handed to the engine at a time.
BATCH_SIZE = 256


def pending(run: BatchRun, requests: dict[str, Request]) -> list[Request]:
    """The requests collected chunks handed to the online engine that the journal does not
    record (as their line is now): what a run killed while sending them left to do."""
    keys: dict[str, None] = {}
    for state in run.states.states.values():
        if state.status == "collected":
            keys.update(dict.fromkeys(state.online))
    out = []
    for key in keys:
        request = requests.get(key)
        if request is not None and run.recorded.get(key) != request.body_hash:
            out.append(request)
    return out


class _Journaled:
    """The engine's result sink: the batch run's journal, keeping ``run.recorded`` in step."""

    def __init__(self, run: BatchRun) -> None:
        self._run = run

    def append(self, result: Result, body_hash: str, *, provisional: bool = False) -> None:
        """Record ``result`` in the journal (see ``Journal.append``)."""
        self._run.journal.append(result, body_hash, provisional=provisional)
        if not provisional:
            self._run.recorded[record_key(result.custom_id, result.variant)] = body_hash


class _NoRejects:
    """The engine's reject sink: every request given was read and checked already."""

    def write(self, reject: Reject) -> None:
        """Never called with requests already checked."""


def _batches(requests: list[Request]) -> Iterator[list[Request | Reject]]:
    for start in range(0, len(requests), BATCH_SIZE):
        yield list(requests[start : start + BATCH_SIZE])


async def send_online(run: BatchRun) -> None:
    """Send ``run.online`` (those not recorded since) through the online engine, recorded
    in the run's journal and counted in its stats; then the list is empty."""
    from batcher.engine.control import Sinks
    from batcher.engine.dispatch import Engine

    todo = [r for r in run.online if run.recorded.get(r.key) != r.body_hash]
    todo = list({r.key: r for r in todo}.values())  # each request once
    run.online.clear()
    if not todo:
        return
    job = run.job
    run.say(f"{len(todo):,} requests the batches did not answer go online")
    targets = endpoint_targets(job, [run.base_url], [run.api_key], known=None)
    async with contextlib.AsyncExitStack() as clients:
        endpoints = await open_endpoints(job, targets, clients, transport=run.transport)
        progress = Progress(run.stats, total=len(todo), enabled=False, stream=run.stream)
        sinks = Sinks(
            results=_Journaled(run), rejects=_NoRejects(), stats=run.stats, progress=progress
        )
        engine = Engine(
            endpoints,
            engine_settings(job),
            sinks,
            pricer=build_pricer(job),  # the online price: these are online requests
            budget=run.budget,
        )
        try:
            await engine.run(_batches(todo))
        finally:
            progress.close()
            run.journal.sync()
