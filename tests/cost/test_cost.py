"""Cost: prices by model, job overrides, cost_usd on records, and the --max-cost cap."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from batcher.config import JobConfig
from batcher.cost.pricing import Price, Pricer, parse_pricing
from batcher.errors import ConfigError
from batcher.job_file import job_from_dict
from batcher.output.writers import read_results
from batcher.records import Usage
from batcher.runner.run import run_job
from batcher.sim.app import Simulator
from tests.helpers import run_batcher, write_input

#: The least answer that is kept as ok: one choice, with its message.
ANSWER = {
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}
    ],
    "usage": {"total_tokens": 1},
}


def test_genai_prices_lookup_prices_cached_tokens_lower() -> None:
    pricer = Pricer(provider_api_url="https://api.openai.com/v1")
    price = pricer.price("gpt-4o-mini")
    assert price is not None and price.source.startswith("genai-prices openai/")
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000, cached_tokens=500_000)
    full = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000)
    with_cache, without = price.cost(usage), price.cost(full)
    assert with_cache is not None and without is not None
    assert with_cache == pytest.approx(without - 500_000 * (price.input - price.cached) / 1e6)
    assert with_cache < without


def test_unknown_model_has_no_cost_not_zero() -> None:
    pricer = Pricer()
    assert pricer.cost("my-finetune-xyz", Usage(prompt_tokens=10, completion_tokens=5)) is None
    assert pricer.unknown_models == ["my-finetune-xyz"]


def test_job_pricing_overrides_zero_prices_and_batch_discount() -> None:
    models, discount = parse_pricing(
        {"batch_discount": True, "local": {"input": 0, "output": 0},
         "gpt-4o-mini": {"input": 1.0, "output": 2.0, "cached": 0.5}}
    )  # fmt: skip
    pricer = Pricer(models, batch_discount=discount)
    assert pricer.cost("local", Usage(prompt_tokens=10, completion_tokens=5)) == 0.0
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000, cached_tokens=1_000_000)
    assert pricer.cost("gpt-4o-mini", usage) == pytest.approx((0.5 + 2.0) * 0.5)


@pytest.mark.parametrize(
    ("table", "field"),
    [({"m": {"input": -1, "output": 1}}, "pricing.m.input"),
     ({"m": {"input": 1}}, "pricing.m.output"),
     ({"m": {"input": 1, "output": 1, "extra": 1}}, "pricing.m.extra"),
     ({"m": 3}, "pricing.m"), ({"batch_discount": "yes"}, "pricing.batch_discount")],
)  # fmt: skip
def test_bad_pricing_names_the_field(table: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        job_from_dict({"pricing": table})
    assert info.value.field == field


def test_worst_case_is_prompt_plus_whole_budget() -> None:
    price = Price(input=2.0, output=10.0, cached=1.0, source="t")
    assert price.worst_case(1000, 500) == pytest.approx((1000 * 2 + 500 * 10) / 1e6)


def job(tmp_path: Path, src: Path, **tables: dict[str, Any]) -> JobConfig:
    raw: dict[str, dict[str, Any]] = {
        "job": {"input": str(src), "output": str(tmp_path / "o.parquet"), "progress": False},
        "endpoint": {"base_url": "http://sim.test/v1"},
        "request": {"model": "gpt-4o-mini", "max_tokens": 40},
        "limits": {"concurrency": 8},
    }
    for name, table in tables.items():
        raw.setdefault(name, {}).update(table)
    return job_from_dict(raw)


def test_every_record_carries_its_cost_and_the_summary_totals_it(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 30)
    printed = io.StringIO()
    report = run_job(
        job(tmp_path, src), transport=httpx.ASGITransport(app=Simulator()), stream=printed
    )
    rows = list(read_results(report.output))
    price = Pricer().price("gpt-4o-mini")
    assert price is not None
    for row in rows:
        expected = row["prompt_tokens"] * price.input + row["completion_tokens"] * price.output
        assert row["cost_usd"] == pytest.approx(expected / 1e6)
    total = sum(r["cost_usd"] for r in rows)
    assert report.stats.cost_usd == pytest.approx(total)
    assert f"cost      ${total:.4f} (gpt-4o-mini ${total:.4f})" in printed.getvalue()


def test_unknown_model_warns_once_and_leaves_cost_empty(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 5)
    printed = io.StringIO()
    report = run_job(
        job(tmp_path, src, request={"model": "house-model-7b"}),
        transport=httpx.ASGITransport(app=Simulator()),
        stream=printed,
    )
    assert {r["cost_usd"] for r in read_results(report.output)} == {None}
    assert printed.getvalue().count("no price known for model 'house-model-7b'") == 1


def test_max_cost_is_never_passed_and_a_higher_cap_resumes(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 200)
    price = Pricer().price("gpt-4o-mini")
    assert price is not None
    cap = 0.0006  # room for roughly a fifth of the requests' worst case
    first = run_job(
        job(tmp_path, src, limits={"max_cost_usd": cap}),
        transport=httpx.ASGITransport(app=Simulator()),
        stream=io.StringIO(),
    )
    assert first.exit_code == 3
    assert "--max-cost $0.0006 reached" in first.summary
    spent = sum(r["cost_usd"] for r in read_results(first.output))
    assert 0 < spent <= cap
    assert 0 < first.stats.done < 200

    second = run_job(
        job(tmp_path, src, limits={"max_cost_usd": 1.0}),
        transport=httpx.ASGITransport(app=Simulator()),
        stream=io.StringIO(),
    )
    assert second.exit_code == 0
    rows = list(read_results(second.output))
    assert len(rows) == 200
    assert second.stats.skipped == first.stats.done


def test_max_cost_with_an_unpriced_model_is_a_configuration_error(tmp_path: Path) -> None:
    """Decided before the run: nothing sent, nothing written, the model and [pricing] named."""
    src = write_input(tmp_path / "in.jsonl", 5)
    sim = Simulator()
    capped = job(tmp_path, src, request={"model": "house-model-7b"}, limits={"max_cost_usd": 5.0})
    with pytest.raises(ConfigError) as raised:
        run_job(capped, transport=httpx.ASGITransport(app=sim), stream=io.StringIO())
    assert str(raised.value).startswith("--max-cost: no price known for model 'house-model-7b'")
    assert '[pricing."house-model-7b"]' in str(raised.value)
    assert sim.stats.requests_received == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.slow
def test_cli_max_cost_with_an_unpriced_model_exits_2(tmp_path: Path) -> None:
    from tests.helpers import run_batcher

    src = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "o.jsonl"
    proc = run_batcher(
        "run", "--input", str(src), "--output", str(out), "--model", "house-model-7b",
        "--base-url", "sim", "--max-cost", "1", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("batcher: error: --max-cost: no price known for model")
    assert "resume" not in proc.stderr and not out.exists()


def test_a_line_naming_an_unpriced_model_stops_with_exit_2_if_nothing_was_sent(
    tmp_path: Path,
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi", "model": "house-model-7b"}\n{"prompt": "ho"}\n')
    sim = Simulator()
    with pytest.raises(
        ConfigError, match=r"^--max-cost: no price known for model 'house-model-7b'"
    ):
        run_job(
            job(tmp_path, src, limits={"max_cost_usd": 5.0, "concurrency": 1}),
            transport=httpx.ASGITransport(app=sim),
            stream=io.StringIO(),
        )
    assert sim.stats.requests_received == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing written


@pytest.mark.slow
def test_cli_max_cost_stops_the_demo_and_reports_it(tmp_path: Path) -> None:
    from tests.helpers import run_batcher

    out = tmp_path / "demo.parquet"
    proc = run_batcher(
        "run", "jobs/demo.toml", "--output", str(out), "--max-cost", "0.0005", "--no-progress"
    )
    assert proc.returncode == 3, proc.stderr
    assert "--max-cost $0.0005 reached" in proc.stderr
    spent = sum(r["cost_usd"] or 0.0 for r in read_results(out))
    assert 0 < spent <= 0.0005
    # the same command would stop again at once: the way on is a higher cap
    assert "again with a higher --max-cost to continue" in proc.stderr.splitlines()[-1]
    status = run_batcher("status", str(out))
    assert "run the same batcher run command again with a higher --max-cost" in status.stdout


def test_max_cost_needs_a_completion_limit_to_bound_answers(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 4, start=2)  # a line with max_tokens first
    sim = Simulator()
    capped = job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / "o.jsonl"), "progress": False},
            "endpoint": {"base_url": "http://sim.test/v1"},
            "request": {"model": "gpt-4o-mini"},
            "limits": {"max_cost_usd": 1.0},
        }
    )
    # write_input's batch-form lines carry max_tokens; the others do not: the first of those
    # stops the run (one was sent: stopped early, not a configuration error)
    report = run_job(capped, transport=httpx.ASGITransport(app=sim), stream=io.StringIO())
    assert report.exit_code == 3
    assert "--max-cost: needs max_tokens" in report.summary


def test_max_cost_without_a_completion_limit_says_so_once_when_nothing_was_sent(
    tmp_path: Path,
) -> None:
    """The field is named once: not ``--max-cost: --max-cost needs max_tokens``."""
    src = write_input(tmp_path / "in.jsonl", 2)  # the first line has no max_tokens
    out = tmp_path / "o.jsonl"
    args = ["run", "-i", str(src), "-o", str(out), "-m", "gpt-4o-mini", "--base-url", "sim"]
    proc = run_batcher(*args, "--max-cost", "1", "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert "batcher: error: --max-cost: needs max_tokens" in proc.stderr
    assert "--max-cost: --max-cost" not in proc.stderr and "Traceback" not in proc.stderr


def test_prompt_bound_counts_tools_schemas_and_images() -> None:
    from batcher.input.requests import IMAGE_TOKENS_BOUND, prompt_bound

    image = {"type": "image_url", "image_url": {"url": "data:..."}}
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    }
    assert prompt_bound(body, 10) >= 10 + IMAGE_TOKENS_BOUND + 40
    # a plain message: its role (a token) and a token of slack beyond the count
    assert prompt_bound({"messages": [{"role": "user", "content": "x"}]}, 10) == 12


def test_worst_case_uses_the_highest_tier() -> None:
    tiered = Price(input=1.25, output=5.0, cached=0.3, source="t", input_max=2.5, output_max=10.0)
    assert tiered.worst_case(1_000_000, 1_000_000) == pytest.approx(12.5)
    pricer = Pricer()
    gemini = pricer.price("gemini-1.5-pro")
    if gemini is not None and gemini.input_max is not None:  # tiered in genai-prices' data
        assert gemini.input_max > gemini.input


def test_job_price_applies_when_the_server_answers_with_a_dated_name(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={
            "model": "gpt-4o-2024-08-06",
            "choices": [{"message": {"role": "assistant", "content": "x"}}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000},
        })  # fmt: skip

    src = write_input(tmp_path / "in.jsonl", 2)
    free = job(tmp_path, src, request={"model": "gpt-4o", "max_tokens": 1000},
               pricing={"gpt-4o": {"input": 0, "output": 0}})  # fmt: skip
    report = run_job(free, transport=httpx.MockTransport(handler), stream=io.StringIO())
    assert {r["cost_usd"] for r in read_results(report.output)} == {0.0}
    # without the override the dated name is priced exactly by genai-prices
    paid = job(tmp_path, src, request={"model": "gpt-4o", "max_tokens": 1000})
    report = run_job(paid, transport=httpx.MockTransport(handler), stream=io.StringIO(),
                     restart=True)  # fmt: skip
    assert all(r["cost_usd"] > 0 for r in read_results(report.output))


def test_a_second_account_error_does_not_cut_off_answers_in_flight(tmp_path: Path) -> None:
    import anyio

    in_flight = 0
    all_four = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight
        if b"Question 0:" in request.content:  # the probe: a good answer
            return httpx.Response(200, json=ANSWER)
        in_flight += 1
        if in_flight == 4:
            all_four.set()
        await all_four.wait()  # the refusals come once all four are in flight
        if b"Question 1:" in request.content or b"Question 2:" in request.content:
            return httpx.Response(401, json={"error": {"code": "invalid_api_key"}})
        await anyio.sleep(0.3)  # the ok answers come well after both refusals
        return httpx.Response(200, json=ANSWER)

    src = write_input(tmp_path / "in.jsonl", 5)
    run = job(tmp_path, src, limits={"concurrency": 4})
    report = run_job(run, transport=httpx.MockTransport(handler), stream=io.StringIO())
    assert report.exit_code == 3
    ids = {r["custom_id"] for r in read_results(report.output)}
    assert ids == {"r00000", "r00003", "r00004"}  # the slow ok ones finished and were recorded


def test_reasoning_tokens_are_billed_as_the_output_they_are_part_of() -> None:
    price = Price(input=1.0, output=4.0, cached=0.5, source="t")
    plain = Usage(prompt_tokens=100, completion_tokens=1000)
    reasoning = Usage(prompt_tokens=100, completion_tokens=1000, reasoning_tokens=800)
    # OpenAI reports reasoning inside completion_tokens and bills it at the output rate
    assert price.cost(reasoning) == price.cost(plain) == pytest.approx((100 + 4000) / 1e6)


def test_progress_bar_shows_the_spend_so_far() -> None:
    from batcher.records import Result
    from batcher.runner.progress import Progress
    from batcher.runner.stats import RunStats

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stats = RunStats()
    stats.add(Result(custom_id="a", line=1, status="ok", model="m", attempts=1, latency_s=0.1,
                     started_at=0.0, finished_at=0.1, usage=Usage(total_tokens=5),
                     cost_usd=0.0123))  # fmt: skip
    screen = Terminal()
    bar = Progress(stats, total=2, stream=screen)
    bar.advance()
    bar.close()
    assert "$0.0123" in screen.getvalue()


@pytest.mark.parametrize("cap", [None, 10.0])
def test_a_slow_price_lookup_never_holds_up_the_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: float | None
) -> None:
    """A lookup takes ~0.3 s (genai-prices loading its tables): it runs in a thread while the
    requests go out, once per model, and every record is still priced. (Under a cost cap the
    requests wait for the price, which the budget needs: there the lookup is not held.)"""
    looked_up: list[str] = []
    sent_before_the_price: list[int] = []
    four_sent = threading.Event()

    def slow_lookup(model: str, api_url: str | None = None) -> Price:
        looked_up.append(model)
        if cap is None:  # held until a pool's worth of requests went out: only a loop that
            four_sent.wait(timeout=30)  # goes on meanwhile sends them
        sent_before_the_price.append(len(sent))
        return Price(input=1.0, output=2.0, cached=0.5, source="test")

    monkeypatch.setattr("batcher.cost.pricing.lookup_price", slow_lookup)
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if len(sent) >= 4:
            four_sent.set()
        choice = {"message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        return httpx.Response(200, json={"model": "gpt-4o-mini", "choices": [choice],
                                         "usage": usage})  # fmt: skip

    src = write_input(tmp_path / "in.jsonl", 12)
    limits = {"concurrency": 4} if cap is None else {"concurrency": 4, "max_cost_usd": cap}
    report = run_job(job(tmp_path, src, limits=limits), transport=httpx.MockTransport(handler),
                     stream=io.StringIO())  # fmt: skip
    assert report.exit_code == 0 and looked_up == ["gpt-4o-mini"]
    if cap is None:  # the lookup runs while the first requests are out
        assert sent_before_the_price[0] >= 4
    expected = (10 * 1.0 + 5 * 2.0) / 1e6
    assert [r["cost_usd"] for r in read_results(report.output)] == [pytest.approx(expected)] * 12


def test_prices_found_are_cached_on_disk_by_genai_prices_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def lookup(model: str, api_url: str | None = None) -> Price | None:
        calls.append(model)
        return Price(input=1.0, output=2.0, cached=0.5, source="test") if model == "m" else None

    monkeypatch.setattr("batcher.cost.pricing.lookup_price", lookup)
    monkeypatch.setenv("BATCHER_CACHE_DIR", str(tmp_path / "cache"))
    first = Pricer()
    assert first.price("m") is not None and first.price("unknown-x") is None
    assert calls == ["m", "unknown-x"] and (tmp_path / "cache" / "prices.json").exists()
    again = Pricer()  # another run: read from the file, the unknown model too
    assert again.price("m") == first.price("m") and again.price("unknown-x") is None
    assert calls == ["m", "unknown-x"] and again.unknown_models == ["unknown-x"]
    assert Pricer(provider_api_url="https://api.example/v1").price("m") is not None
    assert calls[-1] == "m"  # another endpoint URL may mean another provider: looked up
    secret = "sk-" + "s3cr3t" * 4
    Pricer(provider_api_url=f"https://user:{secret}@api.example/v1?key={secret}").price("m")
    cached = (tmp_path / "cache" / "prices.json").read_text()
    assert secret not in cached and "https://api.example/v1" in cached
    assert calls.count("m") == 2  # the same endpoint as above once the secrets are cut off
    monkeypatch.setattr("importlib.metadata.version", lambda name: "999.0")
    Pricer().price("m")  # genai-prices upgraded: looked up again
    assert calls.count("m") == 3
    monkeypatch.setenv("BATCHER_CACHE_DIR", "")  # off
    Pricer().price("m")
    assert calls.count("m") == 4
    (tmp_path / "cache" / "prices.json").write_text("{not json")  # a damaged cache is ignored
    monkeypatch.setenv("BATCHER_CACHE_DIR", str(tmp_path / "cache"))
    assert Pricer().price("m") is not None and calls.count("m") == 5


def test_a_server_naming_a_new_model_in_every_answer_cannot_force_a_lookup_each() -> None:
    from batcher.cost.pricing import MAX_ANSWERING_MODELS
    from batcher.records import Usage

    pricer = Pricer({"asked": Price(input=1.0, output=2.0, cached=1.0, source="t")})
    looked_up: list[str] = []

    def lookup(model: str) -> None:
        looked_up.append(model)

    pricer._lookup = lookup  # type: ignore[method-assign]
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=0, total_tokens=1_000_000)
    for i in range(3 * MAX_ANSWERING_MODELS):
        pricer.cost_of("unpriced", f"model-{i}", usage)
    assert len([m for m in looked_up if m.startswith("model-")]) == MAX_ANSWERING_MODELS
    assert pricer.ready("unpriced", "model-9999", usage)  # no lookup waits for this name
    # past the cap an answer is priced as the model asked for
    assert pricer.cost_of("asked", "model-9999", usage) == pytest.approx(1.0)
