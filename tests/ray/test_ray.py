"""The Ray engine (``--engine ray``) on a local Ray instance against the simulator on 127.0.0.1.

One Ray instance (``num_cpus=2``) and one simulator serve the whole module; each run is a few
hundred requests. Ray is in the test extra, so these run in CI; ``importorskip`` is only a guard
for a machine without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from batcher.config import JobConfig, VariantConfig
from batcher.errors import ConfigError
from batcher.job_file import job_from_dict, with_overrides
from batcher.limits.endpoint import Limits
from batcher.output.provenance import read_provenance
from batcher.output.report import build_report
from batcher.output.report_text import format_report
from batcher.output.rows import PLAIN, schema_for
from batcher.output.writers import SCHEMA, parquet_parts, read_results
from batcher.runner.wiring import endpoint_limits
from batcher.sim.config import SimConfig
from batcher.sim.serve import SimHandle, running_sim
from tests.helpers import ROOT, batcher_cmd, write_input
from tests.s3_server import S3_CANARY, create_bucket, exists, get, put

pytestmark = [
    # Ray Data's DataContext sets its own deprecated fields when it is first created (ray
    # 2.60): ignore deprecation warnings raised in that module only.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
    # the whole module on one xdist worker: one Ray instance (~1 GB, 2 CPUs) for the suite
    pytest.mark.xdist_group("ray"),
]

N = 240
#: The key the CLI test's job names: in the environment the Ray instance starts with, as a key
#: would be set on the nodes of a cluster.
KEY_VAR, KEY = "BATCHER_TEST_RAY_KEY", "sk-test-" + "x" * 24


@pytest.fixture(scope="module")
def s3_env(request: pytest.FixtureRequest) -> dict[str, str] | None:
    """The standard variables that point AWS clients at the tests' S3-compatible server
    (``s3_server``: moto's, on 127.0.0.1), with dummy keys whose secret is ``S3_CANARY``;
    ``None`` without moto."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return None
    from tests.s3_server import S3_CANARY

    return {
        "AWS_ENDPOINT_URL": request.getfixturevalue("s3_server"),
        "AWS_ACCESS_KEY_ID": "AKIATESTBATCHER",
        "AWS_SECRET_ACCESS_KEY": S3_CANARY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def ray_instance(s3_env: dict[str, str] | None) -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_VAR, KEY)  # only while Ray starts: its workers inherit it
        # Ray starts its workers at nice 15: beside the other test worker's processes (at 0)
        # they got a few percent of a core, and a run made no progress for minutes.
        env.setenv("RAY_worker_niceness", "0")
        for name, value in (s3_env or {}).items():  # as a store's credentials on the nodes
            env.setenv(name, value)
        ray.init(
            address="local",  # a new instance, whatever else runs on the machine
            num_cpus=2,
            include_dashboard=False,
            ignore_reinit_error=True,
            logging_level="ERROR",
            log_to_driver=False,
        )
    try:
        yield ray
    finally:
        started = _ray_processes_under(os.getpid())
        ray.shutdown()
        # Workers of drivers that were killed (the kill -9 and interrupt tests) can outlive
        # the instance, orphaned, holding ~220 MB each: end what this module started.
        for pid in started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _ray_processes_under(root: int) -> list[int]:
    """Ray's processes descended from ``root`` (read from /proc: this suite runs on Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            todo.append(child)
            if b"ray" in cmdline:
                found.append(child)
    return found


@pytest.fixture(scope="module")
def sim() -> Iterator[SimHandle]:
    # Faults that the workers' engines retry: every request still ends ok.
    with running_sim(SimConfig(latency_ms=5, error_rate=0.05, seed=3)) as running:
        yield running


def ray_job(tmp_path: Path, base_url: str, n: int = N, **job: Any) -> JobConfig:
    src = write_input(tmp_path / "in.jsonl", n)
    with src.open("a", encoding="utf-8") as f:
        f.write('{"custom_id": "bad", "messages": "not a list"}\n')  # rejected, line n + 1
    return job_from_dict(
        {
            "job": {
                "input": str(src),
                "output": str(tmp_path / "out.parquet"),
                "progress": False,
                "engine": "ray",
                **job,
            },
            "endpoint": {"base_url": base_url},
            "request": {"model": "gpt-4o-mini"},
            "limits": {"concurrency": 16},
            "retry": {"max_attempts": 6, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
            "ray": {"workers": 2, "block_rows": 40},
        }
    )


def output_ids(output: Path) -> list[str]:
    return sorted(row["custom_id"] for row in read_results(output))


@pytest.mark.slow
def test_each_id_once_then_resume_sends_only_what_is_missing(
    tmp_path: Path, ray_instance: Any, sim: SimHandle
) -> None:
    from batcher.ray.driver import run_job_on_ray

    job = ray_job(tmp_path, sim.base_url)
    expected = [f"r{i:05d}" for i in range(N)]
    answered = sim.simulator.stats.answered_ok

    report = run_job_on_ray(job, stream=io.StringIO())

    assert report.exit_code == 1, report.summary  # the one rejected line
    assert "engine    ray: 2 workers, 6 blocks of up to 40 requests" in report.summary
    output = report.output
    parts = parquet_parts(output)
    assert len(parts) == N // 40  # one part file per block
    for part in parts:
        assert pq.read_schema(part).remove_metadata() == schema_for(PLAIN)
        assert pq.read_schema(part).metadata[b"batcher.input"] == str(job.input).encode()
    assert output_ids(output) == expected
    # The folder reads as one table in the usual tools.
    import duckdb
    import pandas as pd
    import polars as pl

    assert len(pd.read_parquet(output)) == N
    assert pl.read_parquet(output / "*.parquet")["custom_id"].n_unique() == N
    sql = f"select count(distinct custom_id), count(*) from read_parquet('{output}/*.parquet')"
    relation = duckdb.sql(sql)
    assert relation is not None and relation.fetchall() == [(N, N)]
    rows = list(read_results(output))
    assert {r["status"] for r in rows} == {"ok"}
    made = read_provenance(output)  # as batcher report shows it
    assert json.loads(made["job"])["engine"] == "ray"
    summary, _ = build_report(output)
    assert f"{N}: {N} ok, 0 error" in format_report(summary)
    assert {r["endpoint"] for r in rows} == {"default"}
    assert sim.simulator.stats.answered_ok - answered == N
    assert report.stats.ok == N and report.stats.rejected == 1
    rejects = [json.loads(line) for line in report.rejects.read_text().splitlines()]  # type: ignore[union-attr]
    assert [(r["line"], r["custom_id"]) for r in rejects] == [(N + 1, "bad")]
    assert "messages" in rejects[0]["reason"]

    # Again: nothing is sent.
    answered = sim.simulator.stats.answered_ok
    again = run_job_on_ray(job, stream=io.StringIO())
    assert sim.simulator.stats.answered_ok == answered
    assert (again.stats.submitted, again.stats.skipped) == (0, N)
    assert again.stats.output_ok == N and again.exit_code == 1

    # A part lost (as if the run had stopped before it): only its ids are sent again.
    lost = parts[2]
    lost_ids = pq.read_table(lost, columns=["custom_id"])["custom_id"].to_pylist()
    lost.unlink()
    third = run_job_on_ray(job, stream=io.StringIO())
    assert sim.simulator.stats.answered_ok - answered == len(lost_ids) == 40
    assert third.stats.submitted == 40 and third.stats.skipped == N - 40
    assert output_ids(output) == expected  # every id exactly once

    # --restart: everything again, still once each.
    fourth = run_job_on_ray(job, restart=True, stream=io.StringIO())
    assert fourth.stats.submitted == N
    assert output_ids(output) == expected


@pytest.mark.slow
def test_workers_import_this_checkout(ray_instance: Any) -> None:
    import batcher

    @ray_instance.remote  # type: ignore[untyped-decorator]  # ray is untyped here
    def where() -> str:
        import batcher

        return batcher.__file__

    assert ray_instance.get(where.remote()) == batcher.__file__


@pytest.mark.slow
def test_a_refused_key_stops_every_worker_and_records_nothing(
    tmp_path: Path, ray_instance: Any
) -> None:
    from batcher.ray.driver import run_job_on_ray

    with running_sim(SimConfig(error_rate=1.0, error_kinds=("401",))) as refusing:
        job = ray_job(tmp_path, refusing.base_url, n=120)
        report = run_job_on_ray(job, stream=io.StringIO())
        # As locally: at most the requests in flight (the job's concurrency, 16, over all
        # workers) are sent once the key is refused; later blocks are not tried.
        assert refusing.simulator.stats.requests_received <= 16
    assert report.exit_code == 3
    assert "refused the API key" in (report.stats.stop_reason or "")
    assert output_ids(report.output) == []  # not recorded: a re-run after the fix sends them


@pytest.mark.slow
def test_a_host_that_does_not_resolve_stops_a_ray_run_as_a_configuration_error(
    tmp_path: Path, ray_instance: Any
) -> None:
    """As locally: exit 2 (a ``ConfigError``) naming the endpoint's field and the host, and
    nothing recorded (a re-run after the fix sends everything)."""
    from batcher.ray.driver import run_job_on_ray

    job = ray_job(tmp_path, "http://does-not-exist.invalid/v1", n=40)
    with pytest.raises(ConfigError) as info:
        run_job_on_ray(job, stream=io.StringIO())
    assert info.value.field == "endpoint.base_url"
    assert "does-not-exist.invalid" in str(info.value)
    assert isinstance(job.output, Path) and output_ids(job.output) == []


@pytest.mark.slow
def test_cli_engine_ray_on_an_existing_cluster(
    tmp_path: Path, ray_instance: Any, sim: SimHandle
) -> None:
    """``batcher run --engine ray`` joins the cluster ``RAY_ADDRESS`` names, as under
    ``ray job submit``, and never prints the API key."""

    src = write_input(tmp_path / "in.jsonl", 100)
    out = tmp_path / "cli.parquet"
    env = {**os.environ, "RAY_ADDRESS": ray_instance.get_runtime_context().gcs_address}
    env[KEY_VAR] = KEY
    job = tmp_path / "job.toml"
    job.write_text(
        textwrap.dedent(f"""
            [job]
            input = "{src}"
            output = "{out}"
            [endpoint]
            base_url = "{sim.base_url}"
            api_key_env = "{KEY_VAR}"
            [request]
            model = "gpt-4o-mini"
            [retry]
            backoff_initial_s = 0.01
            backoff_max_s = 0.05
        """),
        encoding="utf-8",
    )
    cmd = batcher_cmd("run", str(job), "--engine", "ray", "--ray-workers", "2", "--no-progress")
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=90, cwd=ROOT, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "100 done: 100 ok" in done.stderr
    assert KEY not in done.stderr + done.stdout
    assert output_ids(out) == [f"r{i:05d}" for i in range(100)]
    assert all(KEY.encode() not in p.read_bytes() for p in parquet_parts(out))


@pytest.mark.slow
def test_a_key_missing_on_the_workers_is_named(
    tmp_path: Path, ray_instance: Any, sim: SimHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver has the key but the cluster's workers do not: one clear line, exit 3."""
    from batcher.errors import OutputError
    from batcher.ray.driver import run_job_on_ray

    monkeypatch.setenv("BATCHER_TEST_DRIVER_ONLY_KEY", KEY)
    job = ray_job(tmp_path, sim.base_url, n=40)
    job = dataclasses.replace(
        job, endpoint=dataclasses.replace(job.endpoint, api_key_env="BATCHER_TEST_DRIVER_ONLY_KEY")
    )
    with pytest.raises(OutputError) as exc:
        run_job_on_ray(job, stream=io.StringIO())
    assert str(exc.value) == (
        "the Ray job failed: endpoint default: $BATCHER_TEST_DRIVER_ONLY_KEY is not set on this "
        "Ray worker (set it in the workers' environment; see the README)"
    )
    assert exc.value.exit_code == 3


@pytest.mark.slow
def test_engine_ray_without_ray_fails_before_sending(tmp_path: Path) -> None:
    """No traceback, exit 2, the extra named, nothing written."""
    src = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "o.parquet"
    code = textwrap.dedent("""
        import sys
        class NoRay:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NoRay())
        from batcher.cli.main import main
        sys.exit(main(sys.argv[1:]))
    """)
    args = ["run", "--input", str(src), "--output", str(out), "--model", "m", "--engine", "ray"]
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "batcher: error: job.engine: Ray is not installed: pip install 'batcher[ray]' "
        "(or pip install 'ray[data]')"
    ]
    assert not out.exists()


