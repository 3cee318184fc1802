"""Rate limits end to end: small limits on the simulator, account errors that stop the run."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import pytest

from batcher.config import JobConfig
from batcher.cost import budget
from batcher.cost.tokens import release_encodings
from batcher.input import reader, requests
from batcher.job_file import job_from_dict
from batcher.output.writers import read_results
from batcher.runner.run import run_job
from batcher.sim.app import Simulator
from batcher.sim.config import SimConfig
from tests.helpers import write_input


def job(tmp_path: Path, src: Path, **tables: dict[str, object]) -> JobConfig:
    raw: dict[str, dict[str, object]] = {
        "job": {"input": str(src), "output": str(tmp_path / "o.jsonl"), "progress": False},
        "endpoint": {"base_url": "http://sim.test/v1"},
        "request": {"model": "gpt-4o-mini", "max_tokens": 20},
        "retry": {"max_attempts": 6, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
    }
    for name, table in tables.items():
        raw.setdefault(name, {}).update(table)
    return job_from_dict(raw)


@pytest.mark.slow
def test_told_nothing_the_limit_is_learned_from_headers(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 40)
    sim = Simulator(SimConfig(rpm=1200))  # 20 a second, a burst of 20
    report = run_job(
        job(tmp_path, src, limits={"concurrency": 8}),
        transport=httpx.ASGITransport(app=sim),
        stream=io.StringIO(),
    )
    assert report.stats.ok == 40
    assert sim.stats.rejected_429 == 0  # paced at the server's limit from the first answers


@pytest.mark.slow
def test_told_a_higher_limit_the_servers_lower_one_wins(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 40)
    sim = Simulator(SimConfig(rpm=1200, burst_s=0.5))  # a burst of only 10
    report = run_job(
        job(tmp_path, src, limits={"concurrency": 8, "rpm": 12_000}),
        transport=httpx.ASGITransport(app=sim),
        stream=io.StringIO(),
    )
    assert report.stats.ok == 40 and report.stats.error == 0
    assert sim.stats.rejected_429 <= 1


@pytest.mark.slow
def test_tpm_limit_with_mixed_prompt_lengths(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    lines = [
        f'{{"custom_id": "t{i}", "prompt": "{"word " * (5 + (i * 37) % 60)}"}}\n' for i in range(30)
    ]
    src.write_text("".join(lines))
    sim = Simulator(SimConfig(tpm=120_000))  # 2,000 tokens a second
    report = run_job(
        job(tmp_path, src, limits={"concurrency": 16, "tpm": 120_000}),
        transport=httpx.ASGITransport(app=sim),
        stream=io.StringIO(),
    )
    assert report.stats.ok == 30
    assert sim.stats.rejected_429 == 0  # the estimate matches what the server charges


def _mixed_prompts(path: Path, n: int) -> Path:
    lines = [
        f'{{"custom_id": "t{i}", "prompt": "{"word " * (5 + (i * 37) % 60)}"}}\n' for i in range(n)
    ]
    path.write_text("".join(lines))
    return path


@pytest.mark.slow
def test_a_token_limit_told_by_the_server_meters_counted_prompts(tmp_path: Path) -> None:
    # The job sets no TPM, so lines are read uncounted; the server's first answer announces
    # one, and from then on each prompt is counted before it is sent. Charged at their
    # completion budget alone (20), these would draw 429s.
    src = _mixed_prompts(tmp_path / "in.jsonl", 30)
    release_encodings()
    sim = Simulator(SimConfig(tpm=60_000))  # 1,000 tokens a second; the lines need ~1,900
    report = run_job(
        job(tmp_path, src, limits={"concurrency": 16}),
        transport=httpx.ASGITransport(app=sim),
        stream=io.StringIO(),
    )
    assert report.stats.ok == 30
    assert sim.stats.rejected_429 == 0


def test_once_the_server_tells_a_token_limit_the_reader_counts_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # More lines than the reader has read ahead when the first answer comes: those already
    # read are counted by the engine before sending, the rest by the reader as it reads them.
    calls = {"reader": 0, "engine": 0}
    # (the engine counts through requests.LateCounter)
    for name, module in (("reader", reader), ("engine", requests)):

        def counting(
            *args: Any, _name: str = name, _real: Any = module.estimate_prompt_tokens
        ) -> int:
            calls[_name] += 1
            return int(_real(*args))

        monkeypatch.setattr(module, "estimate_prompt_tokens", counting)
    src = _mixed_prompts(tmp_path / "in.jsonl", 800)
    sim = Simulator(SimConfig(tpm=100_000_000))  # announced, never reached
    report = run_job(
        job(tmp_path, src, limits={"concurrency": 16}),
        transport=httpx.ASGITransport(app=sim),
        stream=io.StringIO(),
    )
    assert report.stats.ok == 800
    assert calls["engine"] > 0 and calls["reader"] > 0
    assert calls["engine"] + calls["reader"] >= 799  # all but the first, sent before the limit


def test_without_a_token_limit_prompts_are_not_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (The in-process simulator counts with tiktoken itself, so the count calls are watched.)
    counted: list[object] = []

    def count(*args: object) -> int:
        counted.append(args)
        return 1

    for module in (reader, requests, budget):
        monkeypatch.setattr(module, "estimate_prompt_tokens", count)
    src = _mixed_prompts(tmp_path / "in.jsonl", 10)
    sim = Simulator(SimConfig(rpm=6000))  # request headers only
    report = run_job(
        job(tmp_path, src, limits={"concurrency": 4}),
        transport=httpx.ASGITransport(app=sim),
        stream=io.StringIO(),
    )
    assert report.stats.ok == 10
    assert counted == []
    rows = list(read_results(tmp_path / "o.jsonl"))
    assert all(row["prompt_tokens"] > 5 and row["cost_usd"] for row in rows)  # from usage
    # with a TPM limit in the job, every line is counted as it is read
    run_job(
        job(tmp_path, src, limits={"concurrency": 4, "tpm": 1_000_000}),
        restart=True,
        transport=httpx.ASGITransport(app=Simulator(SimConfig())),
        stream=io.StringIO(),
    )
    assert len(counted) == 10


@pytest.mark.parametrize(
    ("kind", "message"),
    [("401", "refused the API key"), ("quota", "no quota left")],
)
def test_account_errors_stop_the_run_and_the_rerun_sends_the_rest(
    tmp_path: Path, kind: str, message: str
) -> None:
    src = write_input(tmp_path / "in.jsonl", 50)
    broken = Simulator(SimConfig(error_rate=1.0, error_kinds=(kind,)))
    printed = io.StringIO()
    report = run_job(
        job(tmp_path, src, limits={"concurrency": 4}),
        transport=httpx.ASGITransport(app=broken),
        stream=printed,
    )
    assert report.exit_code == 3
    assert message in printed.getvalue()
    assert broken.stats.requests_received <= 4  # at most the requests in flight
    assert list(read_results(report.output)) == []  # none recorded: all are still to do

    fixed = Simulator(SimConfig())
    rerun = run_job(
        job(tmp_path, src, limits={"concurrency": 4}),
        transport=httpx.ASGITransport(app=fixed),
        stream=io.StringIO(),
    )
    assert rerun.exit_code == 0
    assert fixed.stats.requests_received == 50
    assert len(list(read_results(rerun.output))) == 50
