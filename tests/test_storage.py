"""``batcher.storage``: URIs kept as text, globs expanded in sorted order, a store's errors
as one line without credentials, the S3 endpoint from the environment."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest

from batcher import storage
from batcher.errors import InputError
from batcher.job_file import job_from_dict, with_overrides


def test_a_uri_given_as_input_or_output_is_kept_whole() -> None:
    job = job_from_dict(
        {"job": {"input": "s3://bucket/prompts/in.jsonl", "output": "gs://b/o.parquet"}},
        base_dir=Path("/jobs"),
    )
    assert job.input == "s3://bucket/prompts/in.jsonl"  # not s3:/bucket/... nor /jobs/s3:/...
    assert job.output == "gs://b/o.parquet"
    job = with_overrides(job, input="s3://other/x.csv", output="out.parquet")
    assert job.input == "s3://other/x.csv"
    assert job.output == Path("out.parquet")


@pytest.mark.parametrize(
    ("text", "uri"),
    [("s3://b/k", True), ("gs://b/k", True), ("hdfs://h/p", True), ("data/in.jsonl", False),
     ("-", False), ("C:/x", False), ("s3:/b/k", False)],
)  # fmt: skip
def test_is_uri(text: str, uri: bool) -> None:
    assert storage.is_uri(text) is uri


def test_a_local_glob_expands_to_its_files_in_sorted_order(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl", "c.csv"):
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "d.jsonl").mkdir()  # a folder matching the pattern is no input file
    assert storage.expand(tmp_path / "*.jsonl") == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    assert storage.expand(tmp_path / "a.jsonl") == [tmp_path / "a.jsonl"]
    with pytest.raises(InputError, match=r"no file matches .*\*\.tsv"):
        storage.expand(tmp_path / "*.tsv")


def test_files_on_gives_one_filesystem_and_its_sorted_paths(tmp_path: Path) -> None:
    for name in ("b.csv", "a.csv"):
        (tmp_path / name).write_text("q\nx\n")
    fs, paths = storage.files_on(tmp_path / "*.csv")
    assert paths == [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]
    assert [fs.get_file_info(p).size for p in paths] == [4, 4]


def test_the_s3_endpoint_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    given = storage._with_endpoint("s3://b/k.jsonl")
    query = urllib.parse.parse_qs(given.partition("?")[2])
    assert query == {"endpoint_override": ["http://127.0.0.1:9000"]}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3.local:9000")  # the service's own wins
    assert "s3.local" in storage._with_endpoint("s3://b/k.jsonl?region=eu-west-1")
    assert storage._with_endpoint("gs://b/k") == "gs://b/k"
    own = "s3://b/k?endpoint_override=other%3A1"
    assert storage._with_endpoint(own) == own  # the URI's own is kept


def test_a_stores_errors_are_short_and_carry_no_credentials() -> None:
    uri = "s3://AKIAX:sekret-canary-1@bucket/k.jsonl"
    denied = OSError("When reading information for key 'k.jsonl': AWS Error ACCESS_DENIED")
    assert storage._reason(denied, uri) == "access denied (check this store's credentials)"
    assert storage._reason(FileNotFoundError("k.jsonl"), uri) == "not found"
    echoed = OSError(f"cannot open {uri}\nsecond line")
    reason = storage._reason(echoed, uri)
    assert "sekret-canary-1" not in reason and "second line" not in reason
    assert storage.shown(uri) == "s3://***@bucket/k.jsonl"


def test_an_output_uri_that_is_the_input_is_refused() -> None:
    from batcher.errors import ConfigError
    from batcher.runner.staging import stage

    job = job_from_dict({"job": {"input": "s3://b/x.jsonl", "output": "s3://b/x.jsonl"}})
    with pytest.raises(ConfigError, match=r"s3://b/x\.jsonl is the input"):
        stage(job)


def test_an_unknown_scheme_is_a_config_error_naming_the_field() -> None:
    from batcher.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        storage.filesystem("nosuchfs://bucket/k", "job.output")
    assert info.value.field == "job.output"
    assert "nosuchfs://bucket/k" in str(info.value)