def test_engine_and_ray_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"^job\.engine: must be \"local\" or \"ray\""):
        job_from_dict({"job": {"engine": "spark"}})
    with pytest.raises(ConfigError, match=r"^ray\.workers: must be an integer >= 1"):
        job_from_dict({"ray": {"workers": 0}})
    with pytest.raises(ConfigError, match=r"^ray\.block_rows"):
        job_from_dict({"ray": {"block_rows": "many"}})
    with pytest.raises(ConfigError, match=r"^ray\.colour"):
        job_from_dict({"ray": {"colour": 1}})
    job = with_overrides(JobConfig(), engine="ray", ray_workers=3)
    assert (job.engine, job.ray.workers) == ("ray", 3)
    with pytest.raises(ConfigError, match=r"^--ray-workers: only with --engine ray"):
        with_overrides(JobConfig(), ray_workers=3)


def test_cli_engine_flag_names_itself(capsys: pytest.CaptureFixture[str]) -> None:
    from batcher.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--engine", "spark"])
    assert exc.value.code == 2
    assert "argument --engine: invalid choice: 'spark'" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_engine_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from batcher.ray.driver import run_job_on_ray

    src = write_input(tmp_path / "in.jsonl", 2)
    base = {"input": str(src), "model": "m", "base_url": "sim", "engine": "ray"}
    jsonl = with_overrides(JobConfig(), output=str(tmp_path / "o.jsonl"), **base)
    with pytest.raises(ConfigError, match=r"^job\.output: the Ray engine writes Parquet"):
        run_job_on_ray(jsonl)
    capped = with_overrides(
        JobConfig(), output=str(tmp_path / "o.parquet"), max_cost_usd=1.0, **base
    )
    with pytest.raises(ConfigError, match=r"^limits\.max_cost_usd: not supported"):
        run_job_on_ray(capped)
    sweep = dataclasses.replace(
        with_overrides(JobConfig(), output=str(tmp_path / "o.parquet"), **base),
        variants=(VariantConfig(name="a"), VariantConfig(name="b")),
    )
    with pytest.raises(ConfigError, match=r"^variants: not supported with the Ray engine"):
        run_job_on_ray(sweep)
    (tmp_path / "file.parquet").write_bytes(b"")
    local_output = with_overrides(JobConfig(), output=str(tmp_path / "file.parquet"), **base)
    with pytest.raises(ConfigError, match=r"is a file"):
        run_job_on_ray(local_output)
    in_a_store = with_overrides(JobConfig(), output="s3://bucket/o.jsonl", **base)
    with pytest.raises(ConfigError, match=r"^job\.output: the Ray engine writes Parquet"):
        run_job_on_ray(in_a_store)
    assert not Path("s3:").exists()  # no local folder made of the URI


