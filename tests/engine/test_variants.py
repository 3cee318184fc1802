"""Sweeps: a job's ``[[variants]]`` run every line once per variant, each keyed (id, variant).

Config and request building without a network; resume and rejects over ``MockTransport``; an
end-to-end sweep (three variants, one endpoint failing half its requests, then a resume that
finishes only that variant's retryable errors) over real loopback sockets, through the library
and through the command line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

import batcher
from batcher.errors import ConfigError
from batcher.input.reader import Reader
from batcher.job_file import job_from_dict
from batcher.records import Reject, Request
from batcher.sim.config import SimConfig
from batcher.sim.serve import running_sim
from tests.helpers import (
    free_port,
    jsonl,
    run_batcher,
    sim_process,
    sim_stats,
    write_input,
    write_job,
)

VARIANTS = [
    {"name": "a", "temperature": 0, "endpoint": "good"},
    {"name": "b", "model": "gpt-4.1-mini", "seed": 7, "system": "Be terse.", "endpoint": "good"},
    {"name": "c", "temperature": 1, "endpoint": "flaky"},
]


def sweep(tmp_path: Path, endpoints: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A 3-variant job over ``tmp_path/in.jsonl``, one attempt per request (errors stay errors)."""
    return {
        "job": {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "o.parquet")},
        "endpoints": endpoints,
        "request": {"model": "gpt-4o-mini", "max_tokens": 16},
        "retry": {"max_attempts": 1},
        "variants": VARIANTS,
        **extra,
    }


def requests(job: dict[str, Any], path: Path) -> dict[str | None, list[Request]]:
    """The requests each variant builds from ``path``."""
    config = job_from_dict(job)
    out: dict[str | None, list[Request]] = {}
    for variant in config.variants:
        with path.open("rb") as f:
            out[variant.name] = [r for r in Reader(f, config.request, variant=variant)
                                 if isinstance(r, Request)]  # fmt: skip
    return out


# --- configuration ------------------------------------------------------------------------


def test_variants_are_parsed_with_their_overrides_system_and_endpoints() -> None:
    job = job_from_dict(
        {
            "endpoints": [{"name": n, "base_url": "sim"} for n in ("good", "flaky")],
            "variants": [*VARIANTS, {"name": "d.2", "endpoint": ["good", "flaky"]}],
        }
    )
    a, b, c, d = job.variants
    assert (a.name, dict(a.request), a.endpoints) == ("a", {"temperature": 0}, ("good",))
    assert dict(b.request) == {"model": "gpt-4.1-mini", "seed": 7} and b.system == "Be terse."
    assert c.system is None and d.endpoints == ("good", "flaky") and not d.request
    assert job_from_dict({}).variants == ()


