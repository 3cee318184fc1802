"""Inputs and outputs in object storage, end to end: ``batcher run`` processes against an
S3-compatible server (moto's, on loopback) found through ``AWS_ENDPOINT_URL``, answers from
the built-in simulator (``base_url = "sim"``)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batcher.output.journal import journal_path
from batcher.output.provenance import PREFIX
from batcher.runner.staging import output_work_path
from tests.helpers import ROOT, batcher_cmd, run_batcher, sim_process, sim_stats, write_job
from tests.s3_server import S3_CANARY, exists, get, moto_server, put

pytestmark = pytest.mark.timeout(240)


def _lines(n: int, start: int = 0) -> bytes:
    return "".join(
        json.dumps({"custom_id": f"r{i:03d}", "prompt": f"question {i}"}) + "\n"
        for i in range(start, start + n)
    ).encode()


def _job(tmp_path: Path, input_uri: str, output_uri: str, *, latency_ms: int = 0) -> Path:
    return write_job(
        tmp_path / "job.toml",
        f"""
[job]
input = "{input_uri}"
output = "{output_uri}"
progress = false

[endpoint]
base_url = "sim"

[request]
model = "m"
max_tokens = 8

[limits]
concurrency = 4

[sim]
latency_ms = {latency_ms}
""",
    )


def _ids(uri: str) -> list[str]:
    """The ``custom_id`` column of the Parquet object ``uri``, read back from S3."""
    table = pq.read_table(io.BytesIO(get(uri)))
    return [str(v) for v in table.column("custom_id").to_pylist()]


def _no_canary(*texts: str | bytes) -> None:
    for text in texts:
        raw = text.encode() if isinstance(text, str) else text
        assert S3_CANARY.encode() not in raw


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_input_from_a_bucket_output_to_it_killed_resumed_each_id_once(
    tmp_path: Path, s3_bucket: str
) -> None:
    n = 40
    put(f"s3://{s3_bucket}/in/prompts.jsonl", _lines(n))
    out = f"s3://{s3_bucket}/out/answers.parquet"
    job = _job(tmp_path, f"s3://{s3_bucket}/in/prompts.jsonl", out, latency_ms=250)
    local = output_work_path(out)  # the run's work folder, in this test's cache folder
    proc = subprocess.Popen(
        batcher_cmd("run", str(job)), cwd=ROOT, env=dict(os.environ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    journal = journal_path(local)
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") > 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    first_out, first_err = proc.communicate(timeout=30)
    assert not exists(out)  # nothing uploaded: the upload is the commit point
    recorded = journal.read_bytes().count(b"\n") - 1
    assert 0 < recorded < n

    resumed = run_batcher("run", str(job), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{recorded} skipped" in resumed.stderr  # resumed from the local journal
    ids = _ids(out)
    assert sorted(ids) == [f"r{i:03d}" for i in range(n)]  # each id exactly once
    assert exists(out + ".journal")  # beside it: another machine resumes from it
    _no_canary(first_out, first_err, resumed.stdout, resumed.stderr, get(out))
    _no_canary(get(out + ".journal"))
    for path in _files_under(local.parent):  # journal, status file, local output
        _no_canary(path.read_bytes())


def test_a_glob_of_csv_files_is_one_input_numbered_on_across_files(
    tmp_path: Path, s3_bucket: str
) -> None:
    # written out of order: the files are read in sorted order of their URIs
    put(f"s3://{s3_bucket}/in/part-b.csv", b"q\nthird\nfourth\n")
    put(f"s3://{s3_bucket}/in/part-a.csv", b"\xef\xbb\xbfq\nfirst\nsecond")
    put(f"s3://{s3_bucket}/in/other.txt", b"not matched")
    out = f"s3://{s3_bucket}/out/rows.parquet"
    result = run_batcher(
        "run", "--input", f"s3://{s3_bucket}/in/part-*.csv", "--template-user", "Say {q}",
        "--output", out, "--model", "m", "--base-url", "sim", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = pq.read_table(io.BytesIO(get(out)))
    assert [(r["custom_id"], r["line"], r["input"]["q"]) for r in table.to_pylist()] == [
        ("1", 1, "first"), ("2", 2, "second"), ("3", 3, "third"), ("4", 4, "fourth"),
    ]  # fmt: skip
    # the metadata names what the run read and wrote, not the local copies
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    assert metadata[PREFIX + "input"] == f"s3://{s3_bucket}/in/part-*.csv"
    job = json.loads(metadata[PREFIX + "job"])
    assert (job["input"], job["output"]) == (f"s3://{s3_bucket}/in/part-*.csv", out)
    # status and report take the URI: they read its work folder on this machine
    status = run_batcher("status", out)
    assert status.returncode == 0 and "4/4 (100%)" in status.stdout, status.stderr
    report = run_batcher("report", out, "--json")
    assert report.returncode == 0 and json.loads(report.stdout)["requests"] == 4


def test_parquet_files_by_glob_and_a_run_on_another_machine_resumes_from_the_upload(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow as pa

    for name, words in (("a", ["one", "two"]), ("b", ["three"])):
        buffer = io.BytesIO()
        pq.write_table(pa.table({"word": words}), buffer)
        put(f"s3://{s3_bucket}/in/{name}.parquet", buffer.getvalue())
    out = f"s3://{s3_bucket}/out/words.parquet"
    args = (
        "run", "--input", f"s3://{s3_bucket}/in/*.parquet", "--template-user", "Spell {word}",
        "--output", out, "--model", "m", "--base-url", "sim", "--no-progress",
    )  # fmt: skip
    first = run_batcher(*args)
    assert first.returncode == 0, first.stderr
    assert _ids(out) == ["1", "2", "3"]
    # another machine: no work folder of its own, so it starts from the uploaded journal
    monkeypatch.setenv("BATCHER_CACHE_DIR", str(tmp_path / "other-machine"))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"word": ["four"]}), buffer)
    put(f"s3://{s3_bucket}/in/c.parquet", buffer.getvalue())
    second = run_batcher(*args)
    assert second.returncode == 0, second.stderr
    assert "3 skipped (done before), 0 re-sent, 1 new" in second.stderr
    assert _ids(out) == ["1", "2", "3", "4"]


@pytest.mark.parametrize(
    ("flag", "uri"),
    [
        ("--input", "s3://no-such-bucket/prompts.jsonl"),
        ("--input", "s3://{bucket}/missing.jsonl"),
        ("--input", "s3://{bucket}/nothing-*.jsonl"),
        ("--output", "s3://no-such-bucket/out.parquet"),
    ],
)
def test_a_missing_bucket_or_object_is_one_line_exit_2_nothing_sent(
    tmp_path: Path, s3_bucket: str, flag: str, uri: str
) -> None:
    put(f"s3://{s3_bucket}/in.jsonl", _lines(3))
    uri = uri.format(bucket=s3_bucket)
    given = {"--input": f"s3://{s3_bucket}/in.jsonl", "--output": str(tmp_path / "o.parquet")}
    given[flag] = uri
    with sim_process() as url:
        result = run_batcher(
            "run", "--input", given["--input"], "--output", given["--output"], "--model", "m",
            "--base-url", url, "--no-progress",
        )  # fmt: skip
        assert sim_stats(url)["requests_received"] == 0
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_credentials_in_a_uri_are_never_shown(tmp_path: Path, s3_bucket: str) -> None:
    uri = f"s3://AKIATESTBATCHER:{S3_CANARY}@{s3_bucket}/missing.jsonl"
    result = run_batcher(
        "run", "--input", uri, "--output", str(tmp_path / "o.parquet"), "--model", "m",
        "--base-url", "sim", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 2
    assert f"s3://***@{s3_bucket}/missing.jsonl" in result.stderr
    _no_canary(result.stdout, result.stderr)


def test_files_on_a_bucket_reach_it_as_batcher_does(s3_bucket: str) -> None:
    from batcher.storage import files_on

    put(f"s3://{s3_bucket}/p/b.jsonl", b"2\n")
    put(f"s3://{s3_bucket}/p/a.jsonl", b"1\n")
    put(f"s3://{s3_bucket}/p/deeper/c.jsonl", b"3\n")  # `*` stays within its folder
    fs, paths = files_on(f"s3://{s3_bucket}/p/*.jsonl")
    assert paths == [f"{s3_bucket}/p/a.jsonl", f"{s3_bucket}/p/b.jsonl"]
    assert [fs.open_input_stream(p).read() for p in paths] == [b"1\n", b"2\n"]


def test_credentials_the_store_refuses_are_one_line_exit_2_nothing_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(_lines(2))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_CANARY)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    remote_input = ("job.input", "s3://b/in.jsonl", str(tmp_path / "o.parquet"))
    remote_output = ("job.output", str(src), "s3://b/o.parquet")
    with moto_server(checks_keys=True) as endpoint, sim_process() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        for field, given_input, given_output in (remote_input, remote_output):
            result = run_batcher(
                "run", "--input", given_input, "--output", given_output, "--model", "m",
                "--base-url", url, "--no-progress",
            )  # fmt: skip
            uri = given_input if field == "job.input" else given_output
            assert result.returncode == 2
            assert result.stderr.strip().splitlines() == [
                f"batcher: error: {field}: cannot reach {uri}: access denied (check this "
                "store's credentials)"
            ]
            _no_canary(result.stdout, result.stderr)
        assert sim_stats(url)["requests_received"] == 0


def test_the_python_api_reads_and_writes_a_bucket(s3_bucket: str) -> None:
    import batcher

    put(f"s3://{s3_bucket}/in.jsonl", _lines(3))
    out = f"s3://{s3_bucket}/api/out.parquet"
    result = batcher.run(
        input=f"s3://{s3_bucket}/in.jsonl", output=out, base_url="sim", model="m",
        progress=False,
    )  # fmt: skip
    assert result.exit_code == 0
    assert sorted(_ids(out)) == ["r000", "r001", "r002"]
    assert sorted(result.to_pandas()["custom_id"]) == ["r000", "r001", "r002"]


def test_a_machine_whose_journal_is_stale_takes_the_newer_upload(
    tmp_path: Path, s3_bucket: str
) -> None:
    out = f"s3://{s3_bucket}/out/shared.parquet"
    args = ("run", "--input", f"s3://{s3_bucket}/in.jsonl", "--output", out, "--model", "m",
            "--base-url", "sim", "--no-progress")  # fmt: skip
    machine_a = {"BATCHER_CACHE_DIR": str(tmp_path / "a")}
    machine_c = {"BATCHER_CACHE_DIR": str(tmp_path / "c")}
    put(f"s3://{s3_bucket}/in.jsonl", _lines(3))
    assert run_batcher(*args, env=machine_a).returncode == 0
    put(f"s3://{s3_bucket}/in.jsonl", _lines(6))
    other = run_batcher(*args, env=machine_c)  # resumes from A's upload, uploads 6
    assert "3 skipped (done before), 0 re-sent, 3 new" in other.stderr, other.stderr
    again = run_batcher(*args, env=machine_a)  # A's own journal holds 3: the upload is newer
    assert again.returncode == 0, again.stderr
    assert "6 skipped (done before), 0 re-sent, 0 new" in again.stderr, again.stderr
    assert f"  output    {out}\n" in again.stderr  # the URI, not the work file
    assert sorted(_ids(out)) == [f"r{i:03d}" for i in range(6)]
    # a machine with no run of its own: status and report read the upload
    machine_d = {"BATCHER_CACHE_DIR": str(tmp_path / "d")}
    status = run_batcher("status", out, env=machine_d)
    assert status.returncode == 0 and "requests  6 done: 6 ok" in status.stdout, status.stderr
    assert f"output    {out}" in status.stdout and str(tmp_path) not in status.stdout
    report = run_batcher("report", out, "--json", env=machine_d)
    assert report.returncode == 0 and json.loads(report.stdout)["requests"] == 6


def test_both_machines_moved_on_is_refused_exit_2_nothing_sent(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = f"s3://{s3_bucket}/out/both.parquet"
    put(f"s3://{s3_bucket}/in.jsonl", _lines(2))
    monkeypatch.setenv("BATCHER_CACHE_DIR", str(tmp_path / "a"))  # here and in the runs
    with sim_process() as url:
        args = ("run", "--input", f"s3://{s3_bucket}/in.jsonl", "--output", out,
                "--model", "m", "--base-url", url, "--no-progress")  # fmt: skip
        assert run_batcher(*args).returncode == 0
        put(out + ".journal", get(out + ".journal") + b"\n")  # another machine's upload
        with journal_path(output_work_path(out)).open("ab") as f:  # and this one's progress
            f.write(b"\n")
        sent = sim_stats(url)["requests_received"]
        refused = run_batcher(*args)
        assert sim_stats(url)["requests_received"] == sent
    assert refused.returncode == 2
    assert "--restart" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "name", "expected"),
    [
        ("run", "x.parquet", "is a folder (the Ray engine's output?)"),
        ("run", "o.csv", "must end in .jsonl"),
        ("status", "none.parquet", "no run of"),
    ],
)
def test_a_remote_output_refused_names_the_uri_exit_2_nothing_sent(
    s3_bucket: str, command: str, name: str, expected: str
) -> None:
    put(f"s3://{s3_bucket}/x.parquet/part-00000.parquet", b"PAR1")  # a Ray engine's output
    put(f"s3://{s3_bucket}/in.jsonl", _lines(2))
    out = f"s3://{s3_bucket}/{name}"
    with sim_process() as url:
        args = ["--input", f"s3://{s3_bucket}/in.jsonl", "--output", out, "--model", "m",
                "--base-url", url, "--no-progress"]  # fmt: skip
        result = run_batcher("run", *args) if command == "run" else run_batcher(command, out)
        assert sim_stats(url)["requests_received"] == 0
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and out in lines[0], result.stderr
    assert not exists(out)


def _bucket_job(tmp_path: Path, bucket: str, name: str, n: int) -> tuple[str, str, Path]:
    """An input of ``n`` lines and a line the reader rejects, on the bucket; the output beside
    it; the job between them: ``(input URI, output URI, job file)``."""
    src = f"s3://{bucket}/in/{name}.jsonl"
    put(src, _lines(n) + b'{"custom_id": "bad", "messages": "not a list"}\n')
    out = f"s3://{bucket}/out/{name}.jsonl"
    return src, out, _job(tmp_path, src, out)


def test_a_rejects_file_an_earlier_run_uploaded_goes_when_the_next_run_has_none(
    tmp_path: Path, s3_bucket: str
) -> None:
    # A line rejected, then fixed: the output's rejects file on the bucket is the earlier
    # run's, stale (a report from another machine would count it): it is removed.
    src, out, job = _bucket_job(tmp_path, s3_bucket, "fixed", 3)
    first = run_batcher("run", str(job))
    assert first.returncode == 1, first.stderr  # the rejected line
    assert exists(out + ".rejects.jsonl")
    put(src, _lines(3) + b'{"custom_id": "bad", "prompt": "now a question"}\n')
    second = run_batcher("run", str(job))
    assert second.returncode == 0, second.stderr
    assert exists(out) and not exists(out + ".rejects.jsonl")


def test_the_summary_names_the_side_files_where_they_were_uploaded(
    tmp_path: Path, s3_bucket: str
) -> None:
    # failed requests split off and a rejected line: the summary names them beside the
    # bucket's output, not in the local work folder the run used
    _, out, job = _bucket_job(tmp_path, s3_bucket, "split", 8)
    text = job.read_text().replace("progress = false", "progress = false\nsplit_errors = true")
    job.write_text(text + 'error_rate = 0.5\nerror_kinds = ["400"]\nseed = 3\n')
    done = run_batcher("run", str(job))
    assert done.returncode == 1, done.stderr
    assert f"  failed    {out}.errors.jsonl" in done.stderr, done.stderr
    assert f"  rejects   {out}.rejects.jsonl" in done.stderr
    assert exists(out + ".errors.jsonl") and exists(out + ".rejects.jsonl")
