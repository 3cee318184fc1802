"""Batch-mode reruns over a loopback socket against the simulator: a rerun follows the chunks
the state journal holds (whatever the output's spelling or the chunking settings say by
then), never loses a request its journal forgot, records an answer against the body it was
asked with, reserves running batches under ``--max-cost``; ``--restart`` and ``--cancel``
with batches about; ``batcher.run`` in batch mode."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import batcher
from batcher.batch.runner import run_batch_job
from batcher.batch.state import read_states, state_path
from batcher.config import JobConfig
from batcher.cost.budget import Budget
from batcher.errors import ConfigError
from batcher.output.journal import Journal, journal_path
from batcher.runner.wiring import build_pricer
from batcher.sim.answers import expected_content
from batcher.sim.batches import BatchSimConfig
from tests.batch.batch_job import batch_job, clock_sleep, rows, text, write_input
from tests.batch_sim import KEY, BatchSim, batch_sim
from tests.helpers import requests_of

# Batch runs end to end, each waiting on simulated batch stages (about a second): the slow set.
pytestmark = pytest.mark.slow

FAST = BatchSimConfig(validating_s=5, in_progress_s=20, finalizing_s=5)
IDS8 = [f"r{i:03d}" for i in range(8)]


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def created(sim: BatchSim) -> int:
    return int(sim.stats()["batches"]["created"])


def detached(sim: BatchSim, job: JobConfig) -> None:
    report = run_batch_job(job, detach=True, stream=text())
    assert report.exit_code == 3, report.summary


def test_collect_with_the_output_spelled_relative_creates_no_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 8)
        detached(sim, job)
        assert created(sim) == 2
        monkeypatch.chdir(tmp_path)
        relative = dataclasses.replace(job, output=Path("out.parquet"))
        report = run_batch_job(relative, sleep=clock_sleep(sim), stream=text())
        assert report.exit_code == 0, report.summary
        assert created(sim) == 2
    assert sorted(r["custom_id"] for r in rows(tmp_path / "out.parquet")) == IDS8


def test_collect_with_other_chunking_settings_creates_no_batch(tmp_path: Path) -> None:
    with batch_sim(FAST) as sim:
        detached(sim, batch_job(sim, tmp_path, 8, max_requests=4))
        assert created(sim) == 2
        job = batch_job(sim, tmp_path, 8, max_requests=3)
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        assert report.exit_code == 0, report.summary
        assert created(sim) == 2
    got = rows(tmp_path / "out.parquet")
    assert sorted(r["custom_id"] for r in got) == IDS8
    assert len({r["batch_id"] for r in got}) == 2


def test_a_collected_chunk_whose_records_are_gone_is_sent_again(tmp_path: Path) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 8)
        assert run_batch_job(job, sleep=clock_sleep(sim), stream=text()).exit_code == 0
        journal_path(tmp_path / "out.parquet").write_bytes(b"")  # its records lost
        assert all(
            s.status == "collected"
            for s in read_states(state_path(tmp_path / "out.parquet")).values()
        )
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        assert report.exit_code == 0, report.summary
        assert created(sim) == 4
    assert sorted(r["custom_id"] for r in rows(tmp_path / "out.parquet")) == IDS8


def test_restart_removes_the_batch_state_and_is_refused_while_batches_run(
    tmp_path: Path,
) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 8)
        detached(sim, job)
        states = state_path(tmp_path / "out.parquet")
        before = states.read_bytes()
        with pytest.raises(ConfigError, match=r"--restart.*--cancel"):
            run_batch_job(job, restart=True, stream=text())
        with pytest.raises(ConfigError, match="--restart"):  # an online restart alike
            Journal(journal_path(tmp_path / "out.parquet"), restart=True)
        assert states.read_bytes() == before
        with Journal(
            journal_path(tmp_path / "out.parquet")
        ):  # the refusal let go of the journal's lock
            pass
        assert run_batch_job(job, sleep=clock_sleep(sim), stream=text()).exit_code == 0
        with Journal(journal_path(tmp_path / "out.parquet"), restart=True):  # every batch collected
            pass
        assert not states.exists()
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        assert report.exit_code == 0 and created(sim) == 4
    assert sorted(r["custom_id"] for r in rows(tmp_path / "out.parquet")) == IDS8


def test_cancel_goes_on_past_a_batch_that_has_ended(tmp_path: Path) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 8)
        detached(sim, job)
        first, second = (
            s.batch_id for s in read_states(state_path(tmp_path / "out.parquet")).values()
        )
        with sim.http() as http:  # the first ends behind the journal's back
            assert http.post(f"/batches/{first}/cancel").status_code == 200
            sim.clock.advance(2)  # past its cancelling (1 s); the second still validating
            assert http.get(f"/batches/{first}").json()["status"] == "cancelled"
        out = text()
        report = run_batch_job(job, cancel=True, stream=out)
        assert report.exit_code == 3, out.getvalue()
        with sim.http() as http:
            assert http.get(f"/batches/{second}").json()["status"] in ("cancelling", "cancelled")
    states = {
        s.batch_id: s.status for s in read_states(state_path(tmp_path / "out.parquet")).values()
    }
    assert states[first] == "cancelled"
    assert states[second] in ("cancelling", "cancelled")


def test_an_answer_is_recorded_against_the_prompt_it_answers(tmp_path: Path) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 8)
        detached(sim, job)
        lines = Path(str(job.input)).read_text().splitlines()
        changed = json.loads(lines[1])
        changed["messages"][0]["content"] = "a question asked since"
        lines[1] = json.dumps(changed)
        Path(str(job.input)).write_text("\n".join(lines) + "\n")
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        assert report.exit_code == 0, report.summary
        assert created(sim) == 3  # the changed line went in a batch of its own
    got = {r["custom_id"]: r for r in rows(tmp_path / "out.parquet")}
    assert sorted(got) == IDS8
    body = {"model": "sim-b", "messages": changed["messages"], "max_tokens": 16}
    assert got["r001"]["content"] == expected_content(body)


def test_running_batches_are_reserved_under_max_cost_on_a_rerun(tmp_path: Path) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 8, models=("sim-a",))
        detached(sim, job)  # two batches of 4, no cap
        write_input(Path(str(job.input)), 12, ("sim-a",))  # the same 8, and 4 more
        pricer = build_pricer(job, batch=True)
        requests = requests_of(Path(str(job.input)), dict(job.request))
        budget = Budget(1.0)
        worst = [budget.reserve_for(r, pricer.price("sim-a"), None) for r in requests.values()]
        cap = 0.9 * sum(float(w) for w in worst)  # the third chunk alone fits, all three not
        capped = dataclasses.replace(job, limits=dataclasses.replace(job.limits, max_cost_usd=cap))
        report = run_batch_job(capped, sleep=clock_sleep(sim), stream=text())
        assert report.exit_code == 3 and "--max-cost" in report.summary
        assert created(sim) == 2
    assert sorted(r["custom_id"] for r in rows(tmp_path / "out.parquet")) == IDS8


@pytest.mark.parametrize("flag", ["detach", "cancel"])
def test_batcher_run_detached_or_cancelling_returns_no_table(tmp_path: Path, flag: str) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 8)
        if flag == "cancel":
            detached(sim, job)
        if flag == "detach":
            result = batcher.run(job, mode="batch", detach=True)
        else:
            result = batcher.run(job, mode="batch", cancel=True)
        assert result.report.exit_code == 3
        assert result.table is None
        assert created(sim) == 2


def test_a_batch_job_refused_because_its_output_is_gone_leaves_the_status_file(
    tmp_path: Path,
) -> None:
    from batcher.runner.status_file import read_status_file

    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 8)
        first = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        assert first.exit_code == 0, first.summary
        before = read_status_file(first.output)
        assert before is not None and before["state"] == "finished"
        first.output.unlink()
        with pytest.raises(ConfigError, match="is gone"):
            run_batch_job(job, sleep=clock_sleep(sim), stream=text())
    assert read_status_file(first.output) == before


def test_cancel_with_no_batch_running_is_refused_and_leaves_the_finished_job_as_it_was(
    tmp_path: Path,
) -> None:
    """A finished job's ``--cancel`` was exit 3 with "cancelled 0 batch(es); run again to
    collect", and its status file then said stopped, to be resumed."""
    from batcher.runner.status_file import read_status_file

    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 8)
        with pytest.raises(ConfigError, match=r"no batch of out\.parquet is running") as never:
            run_batch_job(job, cancel=True, stream=text())  # nothing submitted yet
        assert never.value.field == "--cancel" and created(sim) == 0
        first = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        assert first.exit_code == 0, first.summary
        before = read_status_file(first.output)
        with pytest.raises(ConfigError, match="nothing to cancel"):
            run_batch_job(job, cancel=True, stream=text())
        assert created(sim) == 2
    assert read_status_file(first.output) == before