@pytest.mark.parametrize(
    ("variants", "field", "says"),
    [
        ([{"name": "a"}, {"name": "b", "temperature": "hot"}], r"variants\[1\]\.temperature",
         "must be a number"),
        ([{"name": "a"}, {"name": "a"}], r"variants\[1\]\.name", "earlier variant"),
        ([{"name": "a b"}], r"variants\[0\]\.name", "letters, digits"),
        ([{"name": ""}], r"variants\[0\]\.name", "letters, digits"),
        ([{"temperature": 0}], r"variants\[0\]\.name", "needs a name"),
        ([{"name": "a", "endpoint": "nowhere"}], r"variants\[0\]\.endpoint", "no endpoint named"),
        ([{"name": "a", "endpoint": 3}], r"variants\[0\]\.endpoint", "endpoint name"),
        ([{"name": "a", "messages": []}], r"variants\[0\]\.messages", "input lines"),
        ([{"name": "a", "system": 1}], r"variants\[0\]\.system", "must be a string"),
        ([{"name": "a", "endpoints": ["x"]}], r"variants\[0\]\.endpoints", "did you mean"),
        ([{"name": "a", "limits": {"rpm": 1}}], r"variants\[0\]\.limits", "table of the job"),
        ({"name": "a"}, "variants", "list of tables"),
    ],
)  # fmt: skip
def test_bad_variants_fail_before_anything_is_sent_naming_the_field(
    variants: Any, field: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        job_from_dict({"endpoint": {"base_url": "sim"}, "variants": variants})
    assert says in str(info.value)


# --- the requests each variant sends ------------------------------------------------------


def test_variant_fields_win_over_defaults_and_the_line_and_system_replaces(tmp_path: Path) -> None:
    lines = [
        {"custom_id": "x", "prompt": "hi", "system": "Be long.", "temperature": 0.5},
        {"custom_id": "y", "messages": [{"role": "user", "content": "hey"}], "model": "line-m"},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    job = sweep(tmp_path, [{"name": "good", "base_url": "sim"}, {"name": "flaky",
                                                                 "base_url": "sim"}])  # fmt: skip
    job["variants"] = [*VARIANTS, {"name": "nosys", "system": ""}]
    built = {name: {r.custom_id: r for r in reqs} for name, reqs in requests(job, src).items()}
    a, b, c, nosys = (built[n] for n in ("a", "b", "c", "nosys"))
    assert a["x"].body["temperature"] == 0  # the variant wins over the line's 0.5
    assert a["x"].body["model"] == "gpt-4o-mini"  # [request] default
    assert a["y"].body["model"] == "line-m"  # the line wins over [request] ...
    assert b["y"].body["model"] == "gpt-4.1-mini"  # ... and the variant over the line
    assert b["x"].body["messages"] == [
        {"role": "system", "content": "Be terse."},  # replaces the line's system message
        {"role": "user", "content": "hi"},
    ]
    assert b["y"].body["messages"][0] == {"role": "system", "content": "Be terse."}  # put first
    assert nosys["x"].body["messages"] == [{"role": "user", "content": "hi"}]  # "" removes it
    assert c["x"].body["temperature"] == 1 and c["x"].variant == "c"
    assert c["x"].key != a["x"].key and a["x"].key.startswith("x")
    assert len({r["x"].body_hash for r in (a, b, c, nosys)}) == 4  # hashed after the overrides


def test_a_line_without_a_model_in_one_variant_is_rejected_naming_it(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"custom_id": "x", "prompt": "hi"}) + "\n", encoding="utf-8")
    config = job_from_dict({
        "job": {"input": str(src), "output": str(tmp_path / "o.jsonl")},
        "endpoint": {"base_url": "sim"},
        "variants": [{"name": "big", "model": "gpt-4o"}, {"name": "plain"}],
    })  # fmt: skip
    read = {}
    for variant in config.variants:
        with src.open("rb") as f:
            read[variant.name] = list(Reader(f, config.request, variant=variant))
    assert isinstance(read["big"][0], Request) and read["big"][0].body["model"] == "gpt-4o"
    reject = read["plain"][0]
    assert isinstance(reject, Reject) and reject.reason.startswith("no model (variant plain):")


def test_changing_one_variant_changes_only_its_hashes(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 6)
    job = sweep(tmp_path, [{"name": "good", "base_url": "sim"}, {"name": "flaky",
                                                                 "base_url": "sim"}])  # fmt: skip
    before = requests(job, src)
    job["variants"] = [VARIANTS[0], VARIANTS[1], {**VARIANTS[2], "temperature": 0.2}]
    after = requests(job, src)
    for name in ("a", "b", "c"):
        same = [x.body_hash == y.body_hash for x, y in zip(before[name], after[name], strict=True)]
        assert same == [name != "c"] * 6, name


# --- resume and rejects, over MockTransport -----------------------------------------------


