"""The input's passes for a local run: one ``Reader`` per pass (per variant), and the lanes the
engine reads them through, each routed among its variant's endpoints."""

from __future__ import annotations

import functools
from typing import IO

import anyio

from batcher.config import JobConfig, VariantConfig
from batcher.engine.dispatch import READ_BATCH, Lane
from batcher.engine.endpoints import Endpoint
from batcher.input.field_names import FieldNames
from batcher.input.reader import Reader
from batcher.input.tabular import reader_for
from batcher.runner.progress import Progress
from batcher.runner.wiring import Target

#: Lines in the first trip to the reading thread; each later trip reads twice as many, up to
#: ``READ_BATCH``. The pool then opens a few requests at a time: each few's connections are
#: made and their requests written while the next are read and started. Read 256 at once,
#: all 256 connections were opened before the first request was written, ~50 ms later at 256
#: in flight; the whole run ended ~60 ms later at 5,000 requests.
FIRST_READ_BATCH = 4


def open_readers(
    job: JobConfig,
    sources: list[IO[bytes]],
    variants: list[VariantConfig | None],
    targets: list[Target],
    progress: Progress,
    fields: FieldNames,
) -> list[Reader]:
    """One reader per pass over the input (per variant). Prompts are counted as they are
    read when the job needs it, or when an endpoint announced a token limit before."""
    token_limit_known = any(
        t.announced is not None and t.announced.tpm is not None for t in targets
    )
    return [
        reader_for(
            job,
            source,
            variant=variant,
            count_tokens=job.counts_tokens or token_limit_known,
            fields=fields,
            warn=functools.partial(note_from_thread, progress),
        )
        for source, variant in zip(sources, variants, strict=True)
    ]


def lanes(
    readers: list[Reader], variants: list[VariantConfig | None], endpoints: list[Endpoint]
) -> list[Lane]:
    """One lane per reader, routed among its variant's endpoints (all when it names none)."""
    by_name = {e.name: e for e in endpoints}
    return [
        Lane(
            batches=reader.batches(READ_BATCH, first=FIRST_READ_BATCH),
            endpoints=[by_name[n] for n in variant.endpoints]
            if variant is not None and variant.endpoints
            else None,
        )
        for reader, variant in zip(readers, variants, strict=True)
    ]


def note_from_thread(progress: Progress, message: str) -> None:
    """Show ``message`` from a reading thread: on the event loop, where the bar is drawn."""
    try:
        anyio.from_thread.run_sync(progress.note, message)
    except RuntimeError:  # not a worker thread of the run (a reader iterated directly)
        progress.note(message)


def count_from_now(readers: list[Reader]) -> None:
    """Every reader counts prompt tokens from now on (an endpoint announced a token limit)."""
    for reader in readers:
        reader.count_from_now()
