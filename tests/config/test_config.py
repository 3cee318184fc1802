"""Job files: loading, path resolution, flag overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from batcher.config import EndpointConfig, JobConfig
from batcher.errors import ConfigError
from batcher.job_file import job_from_dict, load_job, with_overrides
from tests.helpers import run_batcher

ROOT = Path(__file__).parents[2]


def write_job(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_demo_job_loads_with_paths_relative_to_the_job_file() -> None:
    job = load_job(ROOT / "jobs" / "demo.toml")
    assert job.endpoint.is_sim
    assert job.input == (ROOT / "sample_data" / "prompts.jsonl").resolve()
    assert job.output == (ROOT / "out" / "demo.parquet").resolve()
    assert job.request["model"] == "gpt-4o-mini"
    assert job.limits.concurrency == 32


@pytest.mark.parametrize("name", ["demo.toml", "openai.toml", "vllm.toml"])
def test_every_shipped_job_is_valid(name: str) -> None:
    assert isinstance(load_job(ROOT / "jobs" / name), JobConfig)


def test_flags_override_the_job(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, '[request]\nmodel = "a"\n[limits]\nconcurrency = 4\n'))
    job = with_overrides(
        job, model="b", concurrency=8, input="x.jsonl", rpm=None, timeout_s=5.0, grace_s=2.5
    )
    assert job.grace_s == 2.5
    assert job.request["model"] == "b"
    assert job.limits.concurrency == 8
    assert job.input == Path("x.jsonl")
    assert job.retry.timeout_s == 5.0


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[limits]\nconcurrency = 0\n", "limits.concurrency"),
        ("[limits]\nconcurrency = 1.5\n", "limits.concurrency"),
        ("[limits]\nrpm = -5\n", "limits.rpm"),
        ("[limits]\nconcurency = 5\n", "limits.concurency"),
        ("[retry]\nmax_attempts = 0\n", "retry.max_attempts"),
        ("[retry]\ntimeout_s = 0\n", "retry.timeout_s"),
        ("[retry]\nbackoff_initial_s = 10\nbackoff_max_s = 1\n", "retry.backoff_max_s"),
        ('[request]\ntemperature = "hot"\n', "request.temperature"),
        ("[request]\nn = 0\n", "request.n"),
        ('[endpoint]\nbase_url = "ftp://x"\n', "endpoint.base_url"),
        ("[endpoint]\nheaders = { a = 1 }\n", "endpoint.headers"),
        ("[job]\ninput = 3\n", "job.input"),
        ("[job]\ngrace_s = -1\n", "job.grace_s"),
        ('[job]\ngrace_s = "long"\n', "job.grace_s"),
        ('[jobs]\nname = "x"\n', "jobs"),
    ],
)
def test_bad_job_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_job(write_job(tmp_path, text))
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job(write_job(tmp_path, "[job\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "missing.toml")


@pytest.mark.parametrize("name", ["prompts.jsonl", "in.JSONL.gz", "questions.csv", "t.parquet"])
def test_an_input_given_as_the_job_is_named_as_data(tmp_path: Path, name: str) -> None:
    """``batcher run prompts.jsonl`` (no --input) said "not valid TOML: Invalid statement"."""
    data = tmp_path / name
    data.write_text('{"prompt": "hi"}\n')
    with pytest.raises(ConfigError, match=r"is data, not a job file .*--input") as info:
        load_job(data)
    assert info.value.field == "job"
    proc = run_batcher("run", str(data))
    assert proc.returncode == 2 and "is data, not a job file" in proc.stderr


def test_bad_override_is_checked_too() -> None:
    with pytest.raises(ConfigError) as info:
        with_overrides(JobConfig(), base_url="localhost:8000")
    assert info.value.field == "endpoint.base_url"


def test_require_paths_names_the_missing_one() -> None:
    with pytest.raises(ConfigError) as info:
        JobConfig(output=Path("o.jsonl")).require_paths()
    assert info.value.field == "job.input"


@pytest.mark.parametrize("value", ["sk-secret\n", "sk-sec\r\nret", " sk-secret"])
def test_a_header_value_with_a_stray_newline_is_refused_without_showing_it(value: str) -> None:
    raw = {
        "job": {"input": "in.jsonl", "output": "out.parquet"},
        "endpoint": {"base_url": "http://127.0.0.1:1/v1", "headers": {"api-key": value}},
    }
    with pytest.raises(ConfigError) as info:
        job_from_dict(raw)
    assert info.value.field == "endpoint.headers.api-key"
    assert "sk-sec" not in str(info.value)


def test_a_job_made_in_code_has_its_headers_checked_too() -> None:
    endpoint = EndpointConfig(base_url="http://127.0.0.1:1/v1", headers={"api-key": "sk-sec\n"})
    with pytest.raises(ConfigError) as info:
        with_overrides(JobConfig(endpoint=endpoint), model="m")
    assert info.value.field == "endpoint.headers.api-key"
    assert "sk-sec" not in str(info.value)


@pytest.mark.parametrize("name", ["api key", "x-key;", "x:y", ""])
def test_a_header_name_that_is_not_a_token_is_refused(name: str) -> None:
    raw = {
        "job": {"input": "in.jsonl", "output": "out.parquet"},
        "endpoint": {"base_url": "http://127.0.0.1:1/v1", "headers": {name: "v"}},
    }
    with pytest.raises(ConfigError) as info:
        job_from_dict(raw)
    assert info.value.field == "endpoint.headers"


@pytest.mark.parametrize("name", ["concurrency", "rpm", "tpm"])
def test_a_limit_flag_every_endpoint_overrides_is_refused_not_ignored(name: str) -> None:
    """``batcher.run("jobs/sweep.toml", concurrency=32)`` ran at the endpoints' own
    concurrency: the flag sets [limits], which an endpoint with its own value never takes."""
    own = {"name": "a", "base_url": "sim", name: 5}
    job = job_from_dict({"endpoints": [own, own | {"name": "b"}], "request": {"model": "m"}})
    with pytest.raises(ConfigError) as caught:
        with_overrides(job, **{name: 7})
    assert caught.value.field == f"--{name}" and "set it there" in caught.value.reason
    # an endpoint without its own takes the flag: accepted
    mixed = job_from_dict(
        {"endpoints": [own, {"name": "b", "base_url": "sim"}], "request": {"model": "m"}}
    )
    assert getattr(with_overrides(mixed, **{name: 7}).limits, name) == 7