def test_limits_are_divided_between_workers() -> None:
    job = job_from_dict(
        {
            "endpoints": [
                {"name": "a", "base_url": "sim"},
                {"name": "b", "base_url": "sim", "rpm": 90, "concurrency": 5},
            ],
            "limits": {"rpm": 600, "tpm": 30000, "concurrency": 64},
        }
    )
    a = endpoint_limits(job, job.endpoints[0], 4)
    assert (a.configured_rpm, a.configured_tpm, a.max_concurrency) == (150, 7500, 16)
    b = endpoint_limits(job, job.endpoints[1], 4)
    assert (b.configured_rpm, b.configured_tpm, b.max_concurrency) == (22.5, 7500, 1)  # 5 // 4
    assert endpoint_limits(job, job.endpoints[1], 8).max_concurrency == 1  # never 0


def test_a_shared_limit_learns_its_share_of_the_server_headers() -> None:
    """A worker with 1/4 of the limits learns 1/4 of the key's server limit (else 4 workers
    that each learned it would send 4 times what the key allows)."""
    now = [0.0]
    limits = Limits(concurrency=8, share=0.25, clock=lambda: now[0])
    limits.observe({"x-ratelimit-limit-requests": "400", "x-ratelimit-remaining-requests": "8"})
    assert limits.server_rpm == 100
    assert limits.rpm is not None
    assert [limits.rpm.reserve(1) for _ in range(3)] == pytest.approx([0.0, 0.6, 1.2])
    whole = Limits(concurrency=8, clock=lambda: now[0])
    whole.observe({"x-ratelimit-limit-requests": "400"})
    assert whole.server_rpm == 400
    with pytest.raises(ValueError, match="share"):
        Limits(share=0)