class Counting:
    """Answers every request; counts them by (model, temperature)."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, Any]] = Counter()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.calls[(body["model"], body.get("temperature"))] += 1
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        choice = {"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        return httpx.Response(200, json={"choices": [choice], "usage": usage})


def mock_job(tmp_path: Path, variants: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "job": {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "o.jsonl")},
        "endpoint": {"base_url": "http://mock.test/v1"},
        "request": {"model": "m"},
        "variants": variants,
    }


def test_resume_resends_only_the_variant_that_changed(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 5)
    server = Counting()
    transport = httpx.MockTransport(server)
    two = [{"name": "cold", "temperature": 0}, {"name": "warm", "temperature": 0.7}]
    first = batcher.run(mock_job(tmp_path, two), transport=transport)
    assert first.exit_code == 0 and server.calls == {("m", 0): 5, ("m", 0.7): 5}

    server.calls.clear()
    again = batcher.run(mock_job(tmp_path, two), transport=transport)
    assert not server.calls and again.stats.skipped == 10

    changed = [two[0], {"name": "warm", "temperature": 0.9}]
    third = batcher.run(mock_job(tmp_path, changed), transport=transport)
    assert server.calls == {("m", 0.9): 5}
    assert third.stats.skipped == 5 and third.stats.resent == 5
    lines = jsonl(third.output)
    keys = [(line["batcher"]["line_id"], line["batcher"]["variant"]) for line in lines]
    assert keys == [(f"r{i:05d}", v) for i in range(5) for v in ("cold", "warm")]  # in order
    assert len({line["id"] for line in lines}) == 10  # Batch API ids unique per (id, variant)
    assert len({line["custom_id"] for line in lines}) == 10  # custom_id too: id:variant


def test_a_bad_line_is_rejected_once_not_once_per_variant(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 4)
    with src.open("a", encoding="utf-8") as f:
        f.write("{not json\n")
        f.write(json.dumps({"custom_id": "r00001", "prompt": "a duplicate id"}) + "\n")
    variants: list[dict[str, Any]] = [{"name": "v1"}, {"name": "v2", "temperature": 1},
                                      {"name": "v3", "seed": 2}]  # fmt: skip
    result = batcher.run(mock_job(tmp_path, variants), transport=httpx.MockTransport(Counting()))
    rejects = jsonl(result.report.rejects or Path("missing"))
    assert sorted((r["line"], r["reason"].split(":")[0]) for r in rejects) == [
        (5, "invalid JSON"),
        (6, "duplicate id 'r00001' (ids must be unique)"),
    ]
    assert result.stats.rejected == 2 and result.exit_code == 1
    assert result.table is not None and result.table.num_rows == 12


# --- the Python API -----------------------------------------------------------------------


def test_run_returns_a_table_with_the_variant_column_and_prints_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_input(tmp_path / "in.jsonl", 3)
    variants: list[dict[str, Any]] = [{"name": "v1"}, {"name": "v2", "temperature": 1}]
    result = batcher.run(mock_job(tmp_path, variants), transport=httpx.MockTransport(Counting()),
                         output=str(tmp_path / "o.parquet"))  # fmt: skip
    assert capsys.readouterr() == ("", "")
    assert "finished" in result.summary and "    v1  3 ok, 0 error" in result.summary
    assert result.output == tmp_path / "o.parquet" and result.table is not None
    assert result.table.column_names[-4:] == ["variant", "choices_asked", "batch_id", "messages"]
    assert sorted(result.table["variant"].to_pylist()) == ["v1"] * 3 + ["v2"] * 3
    unloaded = batcher.run(mock_job(tmp_path, variants), output=str(tmp_path / "o.parquet"),
                           load=False)  # fmt: skip
    assert unloaded.table is None and unloaded.stats.skipped == 6


def test_large_outputs_are_not_loaded_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_input(tmp_path / "in.jsonl", 3)
    monkeypatch.setattr("batcher.api.LOAD_MAX_ROWS", 5)
    job = mock_job(tmp_path, [{"name": "v1"}, {"name": "v2"}])
    big = batcher.run(job, transport=httpx.MockTransport(Counting()))
    assert big.table is None and big.output.exists()
    assert batcher.run(job, load=True).table.num_rows == 6  # type: ignore[union-attr]


def test_bad_arguments_raise_instead_of_exiting(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        batcher.run(mock_job(tmp_path, []), colour="red")
    with pytest.raises(ConfigError, match=r"job\.input"):
        batcher.run({"request": {"model": "m"}})
    with pytest.raises(TypeError, match="a path, a JobConfig or a dict"):
        batcher.run(42)  # type: ignore[arg-type]


def test_a_jsonl_output_with_a_lone_surrogate_loads_as_a_table(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 2)

    def answer(request: httpx.Request) -> httpx.Response:
        text = '{"choices": [{"message": {"role": "assistant", "content": "x\\ud800y"}, '
        text += '"finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'
        return httpx.Response(200, content=text.encode(), headers={"content-type": "json"})

    result = batcher.run(mock_job(tmp_path, []), transport=httpx.MockTransport(answer))
    assert result.exit_code == 0 and result.table is not None
    # kept as its escape text, as the Parquet writer keeps it
    assert result.table.column("content").to_pylist() == ["x\\ud800y"] * 2


def test_run_in_a_notebook_stops_at_an_interrupt(tmp_path: Path) -> None:
    """A notebook's stop button raises KeyboardInterrupt in the thread that runs the cell's loop:
    the run (on a loop of its own in a helper thread) is cancelled and sends nothing more."""
    write_input(tmp_path / "in.jsonl", 40)
    calls: list[str] = []
    interrupted = threading.Event()
    main = threading.main_thread().ident
    assert main is not None

    async def slow(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content)["messages"][-1]["content"])
        if len(calls) == 3:
            interrupted.set()
            # What the stop button does: SIGINT, taken by the thread that runs the cell's
            # loop (sent to it, not to the process: the kernel may hand a process's signal to
            # any of its threads, and only the main thread's wait is interrupted).
            signal.pthread_kill(main, signal.SIGINT)
        await asyncio.sleep(0.2)
        return Counting()(request)

    async def cell() -> None:
        job = mock_job(tmp_path, [])
        job["limits"] = {"concurrency": 2}
        batcher.run(job, transport=httpx.MockTransport(slow))

    # Python's own SIGINT handler, installed again at the system level: a library imported by
    # other tests may have put its C handler in its place (Python's record of the handler
    # would not show it), and this test is of batcher, not of them.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(cell())
    finally:
        loop.close()
        signal.signal(signal.SIGINT, previous)
    assert interrupted.is_set()
    sent = len(calls)
    time.sleep(0.5)  # were the run still going, two more requests would go out by now
    assert sent == len(calls) < 40


@pytest.mark.anyio
async def test_arun_and_run_work_inside_a_running_event_loop(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 2)
    job = mock_job(tmp_path, [{"name": "v1"}, {"name": "v2"}])
    result = await batcher.arun(job, transport=httpx.MockTransport(Counting()))
    assert result.exit_code == 0 and result.table is not None and result.table.num_rows == 4
    again = batcher.run(job)  # blocking, from inside the loop, as in a notebook cell
    assert again.stats.skipped == 4 and again.table is not None


# --- end to end: one variant's endpoint fails half its requests ---------------------------


def check_once_each(rows: list[dict[str, Any]], n: int) -> Counter[tuple[str, str]]:
    """Every (custom_id, variant) exactly once; returns the statuses by variant."""
    keys = [(r["custom_id"], r["variant"]) for r in rows]
    assert sorted(keys) == sorted((f"r{i:05d}", v) for i in range(n) for v in "abc")
    return Counter((r["variant"], r["status"]) for r in rows)


def test_library_sweep_with_a_flaky_endpoint_then_a_resume(tmp_path: Path) -> None:
    n = 30
    write_input(tmp_path / "in.jsonl", n)
    flaky_cfg = SimConfig(error_rate=0.5, error_kinds=("500", "503"), seed=3)
    with running_sim() as good, running_sim(flaky_cfg) as flaky:
        job = sweep(tmp_path, [{"name": "good", "base_url": good.base_url},
                               {"name": "flaky", "base_url": flaky.base_url}])  # fmt: skip
        first = batcher.run(job)
        assert first.table is not None
        statuses = check_once_each(first.table.to_pylist(), n)
        failed = statuses[("c", "error")]
        assert statuses[("a", "ok")] == statuses[("b", "ok")] == n  # the healthy variants
        assert 5 <= failed <= 25 and statuses[("c", "ok")] == n - failed
        assert first.exit_code == 1 and good.simulator.stats.requests_received == 2 * n
        assert flaky.simulator.stats.requests_received == n

        flaky.simulator.config = dataclasses.replace(flaky_cfg, error_rate=0.0)  # fixed
        resumed = batcher.run(job, retry_errors="retryable")
        assert flaky.simulator.stats.requests_received == n + failed  # its errors only
        assert good.simulator.stats.requests_received == 2 * n  # nothing of a and b again
    assert resumed.exit_code == 0 and resumed.stats.resent == failed
    assert resumed.table is not None
    assert check_once_each(resumed.table.to_pylist(), n) == {(v, "ok"): n for v in "abc"}


def rows_of(output: Path) -> list[dict[str, Any]]:
    """(the line's id, variant, status) of each line of a JSONL output."""
    return [
        {"custom_id": r["batcher"]["line_id"], "variant": r["batcher"]["variant"],
         "status": r["batcher"]["status"]}
        for r in jsonl(output)
    ]  # fmt: skip


@pytest.mark.slow
def test_cli_sweep_with_a_flaky_endpoint_then_a_resume(tmp_path: Path) -> None:
    n = 24
    write_input(tmp_path / "in.jsonl", n)

    def job_file(good: str, flaky: str) -> Path:
        variants = "".join(
            f'\n[[variants]]\nname = "{v}"\nendpoint = "{e}"\ntemperature = {t}\n'
            for v, e, t in (("a", "good", 0), ("b", "good", 1), ("c", "flaky", 0))
        )
        return write_job(tmp_path / "job.toml", f"""
[job]
input = "in.jsonl"
output = "o.jsonl"
[[endpoints]]
name = "good"
base_url = "{good}"
[[endpoints]]
name = "flaky"
base_url = "{flaky}"
concurrency = 4
[request]
model = "gpt-4o-mini"
max_tokens = 16
[retry]
max_attempts = 1
{variants}""")  # fmt: skip

    with sim_process() as good:
        with sim_process("--error-rate", "0.5", "--error-kinds", "500,502", "--seed", "5") as bad:
            first = run_batcher("run", str(job_file(good, bad)), "--no-progress")
            bad_seen = sim_stats(bad)["requests_received"]
        assert first.returncode == 1, first.stderr
        statuses = check_once_each(rows_of(tmp_path / "o.jsonl"), n)
        failed = statuses[("c", "error")]
        assert statuses[("a", "ok")] == statuses[("b", "ok")] == n and 3 <= failed <= 21
        assert bad_seen == n and "    a  24 ok, 0 error\n    b  24 ok, 0 error\n" in first.stderr

        with sim_process() as fixed:  # the flaky endpoint, repaired (another port)
            job = job_file(good, fixed)
            resumed = run_batcher("run", str(job), "--no-progress", "--retry-errors",
                                  "--only-retryable")  # fmt: skip
            assert sim_stats(fixed)["requests_received"] == failed
        assert sim_stats(good)["requests_received"] == 2 * n
    assert resumed.returncode == 0, resumed.stderr
    assert f"{3 * n - failed} skipped (done before), {failed} re-sent, 0 new" in resumed.stderr
    assert check_once_each(rows_of(tmp_path / "o.jsonl"), n) == {(v, "ok"): n for v in "abc"}

    report = run_batcher("report", str(tmp_path / "o.jsonl"))
    assert report.returncode == 0, report.stderr
    table = report.stdout.split("by variant")[1].splitlines()
    assert table[1].split()[:5] == ["variant", "model", "requests", "ok", "error"]
    assert [line.split()[:5] for line in table[2:5]] == [
        [v, "gpt-4o-mini", str(n), str(n), "0.0%"] for v in "abc"
    ]


def test_estimate_has_a_row_per_variant_and_counts_a_rejected_line_once(tmp_path: Path) -> None:
    from batcher.cost.estimate import estimate

    src = write_input(tmp_path / "in.jsonl", 4)
    with src.open("a", encoding="utf-8") as f:
        f.write("[]\n")
    job = sweep(tmp_path, [{"name": n, "base_url": "sim"} for n in ("good", "flaky")])
    job["variants"][2] = {**VARIANTS[2], "n": 3}
    est = estimate(job_from_dict(job))
    assert est.requests == 12 and est.rejected == 1
    assert {name: v.requests for name, v in est.by_variant.items()} == {"a": 4, "b": 4, "c": 4}
    a, c = est.by_variant["a"], est.by_variant["c"]
    # max_tokens 16 from [request], 8 on the line of r00002; c asks for 3 choices of each
    assert (a.output_tokens_high, c.output_tokens_high) == (56, 3 * 56)
    assert est.by_model["gpt-4o-mini"].requests == 8 and est.by_model["gpt-4.1-mini"].requests == 4


def test_report_compares_variants_in_job_order(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 4)
    job = mock_job(tmp_path, [{"name": "zeta"}, {"name": "alpha", "temperature": 1}])
    job["job"]["output"] = str(tmp_path / "o.parquet")
    result = batcher.run(job, transport=httpx.MockTransport(Counting()))
    from batcher.output.report import build_report
    from batcher.output.report_text import format_report

    report, _ = build_report(result.output)
    assert list(report.variants) == ["zeta", "alpha"]  # as the job lists them
    zeta = report.variants["zeta"]
    assert (zeta.requests, zeta.ok, zeta.error_rate, zeta.prompt_tokens) == (4, 4, 0.0, 12)
    assert zeta.finish_reasons == {"stop": 4} and zeta.latency_p50_s is not None
    text = format_report(report)
    assert "zeta" in text.split("by variant")[1] and "stop 4" in text
    columns = pq.read_table(result.output).column_names
    assert columns[-4:] == ["variant", "choices_asked", "batch_id", "messages"]


def test_the_budget_counts_every_variant(tmp_path: Path) -> None:
    """One cap for the whole sweep: it stops all variants together, never passed; a higher cap
    finishes the rest and pays for nothing twice."""
    write_input(tmp_path / "in.jsonl", 6)
    job = mock_job(tmp_path, [{"name": "v1"}, {"name": "v2", "seed": 1}, {"name": "v3"}])
    job["request"] = {"model": "m", "max_tokens": 1}
    job["limits"] = {"concurrency": 2}
    job["pricing"] = {"m": {"input": 10_000.0, "output": 10_000.0}}  # an answer: 5 tokens, $0.05
    server = Counting()
    capped = batcher.run(job, transport=httpx.MockTransport(server), max_cost_usd=1.0)
    sent = sum(server.calls.values())
    assert capped.exit_code == 3 and "--max-cost" in (capped.stats.stop_reason or "")
    assert 6 < sent < 18  # more than one variant's 6 requests were under the one cap
    assert capped.stats.cost_usd == pytest.approx(0.05 * sent) and len(capped.stats.variant_ok) >= 2
    finished = batcher.run(job, transport=httpx.MockTransport(server), max_cost_usd=100.0)
    assert finished.exit_code == 0 and sum(server.calls.values()) == 18
    assert finished.stats.skipped == sent


@pytest.mark.slow
def test_a_slow_endpoint_holds_back_only_its_own_variant(tmp_path: Path) -> None:
    """One answer at a time, 150 ms each, for "slow"; the "fast" variant does not wait for it:
    all its answers are in before the slow variant's third."""
    write_input(tmp_path / "in.jsonl", 8)
    with running_sim(SimConfig(latency_ms=150)) as slow, running_sim() as fast:
        job = {
            "job": {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "o.parquet")},
            "endpoints": [{"name": "slow", "base_url": slow.base_url, "concurrency": 1},
                          {"name": "fast", "base_url": fast.base_url, "concurrency": 1}],
            "request": {"model": "gpt-4o-mini"},
            "variants": [{"name": "slow", "endpoint": "slow"},
                         {"name": "fast", "endpoint": "fast"}],
        }  # fmt: skip
        result = batcher.run(job)
    assert result.exit_code == 0 and result.table is not None
    done = {v: sorted(r["finished_at"] for r in result.table.to_pylist() if r["variant"] == v)
            for v in ("slow", "fast")}  # fmt: skip
    assert len(done["fast"]) == len(done["slow"]) == 8
    assert done["fast"][-1] < done["slow"][2]


