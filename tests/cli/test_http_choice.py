"""Choosing the HTTP client: ``--http`` and ``[endpoint] http``."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

import batcher
from batcher.batch.runner import run_batch_job
from batcher.cli.main import _job
from batcher.cli.parser import build_parser
from batcher.errors import ConfigError
from batcher.job_file import load_job
from batcher.sim.answers import expected_content
from batcher.sim.batches import BatchSimConfig
from tests.batch.batch_job import batch_job, clock_sleep
from tests.batch_sim import KEY, batch_sim
from tests.helpers import run_batcher, sim_process, sim_stats
from tests.loopback import chat_answer, read_body, serving

pytest.importorskip("pyreqwest")


def _lines(path: Path, n: int) -> list[dict[str, object]]:
    bodies: list[dict[str, object]] = [
        {"custom_id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(n)
    ]
    path.write_text("".join(json.dumps(b) + "\n" for b in bodies), encoding="utf-8")
    return bodies


def test_a_run_answers_every_line_the_same_over_each_client(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    _lines(src, 30)
    outputs = {}
    faults = ("--error-rate", "0.2", "--error-kinds", "500,429", "--fault-retry-after", "0.05")
    with sim_process(*faults, "--seed", "5") as url:
        for http in ("httptools", "aiohttp", "pyreqwest"):
            out = tmp_path / f"{http}.parquet"
            proc = run_batcher(
                "run", "-i", str(src), "-o", str(out), "-m", "sim-model", "--base-url", url,
                "--http", http, "--no-progress", "-c", "8",
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            outputs[http] = {r["custom_id"]: r for r in pq.read_table(out).to_pylist()}
        stats = sim_stats(url)
    assert stats["answered_ok"] == 90  # every line answered once over each client
    for http, rows in outputs.items():
        assert sorted(rows) == sorted(f"r{i}" for i in range(30)), http
        for cid, row in rows.items():
            sent = {"model": "sim-model", "messages": [{"role": "user", "content": f"q{cid[1:]}"}]}
            assert row["status"] == "ok", (http, row)
            assert row["content"] == expected_content(sent), (http, cid)


def test_the_flag_and_the_job_file_choose_the_client(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[endpoint]\nbase_url = "sim"\nhttp = "pyreqwest"\n', encoding="utf-8")
    assert load_job(job).endpoint.http == "pyreqwest"
    args = build_parser().parse_args(["run", str(job), "--http", "aiohttp"])
    assert _job(args).endpoint.http == "aiohttp"
    listed = tmp_path / "listed.toml"
    listed.write_text(
        '[[endpoints]]\nbase_url = "sim"\n[[endpoints]]\nbase_url = "sim"\nhttp = "aiohttp"\n',
        encoding="utf-8",
    )
    args = build_parser().parse_args(["run", str(listed), "--http", "pyreqwest"])
    assert {e.http for e in _job(args).endpoints} == {"pyreqwest"}


def test_an_unknown_client_names_the_field(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[endpoint]\nbase_url = "sim"\nhttp = "curl"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_job(job)
    assert caught.value.field == "endpoint.http"
    proc = run_batcher("run", str(job), "-i", "x.jsonl", "-o", str(tmp_path / "o.parquet"))
    assert proc.returncode == 2
    assert "endpoint.http" in proc.stderr and "Traceback" not in proc.stderr


def test_the_chosen_client_is_the_one_that_sends(tmp_path: Path) -> None:
    # The server sees who sends: each client names itself in User-Agent (batcher's own
    # transport as batcher).
    agents: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive)
        agents.append(dict(scope["headers"]).get(b"user-agent", b"").decode())
        raw = json.dumps(chat_answer("m", {"prompt_tokens": 1, "completion_tokens": 1})).encode()
        head = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": raw})

    src = tmp_path / "in.jsonl"
    _lines(src, 3)
    with serving(app) as url:
        for http, agent_says in (
            ("pyreqwest", "pyreqwest"),
            ("aiohttp", "aiohttp"),
            ("httptools", "batcher/"),
        ):
            out = tmp_path / f"{http}.jsonl"
            proc = run_batcher(
                "run", "-i", str(src), "-o", str(out), "-m", "m", "--base-url", url,
                "--http", http, "--no-progress",
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            sent, agents[:] = list(agents), []
            assert len(sent) == 3 and all(agent_says in agent.lower() for agent in sent), sent


def test_pyreqwest_missing_is_a_usage_error_with_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pyreqwest" else real(name)
    )
    job = tmp_path / "job.toml"
    job.write_text('[endpoint]\nbase_url = "sim"\nhttp = "pyreqwest"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_job(job)
    assert caught.value.field == "endpoint.http"
    assert "pip install 'batcher[native]'" in caught.value.reason


def _counting_transport(sent: list[httpx.Request]) -> httpx.MockTransport:
    """A transport that answers every request, keeping what it was sent."""

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(
            200, json=chat_answer("m", {"prompt_tokens": 1, "completion_tokens": 1})
        )

    return httpx.MockTransport(answer)


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_a_transport_and_pyreqwest_named_together_are_a_usage_error(
    tmp_path: Path, mode: str
) -> None:
    # the transport replaces the HTTP client: pyreqwest would be silently ignored
    src = tmp_path / "in.jsonl"
    _lines(src, 2)
    out = tmp_path / "out.jsonl"
    sent: list[httpx.Request] = []
    job = {
        "job": {"mode": mode},
        "endpoint": {"base_url": "http://127.0.0.1:9/v1", "http": "pyreqwest"},
    }
    with pytest.raises(ConfigError) as caught:
        batcher.run(job, input=src, output=out, model="m", transport=_counting_transport(sent))
    assert caught.value.field == "endpoint.http" and caught.value.exit_code == 2
    assert "transport" in caught.value.reason
    assert sent == [] and not out.exists()
    listed = {
        "endpoints": [
            {"base_url": "http://a:9/v1"},
            {"base_url": "http://b:9/v1", "http": "pyreqwest"},
        ]
    }
    with pytest.raises(ConfigError) as caught:
        batcher.run(listed, input=src, output=out, model="m", transport=_counting_transport(sent))
    assert caught.value.field == "endpoints[1].http"
    # either alone is fine: the transport with the default client sends over the transport
    job["job"] = {"mode": "online"}
    job["endpoint"] = {"base_url": "http://127.0.0.1:9/v1"}
    result = batcher.run(job, input=src, output=out, model="m", transport=_counting_transport(sent))
    assert result.report.exit_code == 0 and len(sent) == 2


def test_batch_mode_warns_once_that_another_client_is_for_online_requests_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    warnings = {}
    for http in ("httptools", "pyreqwest"):
        folder = tmp_path / http
        folder.mkdir()
        with batch_sim(BatchSimConfig(validating_s=1, in_progress_s=1, finalizing_s=1)) as sim:
            job = batch_job(sim, folder, 4, models=("sim-a",))
            job = dataclasses.replace(job, endpoint=dataclasses.replace(job.endpoint, http=http))
            out = io.StringIO()
            report = run_batch_job(job, sleep=clock_sleep(sim), stream=out)
        assert report.exit_code == 0, out.getvalue()
        warnings[http] = [line for line in out.getvalue().splitlines() if "endpoint.http" in line]
    assert warnings["httptools"] == []  # the default
    (line,) = warnings["pyreqwest"]
    assert "warning" in line and "own HTTP client" in line