@pytest.mark.slow
def test_retry_errors_resends_them_and_their_new_records_replace_the_old(
    tmp_path: Path, ray_instance: Any
) -> None:
    from batcher.ray.driver import run_job_on_ray

    expected = [f"r{i:05d}" for i in range(120)]
    with running_sim(SimConfig(error_rate=0.3, error_kinds=("400", "500"), seed=5)) as faulty:
        job = ray_job(tmp_path, faulty.base_url, n=120)
        job = dataclasses.replace(job, retry=dataclasses.replace(job.retry, max_attempts=1))
        first = run_job_on_ray(job, stream=io.StringIO())
    codes = {r["custom_id"]: r["status_code"] for r in read_results(first.output)}
    refused = {cid for cid, code in codes.items() if code == 400}  # not retryable
    flaky = {cid for cid, code in codes.items() if code == 500}  # retryable
    assert refused and flaky and first.exit_code == 1

    with running_sim(SimConfig()) as healthy:
        job = dataclasses.replace(
            job, endpoint=dataclasses.replace(job.endpoint, base_url=healthy.base_url)
        )
        second = run_job_on_ray(job, retry_errors="retryable", stream=io.StringIO())
        assert healthy.simulator.stats.answered_ok == len(flaky)
        assert (second.stats.submitted, second.stats.resent) == (len(flaky), len(flaky))
        rows = {r["custom_id"]: r["status"] for r in read_results(second.output)}
        assert output_ids(second.output) == expected  # the old records are gone
        assert {cid for cid, status in rows.items() if status == "error"} == refused

        third = run_job_on_ray(job, retry_errors="all", stream=io.StringIO())
        assert healthy.simulator.stats.answered_ok == len(flaky) + len(refused)
        assert output_ids(third.output) == expected
        assert {r["status"] for r in read_results(third.output)} == {"ok"}
        assert third.stats.output_ok == 120 and third.stats.output_error == 0


