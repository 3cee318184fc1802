"""Batch mode end to end over a loopback socket against the simulator's Batches API."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher.batch import submit as submit_module
from batcher.batch.client import NotVisibleError
from batcher.batch.runner import run_batch_job
from batcher.batch.state import read_states, state_path
from batcher.config import VariantConfig
from batcher.output.provenance import read_provenance
from batcher.sim.answers import expected_content
from batcher.sim.batches import BatchSimConfig
from tests.batch.batch_job import PRICES, batch_job, clock_sleep, rows, text
from tests.batch_sim import KEY, OTHER_KEY, batch_sim

# Batch runs end to end, each waiting on simulated batch stages (about a second): the slow set.
pytestmark = pytest.mark.slow

FAST = BatchSimConfig(validating_s=5, in_progress_s=20, finalizing_s=5)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


@pytest.mark.slow
def test_several_models_and_chunks_every_id_once_at_half_price(tmp_path: Path) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 22)
        out = text()
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=out)
        created = sim.stats()["batches"]["created"]
        chat_requests = sim.stats()["requests_received"]
    assert report.exit_code == 0, out.getvalue()
    assert chat_requests == 0  # batch mode sends no online request, not even a probe
    got = rows(tmp_path / "out.parquet")
    assert sorted(r["custom_id"] for r in got) == [f"r{i:03d}" for i in range(22)]
    assert created == 6  # 11 requests of each model, at most 4 a batch: 3 + 3
    assert all(r["status"] == "ok" and r["batch_id"].startswith("batch_") for r in got)
    assert len({r["batch_id"] for r in got}) == 6
    for r in got:
        price = PRICES[r["model"]]
        full = (
            r["prompt_tokens"] * price["input"] + r["completion_tokens"] * price["output"]
        ) / 1e6
        assert r["cost_usd"] == pytest.approx(full / 2)
        question = f"question {int(r['custom_id'][1:])}"
        assert r["content"] == expected_content(
            {"model": r["model"], "messages": [{"role": "user", "content": question}],
             "max_tokens": 16}
        )  # fmt: skip
    assert "completed" in out.getvalue()  # per-batch progress lines


def test_the_output_has_the_typed_columns(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    asked = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 4, models=("sim-a",))
        job = dataclasses.replace(job, request={**job.request, "response_format": asked})
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
    assert report.exit_code == 0
    got = pq.read_table(tmp_path / "out.parquet")
    assert got.schema.field("parsed").type == pa.struct([("n", pa.int64())])
    for r in got.to_pylist():
        assert r["parsed"] == json.loads(r["content"])
        question = f"question {int(r['custom_id'][1:])}"
        assert r["messages"] == [{"role": "user", "content": question}]


def test_expired_batch_keeps_its_answers_and_resubmits_the_rest(tmp_path: Path) -> None:
    # 4 requests over 40 s (one every 10 s after 5 s of validation), a 25 s window: the first
    # two are answered, the last two expire; their new batch runs without a window
    config = BatchSimConfig(validating_s=5, in_progress_s=40, finalizing_s=5, window_s=25)
    with batch_sim(config) as sim:
        job = batch_job(sim, tmp_path, 4, models=("sim-a",), max_requests=4)

        async def sleep(seconds: float) -> None:
            sim.clock.advance(seconds)
            sim.handle.simulator.batches.config = FAST  # for the batches created from now on

        out = text()
        report = run_batch_job(job, sleep=sleep, stream=out)
        created = sim.stats()["batches"]["created"]
    assert report.exit_code == 0, out.getvalue()
    got = {r["custom_id"]: r for r in rows(tmp_path / "out.parquet")}
    assert sorted(got) == ["r000", "r001", "r002", "r003"]
    assert created == 2
    assert got["r000"]["batch_id"] == got["r001"]["batch_id"]
    assert got["r002"]["batch_id"] == got["r003"]["batch_id"] != got["r000"]["batch_id"]
    assert {r["attempts"] for r in got.values()} == {1}  # an expired request used no attempt
    assert "expired" in out.getvalue() and "2 requests go into a new batch" in out.getvalue()


@pytest.mark.slow
def test_per_request_errors_retried_then_final(tmp_path: Path) -> None:
    config = dataclasses.replace(FAST, error_rate=1.0, error_kinds=("500",))
    with batch_sim(config) as sim:
        job = batch_job(sim, tmp_path, 4, max_requests=10)
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        created = sim.stats()["batches"]["created"]
    got = rows(tmp_path / "out.parquet")
    assert report.exit_code == 1
    assert len(got) == 4 and all(r["status"] == "error" for r in got)
    assert {r["attempts"] for r in got} == {3}  # retry.max_attempts
    assert {r["status_code"] for r in got} == {500}
    assert created == 2 * 3  # two models, three rounds each
    made = read_provenance(tmp_path / "out.parquet")  # how the run ended, for the report
    assert (made["state"], made["exit_code"]) == ("finished", "1")
    assert made["started_at"] <= made["ended_at"]
    assert "rate_limited" not in made  # not counted by time in batch mode: not "none"


def test_final_request_errors_are_not_retried(tmp_path: Path) -> None:
    config = dataclasses.replace(FAST, error_rate=1.0, error_kinds=("400",))
    with batch_sim(config) as sim:
        job = batch_job(sim, tmp_path, 4, max_requests=10)
        run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        created = sim.stats()["batches"]["created"]
    got = rows(tmp_path / "out.parquet")
    assert created == 2
    assert {(r["status"], r["attempts"], r["status_code"]) for r in got} == {("error", 1, 400)}


def test_failed_validation_names_the_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = submit_module.write_input

    def broken_third_line(path: Path, lines: Iterable[bytes]) -> Path:
        kept = list(lines)
        kept[2] = b"{not json\n"  # a file the server refuses at its third line
        return real(path, kept)

    monkeypatch.setattr(submit_module, "write_input", broken_third_line)
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 3, models=("sim-a",), output="out.jsonl")
        out = text()
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=out)
        created = sim.stats()["batches"]["created"]
    assert report.exit_code == 1
    assert created == 1  # a refused file is not submitted again
    got = {r["custom_id"]: r for r in rows_jsonl(tmp_path / "out.jsonl")}
    assert {r["error"]["code"] for r in got.values()} == {"batch_failed"}
    assert "line 3 of the batch's input file" in got["r002"]["error"]["message"]
    assert "this request was not run" in got["r000"]["error"]["message"]
    assert "failed validation: line 3" in out.getvalue() and "'r002'" in out.getvalue()


def rows_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_404_batch_id_stops_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 4)
        report = run_batch_job(job, detach=True, stream=text())
        assert report.exit_code == 3
        monkeypatch.setenv("OPENAI_API_KEY", OTHER_KEY)
        with pytest.raises(NotVisibleError) as raised:
            run_batch_job(job, sleep=clock_sleep(sim), stream=text())
    assert raised.value.exit_code == 2
    assert "different key or project" in str(raised.value)
    assert OTHER_KEY not in str(raised.value)


def test_upload_fails_twice_then_succeeds(tmp_path: Path) -> None:
    with batch_sim(dataclasses.replace(FAST, fail_uploads=2)) as sim:
        job = batch_job(sim, tmp_path, 4, max_requests=10)
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        stats = sim.stats()["batches"]
    assert report.exit_code == 0
    assert stats["uploads_failed"] == 2 and stats["created"] == 2
    assert len(rows(tmp_path / "out.parquet")) == 4


@pytest.mark.slow
def test_detach_then_collect_creates_each_batch_once(tmp_path: Path) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 10)
        out = text()
        first = run_batch_job(job, detach=True, stream=out)
        assert first.exit_code == 3
        assert "without --detach" in out.getvalue()
        assert not (tmp_path / "out.parquet").exists()
        second = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        created = sim.stats()["batches"]["created"]
    states = read_states(state_path(tmp_path / "out.parquet"))
    assert second.exit_code == 0
    assert created == len(states) == 4  # 5 + 5 requests, at most 4 a batch
    got = rows(tmp_path / "out.parquet")
    assert sorted(r["custom_id"] for r in got) == [f"r{i:03d}" for i in range(10)]


@pytest.mark.slow
def test_cancel_cancels_the_batches_and_a_rerun_collects_the_rest(tmp_path: Path) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 8)
        run_batch_job(job, detach=True, stream=text())
        sim.clock.advance(15)  # validated, half of each batch answered
        out = text()
        report = run_batch_job(job, cancel=True, stream=out)
        assert report.exit_code == 3
        assert "cancelled 2 batch(es)" in report.summary  # 4 + 4 requests, 4 a batch
        assert not (tmp_path / "out.parquet").exists()
        sim.clock.advance(5)
        with sim.http() as http:
            statuses = {b["status"] for b in http.get("/batches").json()["data"]}
        assert statuses == {"cancelled"}
        final = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        created = sim.stats()["batches"]["created"]
    got = rows(tmp_path / "out.parquet")
    assert final.exit_code == 0
    assert sorted(r["custom_id"] for r in got) == [f"r{i:03d}" for i in range(8)]
    assert created == 4  # what the cancelled batches had not run went into new ones


def test_a_batch_over_the_enqueued_token_limit_waits_then_goes(tmp_path: Path) -> None:
    # one chunk's prompts fit the queue, two do not: the second waits for the first to end
    with batch_sim(dataclasses.replace(FAST, enqueued_token_limit=60)) as sim:
        job = batch_job(sim, tmp_path, 8, models=("sim-a",), max_requests=4)
        out = text()
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=out)
        created = sim.stats()["batches"]["created"]
    assert report.exit_code == 0, out.getvalue()
    assert "over the enqueued-token limit" in out.getvalue()
    assert created == 3  # the refused batch created again once
    got = rows(tmp_path / "out.parquet")
    assert sorted(r["custom_id"] for r in got) == [f"r{i:03d}" for i in range(8)]
    assert len({r["batch_id"] for r in got}) == 2


def test_a_chunk_alone_over_the_token_limit_fails_clearly(tmp_path: Path) -> None:
    with batch_sim(dataclasses.replace(FAST, enqueued_token_limit=5)) as sim:
        job = batch_job(sim, tmp_path, 2, models=("sim-a",), max_requests=4)
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        created = sim.stats()["batches"]["created"]
    assert report.exit_code == 1 and created == 2
    got = rows(tmp_path / "out.parquet")
    assert all("lower batch.max_requests" in r["error_message"] for r in got)


def test_max_cost_reserves_each_chunk_before_it_is_submitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 8)
        capped = dataclasses.replace(job, limits=dataclasses.replace(job.limits, max_cost_usd=1e-5))
        report = run_batch_job(capped, sleep=clock_sleep(sim), stream=text())
        assert report.exit_code == 3 and sim.stats()["batches"]["created"] == 0
        assert "--max-cost" in report.summary
        # worst case of sim-a's 4 requests at the batch price (~$0.00005) fits; sim-b's not
        capped = dataclasses.replace(job, limits=dataclasses.replace(job.limits, max_cost_usd=1e-4))
        report = run_batch_job(capped, sleep=clock_sleep(sim), stream=text())
        assert report.exit_code == 3 and sim.stats()["batches"]["created"] == 1
        got = rows(tmp_path / "out.parquet")
        assert sorted(r["custom_id"] for r in got) == ["r000", "r002", "r004", "r006"]
        assert sum(r["cost_usd"] for r in got) <= 1e-4


def test_a_job_with_variants_records_each_id_once_per_variant(tmp_path: Path) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 3, models=("sim-a",), output="out.jsonl")
        variants = (VariantConfig(name="cold", request={"temperature": 0}),
                    VariantConfig(name="warm", request={"temperature": 1}))  # fmt: skip
        job = dataclasses.replace(job, variants=variants)
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        created = sim.stats()["batches"]["created"]
    assert report.exit_code == 0
    got = rows_jsonl(tmp_path / "out.jsonl")
    pairs = [(r["batcher"]["line_id"], r["batcher"]["variant"]) for r in got]
    assert pairs == [(f"r{i:03d}", v) for i in range(3) for v in ("cold", "warm")]  # in order
    assert [r["custom_id"] for r in got] == [f"{i}:{v}" for i, v in pairs]  # unique in the file
    assert created == 2  # 6 requests of one model, at most 4 a batch
    assert all(r["batcher"]["batch_id"].startswith("batch_") for r in got)
