"""The batch parts together against the simulator on a loopback socket: chunks uploaded,
journaled and created, a crash between create and journal survived by adoption, answers read
back equal to the simulator's online answers, every id once."""

from __future__ import annotations

from pathlib import Path

import pytest

from batcher.batch.chunks import Chunk, plan_chunks
from batcher.batch.client import BatchClient
from batcher.batch.results import BatchAnswer, adopt, read_back
from batcher.batch.state import StateJournal, read_states
from batcher.config import RetryConfig
from batcher.records import Request
from batcher.sim.answers import expected_content
from batcher.sim.batches import BatchSimConfig
from tests.batch_sim import KEY, batch_sim

pytestmark = pytest.mark.anyio
JOB = "nightly"
CONFIG = BatchSimConfig(validating_s=5, in_progress_s=50, finalizing_s=5)


def requests(n: int) -> list[Request]:
    models = ("gpt-4o-mini", "gpt-4o")
    return [
        Request(
            custom_id=f"r{i:03d}",
            line=i + 1,
            body={
                "model": models[i % 2],
                "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": 16,
            },
        )
        for i in range(n)
    ]


async def submit(
    api: BatchClient, journal: StateJournal, chunk: Chunk, folder: Path, *, crash: bool = False
) -> None:
    """Upload and create ``chunk``'s batch, journaling each step (``crash``: the process dies
    after the create, before journaling it)."""
    state = journal.states.get(chunk.key)
    if state is None or state.file_id is None:
        file_id = await api.upload(chunk.write(folder / f"{chunk.key}.jsonl"))
        state = journal.record(chunk.key, status="uploaded", file_id=file_id)
    assert state.file_id is not None
    batch = await api.create(state.file_id, metadata=chunk.metadata(JOB))
    if crash:
        return
    journal.record(chunk.key, status=batch.status, batch_id=batch.id)


async def collect(api: BatchClient, chunk: Chunk, batch_id: str) -> dict[str, BatchAnswer]:
    batch = await api.retrieve(batch_id)
    assert batch.status == "completed"
    files = [await api.download(f) for f in (batch.output_file_id, batch.error_file_id) if f]
    got = read_back(chunk, batch, files)
    assert got.strays == [] and got.missing == []
    return got.answers


@pytest.mark.slow
async def test_several_models_and_chunks_every_id_once_after_a_crash(tmp_path: Path) -> None:
    plan = plan_chunks(requests(25), job=JOB, max_requests=5, max_bytes=10**6)
    assert len(plan.chunks) == 6  # 13 + 12 requests, at most 5 a chunk
    state_file = tmp_path / "out.batches.jsonl"
    retry = RetryConfig(max_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.01)
    with batch_sim(CONFIG) as sim:
        async with BatchClient(sim.base_url, api_key=KEY, retry=retry) as api:
            # first process: submits every chunk, and dies after creating the fourth's batch
            with StateJournal(state_file) as journal:
                for index, chunk in enumerate(plan.chunks[:4]):
                    await submit(api, journal, chunk, tmp_path, crash=index == 3)
            assert sim.stats()["batches"]["created"] == 4

            # second process: the journal knows three batches; adoption finds the fourth
            states = read_states(state_file)
            unknown = [
                c for c in plan.chunks if c.key not in states or states[c.key].batch_id is None
            ]
            assert [c.key for c in unknown] == [c.key for c in plan.chunks[3:]]
            found = adopt(unknown, await api.list_all(), job=JOB)
            assert list(found) == [plan.chunks[3].key]
            with StateJournal(state_file) as journal:
                for key, batch in found.items():
                    journal.record(key, status=batch.status, batch_id=batch.id)
                for chunk in unknown:
                    if chunk.key not in found:
                        await submit(api, journal, chunk, tmp_path)
            assert sim.stats()["batches"]["created"] == len(plan.chunks)

            sim.clock.advance(60)
            states = read_states(state_file)
            answers: dict[str, BatchAnswer] = {}
            for chunk in plan.chunks:
                batch_id = states[chunk.key].batch_id
                assert batch_id is not None
                for custom_id, answer in (await collect(api, chunk, batch_id)).items():
                    assert custom_id not in answers
                    answers[custom_id] = answer
    assert sorted(answers) == [f"r{i:03d}" for i in range(25)]
    by_id = {r.custom_id: r for r in requests(25)}
    batch_of = {states[c.key].batch_id: c for c in plan.chunks}
    for custom_id, answer in answers.items():
        result = answer.result
        assert result.status == "ok"
        content = result.body["choices"][0]["message"]["content"]
        assert content == expected_content(by_id[custom_id].body)
        assert result.usage is not None and result.usage.total_tokens
        assert custom_id in {r.custom_id for r in batch_of[answer.batch_id].requests}


async def test_an_expired_batch_reads_back_its_answers_and_what_to_resubmit(
    tmp_path: Path,
) -> None:
    config = BatchSimConfig(validating_s=0, in_progress_s=100, finalizing_s=0, window_s=40)
    plan = plan_chunks(requests(10)[::2], job=JOB, max_requests=100, max_bytes=10**6)
    [chunk] = plan.chunks
    with batch_sim(config) as sim:
        async with BatchClient(sim.base_url, api_key=KEY) as api:
            file_id = await api.upload(chunk.write(tmp_path / "c.jsonl"))
            batch = await api.create(file_id, metadata=chunk.metadata(JOB))
            sim.clock.advance(1000)
            ended = await api.retrieve(batch.id)
            ids = [f for f in (ended.output_file_id, ended.error_file_id) if f is not None]
            files = [await api.download(f) for f in ids]
    assert ended.status == "expired"
    got = read_back(chunk, ended, files)
    kept = sorted(cid for cid, a in got.answers.items() if a.result.status == "ok")
    again = sorted(cid for cid, a in got.answers.items() if not a.answered)
    assert kept == ["r000", "r002"]  # 2 of 5 done when 40 of 100 seconds had passed
    assert again == ["r004", "r006", "r008"]
    assert all(got.answers[cid].retryable for cid in again)
    assert ended.request_counts.completed == 2 and ended.request_counts.failed == 3