def test_an_id_found_twice_keeps_its_later_record(tmp_path: Path) -> None:
    """A run that stopped between writing a re-sent request's new part and dropping its old
    row leaves the id twice; the next run keeps the later record before anything else."""
    from batcher.output.parts import part_path, prepare, write_part
    from batcher.output.writers import results_table
    from batcher.records import Result, Status

    def result(cid: str, status: Status) -> Result:
        return Result(custom_id=cid, line=1, status=status, model="m", attempts=1,
                      latency_s=0.1, started_at=1.0, finished_at=2.0)  # fmt: skip

    folder = tmp_path / "out.parquet"
    folder.mkdir()
    old = part_path(folder, "20260101T000000000000-aaaaaa", 0)
    new = part_path(folder, "20260102T000000000000-bbbbbb", 0)
    write_part(old, results_table([result("a", "error"), result("b", "ok")]), {"batcher.x": "1"})
    write_part(new, results_table([result("a", "ok")]), None)
    (folder / ".part-cut-short.parquet.partial").write_bytes(b"PAR1")

    found = prepare(folder, restart=False)

    assert not found.duplicated and found.counts() == {"ok": 2}
    assert sorted(r["custom_id"] for r in read_results(old)) == ["b"]
    assert pq.read_schema(old).metadata == {b"batcher.x": b"1"}  # provenance kept
    assert not list(folder.glob(".*.partial"))
    assert prepare(folder, restart=True).records == {} and not parquet_parts(folder)


@pytest.mark.slow
def test_kill_9_mid_run_then_the_rerun_completes_each_id_once(
    tmp_path: Path, ray_instance: Any
) -> None:
    """The driver killed after its first parts: the parts written stay, the blocks in flight
    are sent again, and in the end every id is in the output once."""
    import time

    n, block = 600, 50
    src = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / "k.parquet"
    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\ninput = "{src}"\noutput = "{out}"\n[request]\nmodel = "m"\n'
        f"[limits]\nconcurrency = 8\n[ray]\nworkers = 2\nblock_rows = {block}\n",
        encoding="utf-8",
    )
    env = {**os.environ, "RAY_ADDRESS": ray_instance.get_runtime_context().gcs_address}
    with running_sim(SimConfig(latency_ms=20)) as sim:
        cmd = batcher_cmd(
            "run", str(job), "--base-url", sim.base_url, "--engine", "ray", "--no-progress"
        )
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while not (out.is_dir() and parquet_parts(out)) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        first = output_ids(out)
        assert 0 < len(first) < n

        done = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, check=False
        )
        assert done.returncode == 0, done.stderr
        assert output_ids(out) == [f"r{i:05d}" for i in range(n)]
        # Sent twice at most: the blocks that were in flight (2 workers × 2 blocks each).
        assert n <= sim.simulator.stats.answered_ok <= n + 2 * 2 * block


@pytest.mark.slow
def test_the_python_api_runs_a_ray_job_on_ray(
    tmp_path: Path, ray_instance: Any, sim: SimHandle
) -> None:
    import batcher

    job = ray_job(tmp_path, sim.base_url, n=30)
    result = batcher.run(job)
    assert result.output.is_dir()  # the Ray engine's folder of parts, not a local file
    assert not (tmp_path / "out.parquet.journal").exists()
    assert result.table is not None
    assert result.table.schema.names == [*SCHEMA.names, "messages"]
    assert sorted(result.table.column("custom_id").to_pylist()) == output_ids(result.output)
    assert len(output_ids(result.output)) == 30 and result.stats.ok == 30


