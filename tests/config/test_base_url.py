"""Where requests go: --base-url (or an override), then the job file, then $OPENAI_BASE_URL,
then OpenAI's API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batcher.config import DEFAULT_BASE_URL, JobConfig
from batcher.errors import ConfigError
from batcher.job_file import job_from_dict, load_job, with_overrides
from tests.helpers import run_batcher, sim_process, sim_stats, write_input, write_job

LOCAL = "http://127.0.0.1:8080/v1"


def test_without_the_variable_the_default_is_openai() -> None:
    assert job_from_dict({}).endpoint.base_url == DEFAULT_BASE_URL
    assert JobConfig().endpoint.base_url == DEFAULT_BASE_URL


def test_the_variable_is_used_when_neither_flag_nor_job_gives_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", LOCAL)
    assert job_from_dict({}).endpoint.base_url == LOCAL
    assert job_from_dict({"endpoint": {"api_key_env": "K"}}).endpoint.base_url == LOCAL
    assert JobConfig().endpoint.base_url == LOCAL  # a job given by flags alone
    assert with_overrides(JobConfig(), base_url=None).endpoint.base_url == LOCAL


def test_the_job_file_wins_over_the_variable_and_the_flag_over_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", LOCAL)
    job = load_job(write_job(tmp_path / "j.toml", '[endpoint]\nbase_url = "http://job:1/v1"\n'))
    assert job.endpoint.base_url == "http://job:1/v1"
    assert with_overrides(job, base_url="http://flag:2/v1").endpoint.base_url == "http://flag:2/v1"
    sim = job_from_dict({"endpoint": {"base_url": "sim"}})
    assert sim.endpoint.is_sim


def test_endpoints_without_a_base_url_take_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", LOCAL)
    job = job_from_dict(
        {"endpoints": [{"name": "a"}, {"name": "b", "base_url": "http://other:9/v1"}]}
    )
    assert [e.base_url for e in job.all_endpoints] == [LOCAL, "http://other:9/v1"]


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "")
    assert job_from_dict({}).endpoint.base_url == DEFAULT_BASE_URL


def test_a_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "localhost:8080/v1")
    with pytest.raises(ConfigError) as info:
        job_from_dict({})
    assert info.value.field == "endpoint.base_url"
    assert "$OPENAI_BASE_URL" in str(info.value)


@pytest.mark.parametrize("port", ["70000", "-1", "http", "0"])
def test_a_base_url_port_out_of_range_is_named(port: str) -> None:
    # urllib refuses such a port as the request is built: a traceback, or every request failed
    url = f"http://user:secret@127.0.0.1:{port}/v1"
    with pytest.raises(ConfigError) as info:
        job_from_dict({"endpoints": [{"base_url": LOCAL}, {"base_url": url}]})
    assert info.value.field == "endpoints[1].base_url"
    assert "1..65535" in str(info.value) and "secret" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http:///v1", "http://exa mple.com/v1", "https://:8080/v1",
        # no resolver is asked for these: an HTTP client fails at once, or (pyreqwest) as a
        # connection that never comes, waited out for the outage's patience
        "http://a..b/v1", "http://xn--/v1", "http://exa%zzmple.com/v1", "http://.example/v1",
    ],
)  # fmt: skip
def test_a_base_url_without_a_usable_host_is_named(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        job_from_dict({"endpoint": {"base_url": url}})
    assert info.value.field == "endpoint.base_url" and "host" in info.value.reason


@pytest.mark.parametrize("url", ["http://user:secret@[::1/v1", "http://user:secret@xn--/v1"])
def test_a_base_url_that_cannot_be_parsed_or_resolved_is_a_usage_error(
    tmp_path: Path, url: str
) -> None:
    src = write_input(tmp_path / "in.jsonl", 2)
    proc = run_batcher(
        "run", "-i", str(src), "-o", str(tmp_path / "out.jsonl"), "-m", "m",
        "--base-url", url, "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "endpoint.base_url" in proc.stderr
    assert "Traceback" not in proc.stderr and "secret" not in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_a_base_url_port_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", 2)
    proc = run_batcher(
        "run", "-i", str(src), "-o", str(tmp_path / "out.jsonl"), "-m", "m",
        "--base-url", "http://127.0.0.1:70000/v1", "--no-progress",
        env={"OPENAI_API_KEY": "sk-test-not-real"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "endpoint.base_url" in proc.stderr and "1..65535" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_cli_sends_to_the_variable_unless_the_job_or_the_flag_says_otherwise(
    tmp_path: Path,
) -> None:
    src = write_input(tmp_path / "in.jsonl", 4)
    common = ("run", "-i", str(src), "-m", "m", "--no-progress")
    dead = "http://127.0.0.1:9/v1"  # nothing listens: a run sent there would not end ok
    with sim_process() as url:
        done = run_batcher(*common, "-o", str(tmp_path / "a.jsonl"), env={"OPENAI_BASE_URL": url})
        assert done.returncode == 0, done.stderr
        assert sim_stats(url)["answered_ok"] == 4
        job = write_job(tmp_path / "j.toml", f'[endpoint]\nbase_url = "{url}"\n')
        by_job = run_batcher(
            *common, "-o", str(tmp_path / "b.jsonl"), str(job), env={"OPENAI_BASE_URL": dead}
        )
        assert by_job.returncode == 0, by_job.stderr
        by_flag = run_batcher(
            *common, "-o", str(tmp_path / "c.jsonl"), "--base-url", url,
            env={"OPENAI_BASE_URL": dead},
        )  # fmt: skip
        assert by_flag.returncode == 0, by_flag.stderr
        assert sim_stats(url)["answered_ok"] == 12


@pytest.mark.slow
def test_estimate_resolves_the_base_url_the_same_way(tmp_path: Path) -> None:
    """The provider (and so the price) follows the base URL: Groq's, from the variable."""
    src = write_input(tmp_path / "in.jsonl", 3)
    args = ("estimate", "-i", str(src), "-m", "llama-3.1-8b-instant", "--json")
    groq = {"OPENAI_BASE_URL": "https://api.groq.com/openai/v1"}
    by_variable = json.loads(run_batcher(*args, env=groq).stdout)
    default = json.loads(run_batcher(*args).stdout)
    assert by_variable["unpriced_models"] == [] and by_variable["cost_high_usd"] > 0
    assert default["unpriced_models"] == ["llama-3.1-8b-instant"]