@pytest.mark.slow
def test_stdin_is_read_once_per_variant(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 3)
    job = write_job(tmp_path / "job.toml", """
[job]
input = "-"
output = "o.jsonl"
[endpoint]
base_url = "sim"
[request]
model = "gpt-4o-mini"
[[variants]]
name = "one"
[[variants]]
name = "two"
temperature = 1
""")  # fmt: skip
    done = run_batcher("run", str(job), "--no-progress", stdin=src.read_text(encoding="utf-8"))
    assert done.returncode == 0, done.stderr
    assert sorted((r["custom_id"], r["variant"]) for r in rows_of(tmp_path / "o.jsonl")) == [
        (f"r{i:05d}", v) for i in range(3) for v in ("one", "two")
    ]


@pytest.mark.slow
def test_a_variant_whose_endpoint_stays_down_is_left_for_a_rerun(tmp_path: Path) -> None:
    """Its endpoint unreachable past the outage patience: the other variant finishes, that
    one's requests are not recorded as failed, the run ends resumable (exit 3)."""
    write_input(tmp_path / "in.jsonl", 4)
    with running_sim() as alive:
        job: dict[str, Any] = {
            "job": {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "o.jsonl")},
            "endpoints": [{"name": "alive", "base_url": alive.base_url},
                          {"name": "dead", "base_url": f"http://127.0.0.1:{free_port()}/v1"}],
            "request": {"model": "m"},
            "limits": {"concurrency": 2},
            "retry": {"max_attempts": 20, "backoff_initial_s": 0.01, "backoff_max_s": 0.02,
                      "outage_patience_s": 1.0},
            "variants": [{"name": "up", "endpoint": "alive"},
                         {"name": "down", "endpoint": "dead"}],
        }  # fmt: skip
        stopped = batcher.run(job)
        assert stopped.exit_code == 3 and "dead was unreachable" in stopped.summary
        assert sorted(rows_of(stopped.output), key=lambda r: r["custom_id"]) == [
            {"custom_id": f"r{i:05d}", "variant": "up", "status": "ok"} for i in range(4)
        ]
        job["endpoints"][1]["base_url"] = alive.base_url  # it is back
        again = batcher.run(job)
    assert again.exit_code == 0 and again.stats.skipped == 4 and again.stats.submitted == 4
