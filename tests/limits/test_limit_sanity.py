"""Rate limits a server announces are sanity-checked, and limits remembered from an earlier
run are only a start that each run re-learns (``batcher.limits.limit_checks``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from batcher.disk_cache import JsonCache
from batcher.limits.endpoint import Limits
from batcher.limits.known_limits import Announced, KnownLimits
from tests.helpers import run_batcher, write_input
from tests.loopback import chat_answer, json_app, serving

USAGE = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def limits_with_warnings() -> tuple[Limits, list[str]]:
    limits = Limits(concurrency=8)
    warnings: list[str] = []
    limits.checks.warn = warnings.append
    return limits, warnings


def test_a_limit_no_server_sets_is_ignored_with_one_warning_naming_it() -> None:
    limits, warnings = limits_with_warnings()
    for _ in range(3):
        limits.observe({"x-ratelimit-limit-requests": "0.0001"})
        limits.observe({"x-ratelimit-limit-tokens": "500", "x-ratelimit-remaining-tokens": "0"})
    assert limits.rpm is None and limits.tpm is None
    assert limits.server_rpm is None and limits.server_tpm is None
    assert len(warnings) == 2
    assert "x-ratelimit-limit-requests: 0.0001" in warnings[0]
    assert "x-ratelimit-limit-tokens: 500" in warnings[1]
    limits.observe({"x-ratelimit-limit-requests": "1"})  # the floor itself is a limit
    assert limits.rpm is not None and limits.rpm.per_minute == 1


def test_a_sudden_drop_of_more_than_100x_is_ignored_a_smaller_one_is_not() -> None:
    limits, warnings = limits_with_warnings()
    limits.observe({"x-ratelimit-limit-requests": "10000"})
    limits.observe({"x-ratelimit-limit-requests": "50"})  # 200x lower
    assert limits.rpm is not None and limits.rpm.per_minute == 10_000
    assert len(warnings) == 1 and "x-ratelimit-limit-requests: 50" in warnings[0]
    limits.observe({"x-ratelimit-limit-requests": "500"})  # 20x lower: believed
    assert limits.rpm.per_minute == 500


def test_a_remembered_limit_is_replaced_by_what_this_runs_server_announces() -> None:
    limits, warnings = limits_with_warnings()
    limits.start_from(Announced(rpm=600_000, tpm=None))
    limits.observe({"x-ratelimit-limit-requests": "1200"})  # 500x lower than remembered
    assert limits.rpm is not None and limits.rpm.per_minute == 1200 and not warnings
    limits.forget_unconfirmed()
    assert limits.rpm is not None and limits.rpm.per_minute == 1200  # confirmed: kept


def test_a_remembered_limit_the_server_no_longer_announces_is_dropped() -> None:
    limits, _ = limits_with_warnings()
    limits.start_from(Announced(rpm=30, tpm=90_000))
    assert limits.rpm is not None and limits.tpm is not None
    limits.observe({})
    limits.forget_unconfirmed()
    assert limits.rpm is None and limits.tpm is None
    assert limits.announced() == Announced(rpm=None, tpm=None)
    configured = Limits(rpm=100, concurrency=8)
    configured.start_from(Announced(rpm=30, tpm=None))
    assert configured.rpm is not None and configured.rpm.per_minute == 30
    configured.forget_unconfirmed()
    assert configured.rpm is not None and configured.rpm.per_minute == 100  # the job's own


def test_implausible_remembered_limits_are_not_used(tmp_path: Path) -> None:
    file = JsonCache(tmp_path / "limits.json")
    now = time.time()
    file.write({"http://a.test/v1": {"rpm": 0.0001, "tpm": None, "at": now}})
    assert KnownLimits(file).get("http://a.test/v1") is None


def _cache_file() -> Path:
    return Path(os.environ["BATCHER_CACHE_DIR"]) / "limits.json"


def _run(tmp_path: Path, base_url: str, n: int) -> Any:
    src = write_input(tmp_path / "in.jsonl", n)
    out = tmp_path / "o.jsonl"
    return run_batcher(
        "run", "--input", str(src), "--output", str(out), "--base-url", base_url,
        "--model", "m", "--concurrency", "4", "--no-progress", "--restart",
        timeout=60,  # a stalled run fails here rather than hang
    )  # fmt: skip


@pytest.mark.slow
def test_one_absurd_header_neither_stalls_the_run_nor_is_remembered(tmp_path: Path) -> None:
    answered = 0

    async def handler(body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        nonlocal answered
        answered += 1
        headers = {"x-ratelimit-limit-requests": "0.0001"} if answered == 1 else {}
        return 200, chat_answer("m", USAGE), headers

    with serving(json_app(handler)) as url:
        proc = _run(tmp_path, url, 12)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.count("ignored x-ratelimit-limit-requests: 0.0001") == 1
        entry = json.loads(_cache_file().read_text())[url]
        assert entry["rpm"] is None


@pytest.mark.slow
def test_a_run_whose_server_announces_no_limit_clears_the_remembered_one(tmp_path: Path) -> None:
    async def handler(body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 200, chat_answer("m", USAGE), {}

    with serving(json_app(handler)) as url:
        # An earlier run (hours ago) was told 1 request a minute: 12 requests would take 11 min.
        KnownLimits(JsonCache(_cache_file())).put(url, Announced(rpm=1, tpm=None))
        proc = _run(tmp_path, url, 12)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(_cache_file().read_text())[url]["rpm"] is None
