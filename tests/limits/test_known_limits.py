"""Limits an endpoint announced, remembered between runs (``batcher.limits.known_limits``).

A first run sends one request alone (the probe) and remembers what the answer's rate-limit
headers said; a later run to the same URL starts with those limits and its pool open.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import anyio
import httpx
import pytest

from batcher.config import JobConfig
from batcher.disk_cache import JsonCache
from batcher.job_file import job_from_dict
from batcher.limits.endpoint import Limits
from batcher.limits.known_limits import MAX_AGE_S, Announced, KnownLimits
from batcher.runner.run import run_job
from tests.helpers import write_input

OK = {
    "choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def test_what_an_endpoint_announced_is_kept_by_url_without_secrets(tmp_path: Path) -> None:
    file = JsonCache(tmp_path / "limits.json")
    known = KnownLimits(file, now=1_000_000.0)
    known.put("https://user:pw@api.example.com/v1?key=sk-secret", Announced(rpm=500, tpm=None))
    text = (tmp_path / "limits.json").read_text()
    assert "sk-secret" not in text and "pw" not in text and "user" not in text
    assert known.get("https://api.example.com/v1") == Announced(rpm=500, tpm=None)
    assert known.get("https://api.example.com/v1?key=other") == Announced(rpm=500, tpm=None)
    assert known.get("https://api.example.com/v2") is None
    later = KnownLimits(file, now=1_000_000.0 + MAX_AGE_S + 1)
    assert later.get("https://api.example.com/v1") is None  # too old to trust
    later.put("http://other.test/v1", Announced(rpm=None, tpm=None))
    assert list(json.loads((tmp_path / "limits.json").read_text())) == [
        "http://other.test/v1"
    ]  # the stale entry was dropped
    (tmp_path / "limits.json").write_text('{"http://other.test/v1": {"rpm": "many", "at": 1}}')
    assert KnownLimits(file, now=2.0).get("http://other.test/v1") is None


def test_limits_started_from_what_was_announced_open_the_pool_at_once() -> None:
    limits = Limits(concurrency=32, share=0.5)
    assert limits.probing and limits.concurrency.total_tokens == 1
    limits.start_from(Announced(rpm=600, tpm=60_000))
    assert not limits.probing and limits.concurrency.total_tokens == 32
    assert limits.rpm is not None and limits.rpm.per_minute == 300  # this pool's half
    assert limits.tpm is not None and limits.tpm.per_minute == 30_000
    assert limits.announced() == Announced(rpm=600, tpm=60_000)  # the whole key's


def _job(tmp_path: Path, src: Path) -> JobConfig:
    return job_from_dict(
        {
            "job": {"input": str(src), "output": str(tmp_path / "o.jsonl"), "progress": False},
            "endpoint": {"base_url": "http://mock.test/v1"},
            "request": {"model": "m"},
            "limits": {"concurrency": 8},
        }
    )


def test_a_second_run_to_the_same_endpoint_sends_no_probe(tmp_path: Path) -> None:
    # How many requests were in flight when the first answer of each run came back: the
    # probe goes alone; once the endpoint's limits are known, the pool opens at once.
    in_flight = 0
    alongside_first: list[int] = []
    answered = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, answered
        in_flight += 1
        await anyio.sleep(0.05)
        if answered == 0:
            alongside_first.append(in_flight)
        answered += 1
        in_flight -= 1
        return httpx.Response(200, json=OK, headers={"x-ratelimit-limit-requests": "600000"})

    src = write_input(tmp_path / "in.jsonl", 16)
    for restart in (False, True):
        answered = 0
        report = run_job(
            _job(tmp_path, src),
            restart=restart,
            transport=httpx.MockTransport(handler),
            stream=io.StringIO(),
        )
        assert report.stats.ok == 16
    assert alongside_first[0] == 1  # the first run probed
    assert alongside_first[1] == 8  # the second knew the limits: the whole pool went out
    cache = Path(os.environ["BATCHER_CACHE_DIR"]) / "limits.json"
    assert json.loads(cache.read_text())["http://mock.test/v1"]["rpm"] == 600_000


def test_an_answer_that_is_not_ok_is_not_remembered(tmp_path: Path) -> None:
    # A refused key's answer says nothing about the limits a good key has.
    src = write_input(tmp_path / "in.jsonl", 3)
    refused = httpx.MockTransport(lambda r: httpx.Response(401, json={"error": {"message": "no"}}))
    run_job(_job(tmp_path, src), transport=refused, stream=io.StringIO())
    assert not (Path(os.environ["BATCHER_CACHE_DIR"]) / "limits.json").exists()


@pytest.mark.parametrize("cache_dir", [""])
def test_the_cache_can_be_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: str
) -> None:
    monkeypatch.setenv("BATCHER_CACHE_DIR", cache_dir)
    assert KnownLimits.default() is None
