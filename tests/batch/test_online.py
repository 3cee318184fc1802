"""``[batch] unanswered = "online"``: what a batch did not run is sent through the online
engine in the same run, over a loopback socket against the simulator."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from batcher.batch.runner import run_batch_job
from batcher.batch.state import read_states, state_path
from batcher.output.journal import journal_path
from batcher.sim.batches import BatchSimConfig
from tests.batch.batch_job import PRICES, batch_job, clock_sleep, rows, text
from tests.batch_sim import KEY, BatchSim, batch_sim
from tests.helpers import keep_full_journal

pytestmark = pytest.mark.slow

FAST = BatchSimConfig(validating_s=5, in_progress_s=20, finalizing_s=5)
#: 4 requests over 40 s (one every 10 s after 5 s of validation), a 25 s window: the first
#: two are answered, the last two expire.
EXPIRING = BatchSimConfig(validating_s=5, in_progress_s=40, finalizing_s=5, window_s=25)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def _chat_requests(sim: BatchSim) -> int:
    count: int = sim.stats()["requests_received"]
    return count


def _journaled(folder: Path) -> list[str]:
    """The ids the journal records, one per record line."""
    lines = journal_path(folder / "out.parquet").read_text().splitlines()
    return [json.loads(line)["custom_id"] for line in lines if '"custom_id"' in line]


def _full_price(row: dict[str, Any]) -> float:
    price = PRICES[row["model"]]
    tokens = row["prompt_tokens"] * price["input"] + row["completion_tokens"] * price["output"]
    return float(tokens) / 1e6


def test_an_expired_batch_s_unanswered_requests_go_online(tmp_path: Path) -> None:
    with batch_sim(EXPIRING) as sim:
        job = batch_job(sim, tmp_path, 4, models=("sim-a",), max_requests=4, unanswered="online")
        before = _chat_requests(sim)
        out = text()
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=out)
        created = sim.stats()["batches"]["created"]
        chat = _chat_requests(sim) - before
    assert report.exit_code == 0, out.getvalue()
    got = rows(tmp_path / "out.parquet")
    assert sorted(r["custom_id"] for r in got) == ["r000", "r001", "r002", "r003"]
    by_id = {r["custom_id"]: r for r in got}
    assert created == 1  # no new round
    assert chat == 2  # exactly the two the batch did not run
    for key in ("r000", "r001"):
        assert by_id[key]["batch_id"].startswith("batch_")
        assert by_id[key]["cost_usd"] == pytest.approx(_full_price(by_id[key]) / 2)
    for key in ("r002", "r003"):
        assert by_id[key]["status"] == "ok" and by_id[key]["batch_id"] is None
        assert by_id[key]["cost_usd"] == pytest.approx(_full_price(by_id[key]))
    assert report.stats.ok == 4
    # each id recorded once in the journal
    assert sorted(_journaled(tmp_path)) == ["r000", "r001", "r002", "r003"]
    (state,) = read_states(state_path(tmp_path / "out.parquet")).values()
    assert state.status == "collected" and sorted(state.online) == ["r002", "r003"]
    assert "2 requests it did not run go online" in out.getvalue()


def test_a_cancelled_batch_s_unrun_requests_go_online(tmp_path: Path) -> None:
    with batch_sim(FAST) as sim:
        job = batch_job(sim, tmp_path, 8, unanswered="online")
        run_batch_job(job, detach=True, stream=text())
        sim.clock.advance(15)  # validated, half of each batch answered
        assert run_batch_job(job, cancel=True, stream=text()).exit_code == 3
        sim.clock.advance(5)
        before = _chat_requests(sim)
        out = text()
        final = run_batch_job(job, sleep=clock_sleep(sim), stream=out)
        created = sim.stats()["batches"]["created"]
        chat = _chat_requests(sim) - before
    assert final.exit_code == 0, out.getvalue()
    got = rows(tmp_path / "out.parquet")
    assert sorted(r["custom_id"] for r in got) == [f"r{i:03d}" for i in range(8)]
    assert created == 2  # the two cancelled batches, no new round
    online = [r for r in got if r["batch_id"] is None]
    assert chat == len(online) > 0
    assert all(r["status"] == "ok" for r in got)
    for r in got:
        full = _full_price(r)
        assert r["cost_usd"] == pytest.approx(full if r["batch_id"] is None else full / 2)


def test_a_rerun_sends_online_only_what_is_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep_full_journal(monkeypatch)  # as a run killed before its end left it
    with batch_sim(EXPIRING) as sim:
        job = batch_job(sim, tmp_path, 4, models=("sim-a",), max_requests=4, unanswered="online")
        run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        # a run killed after recording one of the two online answers
        journal = journal_path(tmp_path / "out.parquet")
        lines = journal.read_text().splitlines(keepends=True)
        journal.write_text("".join(lines[:4]))  # the header and 3 records
        (tmp_path / "out.parquet").unlink()
        before = _chat_requests(sim)
        report = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        created = sim.stats()["batches"]["created"]
        chat = _chat_requests(sim) - before
    assert report.exit_code == 0
    got = rows(tmp_path / "out.parquet")
    assert sorted(r["custom_id"] for r in got) == ["r000", "r001", "r002", "r003"]
    assert created == 1 and chat == 1  # the missing one online again, none in a batch
    assert sum(r["batch_id"] is None for r in got) == 2
    assert sorted(_journaled(tmp_path)) == ["r000", "r001", "r002", "r003"]


def test_online_requests_stay_under_the_max_cost_budget(tmp_path: Path) -> None:
    with batch_sim(EXPIRING) as sim:
        job = batch_job(sim, tmp_path, 4, models=("sim-a",), max_requests=4, unanswered="online")
        # the chunk's worst case at the batch price fits; the two unrun requests' worst case
        # at the online price (twice the batch's) on top of what the batch spent does not
        cap = dataclasses.replace(job.limits, max_cost_usd=1e-4)
        out = text()
        report = run_batch_job(
            dataclasses.replace(job, limits=cap), sleep=clock_sleep(sim), stream=out
        )
        assert report.exit_code == 3, out.getvalue()
        assert "--max-cost" in report.summary
        assert sim.stats()["batches"]["created"] == 1
        assert _chat_requests(sim) < 2
        got = rows(tmp_path / "out.parquet")
        assert len(got) < 4 and sum(r["cost_usd"] for r in got) <= 1e-4
        # without the cap, a rerun sends the rest online, none in a batch
        final = run_batch_job(job, sleep=clock_sleep(sim), stream=text())
        created = sim.stats()["batches"]["created"]
        chat = _chat_requests(sim)
    assert final.exit_code == 0
    got = rows(tmp_path / "out.parquet")
    assert sorted(r["custom_id"] for r in got) == ["r000", "r001", "r002", "r003"]
    assert created == 1 and chat == 2
    assert sorted(_journaled(tmp_path)) == ["r000", "r001", "r002", "r003"]