@pytest.mark.slow
def test_a_ray_run_writes_the_typed_columns(
    tmp_path: Path, ray_instance: Any, sim: SimHandle
) -> None:
    from batcher.ray.driver import run_job_on_ray

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "rank": {"type": "integer"}},
        "required": ["city", "rank"],
    }
    job = ray_job(tmp_path, sim.base_url, n=40)
    asked = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    job = dataclasses.replace(job, request={**job.request, "response_format": asked})
    report = run_job_on_ray(job, stream=io.StringIO())
    assert report.exit_code == 1, report.summary  # the one rejected line
    [part] = parquet_parts(report.output)
    assert pq.read_schema(part).field("parsed").type == pa.struct(
        [("city", pa.string()), ("rank", pa.int64())]
    )
    rows = list(read_results(report.output))
    assert len(rows) == 40
    for row in rows:
        try:
            answer = json.loads(row["content"])
        except ValueError:  # an answer that is not whole JSON: nothing to parse
            answer = None
        assert row["parsed"] == answer
        assert row["messages"][0]["role"] == "user" and row["messages"][0]["content"]
    assert sum(row["parsed"] is not None for row in rows) >= 30


@pytest.mark.slow
def test_an_interrupt_lets_the_workers_finish_what_they_sent_and_keeps_it(
    tmp_path: Path, ray_instance: Any
) -> None:
    """Ctrl+C (SIGINT) mid-run: the workers send no new requests, those in flight finish and
    every answer the server sent is written (partial blocks too), exit 3; a re-run sends only
    the rest."""
    import threading

    from batcher.ray.driver import run_job_on_ray

    n = 600
    expected = [f"r{i:05d}" for i in range(n)]
    with running_sim(SimConfig(latency_ms=300)) as slow:
        job = ray_job(tmp_path, slow.base_url, n=n)
        # Ctrl+C once the first part is written: blocks are finished, others half done.
        out, stop = tmp_path / "out.parquet", threading.Event()

        def interrupt() -> None:
            while not stop.wait(0.05):
                if out.is_dir() and parquet_parts(out):
                    os.kill(os.getpid(), signal.SIGINT)
                    return

        thread = threading.Thread(target=interrupt, daemon=True)
        thread.start()
        try:
            first = run_job_on_ray(job, stream=io.StringIO(), handle_signals=True)
        finally:
            stop.set()
            thread.join()
        received = slow.simulator.stats.requests_received
    assert first.exit_code == 3, first.summary
    assert first.stats.stop_reason == "interrupted by SIGINT"
    written = output_ids(first.output)
    assert 0 < len(written) < n
    assert len(set(written)) == len(written)
    # Every request the server answered is in the output: none is paid for twice.
    assert received == len(written)
    assert first.stats.ok == len(written)

    with running_sim(SimConfig()) as fast:
        job = dataclasses.replace(
            job, endpoint=dataclasses.replace(job.endpoint, base_url=fast.base_url)
        )
        second = run_job_on_ray(job, stream=io.StringIO(), handle_signals=True)
        assert fast.simulator.stats.requests_received == n - len(written)
    assert second.exit_code == 1, second.summary  # the rejected line
    assert (second.stats.submitted, second.stats.skipped) == (n - len(written), len(written))
    assert output_ids(second.output) == expected


@pytest.mark.slow
def test_cli_sigterm_keeps_what_was_answered(tmp_path: Path, ray_instance: Any) -> None:
    """``batcher run --engine ray`` sent SIGTERM after its first part: exit 3, and every answer
    the server sent is in the output."""
    import time

    src = write_input(tmp_path / "in.jsonl", 600)
    out = tmp_path / "t.parquet"
    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\ninput = "{src}"\noutput = "{out}"\ngrace_s = 5\n[request]\nmodel = "m"\n'
        "[limits]\nconcurrency = 16\n[ray]\nworkers = 2\nblock_rows = 40\n",
        encoding="utf-8",
    )
    env = {**os.environ, "RAY_ADDRESS": ray_instance.get_runtime_context().gcs_address}
    with running_sim(SimConfig(latency_ms=300)) as slow:
        cmd = batcher_cmd(
            "run", str(job), "--base-url", slow.base_url, "--engine", "ray", "--no-progress"
        )
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while not (out.is_dir() and parquet_parts(out)) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        received = slow.simulator.stats.requests_received
    assert proc.returncode == 3, stderr
    assert "interrupted by SIGTERM: the workers send no new requests" in stderr
    written = output_ids(out)
    assert 0 < len(written) < 600
    assert received == len(written)


