"""Limits with an injected clock: meters, header steering, 429 back-off and recovery."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from batcher.limits.endpoint import BACKOFF, RECOVERY_S, Limits
from batcher.limits.headers import parse_duration, parse_rate_headers
from batcher.limits.known_limits import Announced
from batcher.limits.meters import RateMeter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_meter_spaces_requests_evenly() -> None:
    clock = Clock()
    meter = RateMeter(60, clock=clock)  # one a second, no burst
    assert [meter.reserve(1) for _ in range(4)] == pytest.approx([0.0, 1.0, 2.0, 3.0])


def test_meter_burst_after_idle_is_bounded() -> None:
    clock = Clock()
    meter = RateMeter(600, burst_s=1.0, clock=clock)  # 10 a second, 1 s of burst
    for _ in range(20):
        meter.reserve(1)
    clock.now += 3600
    waits = [meter.reserve(1) for _ in range(12)]
    assert waits[:11] == pytest.approx([0.0] * 11, abs=1e-9)
    assert waits[11] == pytest.approx(0.1)


def test_token_meter_weights_refunds_and_rate_changes() -> None:
    clock = Clock()
    meter = RateMeter(6000, clock=clock)  # 100 tokens a second
    assert meter.reserve(500) == 0.0
    assert meter.reserve(100) == pytest.approx(5.0)
    meter.refund(400)  # the first request was charged 100, not 500
    assert meter.reserve(100) == pytest.approx(2.0)
    meter.set_rate(12000)
    # the 300 tokens booked ahead are re-spaced at 200 a second: 1.5 s, then the next 100
    assert meter.reserve(100) == pytest.approx(1.5)
    assert meter.reserve(1) == pytest.approx(2.0)


def test_cap_credit_stops_the_meter_running_ahead() -> None:
    clock = Clock()
    meter = RateMeter(60, burst_s=10.0, clock=clock)
    meter.cap_credit(-2)  # the server has nothing left and 2 of ours are in flight
    assert meter.reserve(1) == pytest.approx(0.0)  # 10 s burst tolerance still applies
    meter = RateMeter(60, clock=clock)
    meter.cap_credit(-2)
    assert meter.reserve(1) == pytest.approx(2.0)


def test_meter_rejects_non_positive_rates() -> None:
    with pytest.raises(ValueError):
        RateMeter(0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5),
     ("7.2s", 7.2), ("soon", None), ("", None), (None, None), ("5x", None)],
)  # fmt: skip
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_parse_rate_headers() -> None:
    headers = {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "599",
        "x-ratelimit-reset-requests": "100ms",
    }
    figures = parse_rate_headers(headers, "requests")
    assert figures is not None
    assert (figures.limit, figures.remaining, figures.reset_s) == pytest.approx((600, 599, 0.1))
    assert parse_rate_headers(headers, "tokens") is None


def test_server_limit_is_learned_when_none_was_set() -> None:
    clock = Clock()
    limits = Limits(clock=clock)
    assert limits.rpm is None
    limits.observe({"x-ratelimit-limit-requests": "120", "x-ratelimit-limit-tokens": "6000"})
    assert limits.rpm is not None and limits.rpm.per_minute == 120
    assert limits.tpm is not None and limits.tpm.per_minute == 6000


def test_a_lower_server_limit_wins_over_the_job_and_a_higher_one_does_not() -> None:
    clock = Clock()
    limits = Limits(rpm=6000, tpm=1000, clock=clock)
    limits.observe({"x-ratelimit-limit-requests": "600", "x-ratelimit-limit-tokens": "90000"})
    assert limits.rpm is not None and limits.rpm.per_minute == 600
    assert limits.tpm is not None and limits.tpm.per_minute == 1000


@pytest.mark.anyio
async def test_remaining_caps_the_credit_by_what_is_in_flight() -> None:
    clock = Clock()
    limits = Limits(rpm=60, tpm=60_000, clock=clock)
    await limits.acquire(10)  # the first request goes at once and is in flight
    limits.in_flight_requests += 1  # as if a second one were in flight too
    clock.now += 10
    limits.observe({"x-ratelimit-remaining-requests": "0"})
    assert limits.rpm is not None
    assert limits.rpm.delay() == pytest.approx(2.0)  # two unanswered, nothing left: wait 2 s
    limits.release(10)
    assert limits.in_flight_requests == 1 and limits.in_flight_tokens == 0


def test_nothing_remaining_without_a_limit_pauses_until_the_reset() -> None:
    clock = Clock()
    limits = Limits(clock=clock)
    started = limits.observe(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3s"}
    )
    assert started == pytest.approx(3.0) and limits.paused_s == pytest.approx(3.0)
    assert limits.observe({"x-ratelimit-remaining-requests": "5"}) == 0.0  # no new pause
    # the answers in flight repeat it: the pause they extend is not a new one to say
    again = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "4s"}
    assert limits.observe(again) == 0.0 and limits.paused_s == pytest.approx(4.0)


def test_429_pauses_the_pool_backs_off_once_per_burst_and_recovers_gradually() -> None:
    clock = Clock()
    limits = Limits(rpm=600, concurrency=64, clock=clock)
    limits.in_flight_requests = 1
    limits.release(0)  # the probe's answer: the pool opens
    assert limits.concurrency.total_tokens == 64
    limits.on_rate_limited(5.0)
    limits.on_rate_limited(2.0)  # a second 429 of the same burst: no further back-off
    assert limits.paused_s == pytest.approx(5.0)
    assert limits.factor == pytest.approx(BACKOFF)
    assert limits.rpm is not None and limits.rpm.per_minute == pytest.approx(600 * BACKOFF)
    assert limits.concurrency.total_tokens == round(64 * BACKOFF)
    clock.now += 5 + RECOVERY_S / 10  # 5 s of pause, then a tenth of the recovery time
    limits._recover()
    assert limits.factor == pytest.approx(BACKOFF + 0.1)
    clock.now += RECOVERY_S
    limits._recover()
    assert limits.factor == 1.0
    assert limits.rpm.per_minute == pytest.approx(600)
    assert limits.concurrency.total_tokens == 64


def test_429_without_retry_after_pauses_one_second() -> None:
    clock = Clock()
    limits = Limits(clock=clock)
    limits.on_rate_limited(None)
    assert limits.paused_s == pytest.approx(1.0)
    assert limits.rate_limited == 1


def test_token_correction_uses_the_servers_count() -> None:
    clock = Clock()
    limits = Limits(tpm=6000, clock=clock)  # 100 tokens a second
    assert limits.tpm is not None
    limits.tpm.reserve(600)
    limits.correct_tokens(600, 100)  # charged 100: 500 given back
    assert limits.tpm.reserve(1) == pytest.approx(1.0)
    limits.correct_tokens(100, 300)  # charged 200 more than estimated
    assert limits.tpm.reserve(1) == pytest.approx(3.01)


def test_one_probe_request_until_the_first_answer() -> None:
    limits = Limits(concurrency=32, clock=Clock())
    assert limits.concurrency.total_tokens == 1
    limits.in_flight_requests = 1
    limits.release(5)
    assert limits.concurrency.total_tokens == 32 and not limits.probing


@pytest.mark.slow
def test_encodings_load_offline_into_a_fresh_cache(tmp_path: Path) -> None:
    import subprocess
    import sys

    # a new process with an empty cache and no network route: the files come from bpe-openai
    code = (
        "import os; before = dict(os.environ);"
        "from batcher.cost.tokens import count_message_tokens as c;"
        "print(c([{'role': 'user', 'content': 'Hello, world!'}], 'o200k_base'),"
        " c([{'role': 'user', 'content': 'Hello, world!'}], 'cl100k_base'),"
        " dict(os.environ) == before)"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "BATCHER_CACHE_DIR": str(tmp_path / "c"),
        "https_proxy": "http://127.0.0.1:9",  # any download attempt would fail at once
        "http_proxy": "http://127.0.0.1:9",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["10", "10", "True"]  # and no environment variable set
    folder = tmp_path / "c" / "tiktoken"
    parsed = sorted(folder.iterdir())  # the two tables parsed from the shipped files
    assert [p.name.split("-")[0] for p in parsed] == ["cl100k_base", "o200k_base"]
    written = [p.stat().st_mtime_ns for p in parsed]
    # a later run reads the parsed tables back: the same counts, the files left as they are
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.split() == ["10", "10", "True"], again.stderr
    assert [p.stat().st_mtime_ns for p in parsed] == written
    # a damaged parsed table is parsed again from the shipped file, and replaced
    parsed[0].write_bytes(b"garbage")
    third = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert third.returncode == 0 and third.stdout.split() == ["10", "10", "True"], third.stderr
    assert parsed[0].read_bytes() != b"garbage"
    # no cache folder at all (BATCHER_CACHE_DIR=""): parsed each time, nothing written
    env["BATCHER_CACHE_DIR"] = ""
    fourth = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert fourth.returncode == 0 and fourth.stdout.split() == ["10", "10", "True"], fourth.stderr


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_batchers_encoding_counts_as_tiktokens_own(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gzip
    import hashlib

    import tiktoken
    import tiktoken.registry

    from batcher.cost.tokens import (
        _shipped_data,
        get_encoding,
        loaded_encodings,
        release_encodings,
    )

    # tiktoken's own encoding, from the shipped file placed in a cache of this test's own
    url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    shipped = _shipped_data() / f"{name}.tiktoken.gz"
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(
        gzip.decompress(shipped.read_bytes())
    )
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # not one another test loaded
    texts = ["Hello, world!", "Ünïcödé and emoji 🙂 mixed with code: def f(x): return x**2",
             "  lots   of\n\n whitespace\t", "数字 12345678 and 'quotes' don't", ""]  # fmt: skip
    ours = get_encoding(name)
    theirs = tiktoken.get_encoding(name)
    assert ours is not theirs
    for text in texts:
        assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)
    assert ours.encode("<|endoftext|>", allowed_special="all") == theirs.encode(
        "<|endoftext|>", allowed_special="all"
    )
    assert ours in loaded_encodings()
    release_encodings()
    assert loaded_encodings() == []
    assert get_encoding(name) is not ours  # loaded again after a release


def test_a_rate_change_re_spaces_what_is_booked_ahead() -> None:
    clock = Clock()
    meter = RateMeter(6, clock=clock)  # one every 10 s
    assert [meter.reserve(1) for _ in range(3)] == pytest.approx([0.0, 10.0, 20.0])
    assert meter.set_rate(600)  # a hundredfold: the waits booked at 6 a minute are stale
    assert meter.reserve(1) == pytest.approx(0.3)  # 3 units booked ahead, at 0.1 s each
    assert not meter.set_rate(900)  # 1.5x: not stale enough to book again
    assert meter.set_rate(1200)  # twice the pace of the slots booked since the last re-book (600)


@pytest.mark.anyio
async def test_requests_waiting_on_a_remembered_low_limit_go_when_the_server_raises_it() -> None:
    """A limit remembered at 6 a minute (a day-old cache, say), and the first answer says
    10,000: the requests booked 10 and 20 s ahead book again and go at the new pace."""
    limits = Limits(concurrency=8)
    limits.start_from(Announced(rpm=6, tpm=None))
    done: list[int] = []

    async def one(i: int) -> None:
        await limits.acquire(0)
        done.append(i)

    with anyio.fail_after(5):  # the old pace would take 20 s
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)
            await anyio.sleep(0.05)
            assert done == [0]  # the others wait on the remembered pace
            limits.observe({"x-ratelimit-limit-requests": "10000"})
    assert sorted(done) == [0, 1, 2]


@pytest.mark.anyio
async def test_dropping_a_remembered_limit_lets_the_job_pace_resume_at_once() -> None:
    limits = Limits(rpm=600, concurrency=8)
    limits.start_from(Announced(rpm=6, tpm=None))
    await limits.acquire(0)
    with anyio.move_on_after(0.05):
        await limits.acquire(0)  # books 10 s ahead at the remembered pace
    limits.forget_unconfirmed()  # the server announced none: back to the job's 600
    with anyio.fail_after(5):
        await limits.acquire(0)  # ~0.1-0.2 s at 600 a minute, not ~20 s


@pytest.mark.anyio
async def test_waiters_that_book_again_keep_their_order_and_spacing() -> None:
    """Remembered at 600 a minute, then the server says 2,400: the four requests waiting book
    again one interval apart, in order, not all at the one slot that was last."""
    clock = Clock()  # frozen: the waits booked are what the meter computed, nothing else
    limits = Limits(concurrency=8, clock=clock)
    limits.start_from(Announced(rpm=600, tpm=None))
    assert limits.rpm is not None
    waits: list[float] = []
    reserve = limits.rpm.reserve

    def recorded(amount: float) -> float:
        waits.append(reserve(amount))
        return waits[-1]

    limits.rpm.reserve = recorded  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(limits.acquire, 0)
        await anyio.sleep(0.01)
        assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])  # booked at 600 a minute
        limits.observe({"x-ratelimit-limit-requests": "2400"})
    assert waits[5:] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # booked again at 2,400


def test_a_small_rise_leaves_the_waiters_slots_and_the_next_follows_them() -> None:
    clock = Clock()
    meter = RateMeter(600, clock=clock)
    assert [meter.reserve(1) for _ in range(3)] == pytest.approx([0.0, 0.1, 0.2])
    assert not meter.set_rate(900)  # under twice: the waiters keep their slots
    assert meter.reserve(1) == pytest.approx(0.3)  # after them, not among them