@pytest.mark.slow
def test_a_csv_through_a_template_on_ray(tmp_path: Path, ray_instance: Any, sim: SimHandle) -> None:
    from batcher.config import TemplateConfig
    from batcher.ray.driver import run_job_on_ray
    from batcher.sim.answers import expected_content

    src = tmp_path / "q.csv"
    src.write_text("".join(["key,question\n", *(f"k{i},question {i}\n" for i in range(30))]))
    job = dataclasses.replace(
        ray_job(tmp_path, sim.base_url),
        input=src,
        template=TemplateConfig(user="Q: {question}", id_column="key"),
    )
    report = run_job_on_ray(job, stream=io.StringIO())
    assert report.exit_code == 0, report.summary
    rows = {r["custom_id"]: r for r in read_results(report.output)}
    assert sorted(rows) == sorted(f"k{i}" for i in range(30))
    for i in range(30):
        messages = [{"role": "user", "content": f"Q: question {i}"}]
        body = {"model": "gpt-4o-mini", "messages": messages}
        assert rows[f"k{i}"]["content"] == expected_content(body)
    assert rows["k7"]["input"] == {"key": "k7", "question": "question 7"}  # typed, by the workers


def test_the_input_is_read_on_the_workers_and_a_duplicate_across_files_is_rejected_once(
    tmp_path: Path, ray_instance: Any, sim: SimHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver never constructs a reader (the workers' processes do); two input files
    matched by a glob are one input: lines numbered on, an id in both rejected once."""
    from batcher.input import reader
    from batcher.ray.driver import run_job_on_ray

    def no_reading_here(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the driver read the input")

    monkeypatch.setattr(reader.Reader, "__init__", no_reading_here)
    write_input(tmp_path / "in-1.jsonl", 30)
    second = write_input(tmp_path / "in-2.jsonl", 20, start=30)
    with second.open("a", encoding="utf-8") as f:
        f.write('{"custom_id": "r00003", "prompt": "again"}\n')  # line 30 + 21
    answered = sim.simulator.stats.answered_ok
    job = dataclasses.replace(ray_job(tmp_path, sim.base_url), input=tmp_path / "in-*.jsonl")

    report = run_job_on_ray(job, stream=io.StringIO())

    assert report.exit_code == 1, report.summary  # the duplicate
    assert sim.simulator.stats.answered_ok - answered == 50
    assert output_ids(report.output) == [f"r{i:05d}" for i in range(50)]
    rejects = [json.loads(line) for line in report.rejects.read_text().splitlines()]  # type: ignore[union-attr]
    assert [(r["line"], r["custom_id"]) for r in rejects] == [(51, "r00003")]
    assert "duplicate id" in rejects[0]["reason"]
    lines = {r["custom_id"]: r["line"] for r in read_results(report.output)}
    assert (lines["r00000"], lines["r00029"], lines["r00030"], lines["r00049"]) == (1, 30, 31, 50)
    assert (report.stats.lines_read, report.stats.submitted) == (51, 50)


def test_a_line_changed_since_it_ran_is_sent_again(
    tmp_path: Path, ray_instance: Any, sim: SimHandle
) -> None:
    from batcher.ray.driver import run_job_on_ray
    from batcher.sim.answers import expected_content

    job = ray_job(tmp_path, sim.base_url, n=20)
    assert run_job_on_ray(job, stream=io.StringIO()).stats.submitted == 20
    src = Path(str(job.input))
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[4] = '{"custom_id": "r00004", "prompt": "a new question"}\n'
    src.write_text("".join(lines), encoding="utf-8")
    answered = sim.simulator.stats.answered_ok

    again = run_job_on_ray(job, stream=io.StringIO())

    assert sim.simulator.stats.answered_ok - answered == 1
    assert (again.stats.submitted, again.stats.resent, again.stats.skipped) == (1, 1, 19)
    rows = [r for r in read_results(again.output) if r["custom_id"] == "r00004"]
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a new question"}]}
    assert len(rows) == 1 and rows[0]["content"] == expected_content(body)


def test_the_input_is_read_from_an_s3_bucket_by_the_workers(
    tmp_path: Path,
    ray_instance: Any,
    sim: SimHandle,
    s3_env: dict[str, str] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if s3_env is None:
        pytest.skip("moto is not installed")
    from batcher.ray.driver import run_job_on_ray

    for name, value in s3_env.items():  # the driver lists the files with the same variables
        monkeypatch.setenv(name, value)
    bucket = create_bucket()
    for n, start in ((0, 0), (1, 12)):
        body = write_input(tmp_path / f"in-{n}.jsonl", 12, start=start).read_bytes()
        put(f"s3://{bucket}/jobs/in-{n}.jsonl", body)
    put(f"s3://{bucket}/jobs/notes.txt", b"not matched")
    job = dataclasses.replace(
        ray_job(tmp_path, sim.base_url), input=Path(f"s3://{bucket}/jobs/in-*.jsonl")
    )

    report = run_job_on_ray(job, stream=io.StringIO())

    assert report.exit_code == 0, report.summary
    assert output_ids(report.output) == [f"r{i:05d}" for i in range(24)]
    made = read_provenance(report.output)
    assert made["input"] == f"s3://{bucket}/jobs/in-*.jsonl"
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(made)


def test_a_glob_of_csv_objects_is_one_table_with_rows_numbered_on(
    tmp_path: Path,
    ray_instance: Any,
    sim: SimHandle,
    s3_env: dict[str, str] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The output's ``input`` type comes from the first object's header (the driver reads
    no rows), and ids made from row numbers run on into the second object, as in a local run."""
    if s3_env is None:
        pytest.skip("moto is not installed")
    from batcher.config import TemplateConfig
    from batcher.ray.driver import run_job_on_ray

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    bucket = create_bucket()
    put(f"s3://{bucket}/rows/1.csv", b"q\none\ntwo\n")
    put(f"s3://{bucket}/rows/2.csv", b"q\nthree\nfour\n")
    job = dataclasses.replace(
        ray_job(tmp_path, sim.base_url),
        input=Path(f"s3://{bucket}/rows/*.csv"),
        template=TemplateConfig(user="Q: {q}"),
    )

    report = run_job_on_ray(job, stream=io.StringIO())

    assert report.exit_code == 0, report.summary
    rows = sorted((r["custom_id"], r["input"]["q"]) for r in read_results(report.output))
    assert rows == [("1", "one"), ("2", "two"), ("3", "three"), ("4", "four")]


@pytest.mark.slow
def test_parts_go_straight_to_a_bucket_and_a_rerun_resumes_from_them(
    tmp_path: Path,
    ray_instance: Any,
    sim: SimHandle,
    s3_env: dict[str, str] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if s3_env is None:
        pytest.skip("moto is not installed")
    from batcher.output.parts import RUN_KEY, order_key
    from batcher.ray.driver import run_job_on_ray
    from batcher.sim.answers import expected_content
    from batcher.storage import filesystem

    for name, value in s3_env.items():  # the driver's credentials, as the workers'
        monkeypatch.setenv(name, value)
    bucket = create_bucket()
    source, out = f"s3://{bucket}/in/prompts.jsonl", f"s3://{bucket}/results/out.parquet"
    local = ray_job(tmp_path, sim.base_url, n=30)
    lines = Path(str(local.input)).read_bytes().splitlines(keepends=True)
    put(source, b"".join(lines))
    job = dataclasses.replace(local, input=source, output=out)

    first = run_job_on_ray(job, stream=io.StringIO())
    assert (first.stats.submitted, first.stats.rejected) == (30, 1), first.summary
    assert out in first.summary and f"{out}.rejects.jsonl" in first.summary
    assert b"not a list" in get(f"s3://{bucket}/results/out.parquet.rejects.jsonl")

    again = run_job_on_ray(job, stream=io.StringIO())  # everything is there: nothing sent
    assert (again.stats.submitted, again.stats.skipped) == (0, 30), again.summary

    lines[4] = b'{"custom_id": "r00004", "prompt": "a new question"}\n'
    put(source, b"".join(lines))
    answered = sim.simulator.stats.answered_ok
    changed = run_job_on_ray(job, stream=io.StringIO())
    assert sim.simulator.stats.answered_ok - answered == 1
    assert (changed.stats.submitted, changed.stats.resent, changed.stats.skipped) == (1, 1, 29)

    fs, prefix = filesystem(out)
    table = pq.read_table(prefix, filesystem=fs)  # the prefix read back as one dataset
    ids = table["custom_id"].to_pylist()
    assert sorted(ids) == [f"r{i:05d}" for i in range(30)]  # each id once
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a new question"}]}
    row = table.filter(pc.equal(table["custom_id"], "r00004")).to_pylist()[0]
    assert row["content"] == expected_content(body)  # the latest record won
    parts = [i.path for i in fs.get_file_info(pafs.FileSelector(prefix)) if i.is_file]
    assert not [p for p in parts if p.rpartition("/")[2].startswith(".")]  # no upload left
    runs = {int(pq.read_schema(p, filesystem=fs).metadata[RUN_KEY.encode()]) for p in parts}
    assert runs == {order_key(p.rpartition("/")[2])[0] for p in parts} == {1, 2}
    for part in parts:  # written by the workers: numbered after their first line
        lines_in = pq.read_table(part, filesystem=fs, columns=["line"])["line"].to_pylist()
        assert order_key(part.rpartition("/")[2])[1] == min(lines_in)
    for part in parts:  # the secret is in no part, nor in what the runs said
        assert S3_CANARY.encode() not in get(f"s3://{part}")
    assert not any(S3_CANARY in r.summary for r in (first, again, changed))
    assert exists(out.replace("out.parquet", "out.parquet.rejects.jsonl"))
