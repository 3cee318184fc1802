"""Sanity checks of announced rate limits (``batcher.limits.limit_checks``), on their own: the
endpoint's meters using them are tested in ``test_limit_sanity.py``."""

from __future__ import annotations

import pytest

from batcher.limits.limit_checks import MIN_RPM, MIN_TPM, LimitChecks, implausible


@pytest.mark.parametrize(
    ("kind", "limit", "highest", "why"),
    [
        ("requests", 0.5, None, "below 1 requests a minute"),
        ("requests", MIN_RPM, None, None),
        ("tokens", 999, None, "below 1000 tokens a minute"),
        ("tokens", MIN_TPM, None, None),
        ("requests", 50, 10_000, "more than 100x below the 10000 announced earlier"),
        ("requests", 100, 10_000, None),  # exactly 100x: still believed
        ("tokens", 2_000_000, 1_000, None),  # a rise is always believed
    ],
)
def test_implausible(kind: str, limit: float, highest: float | None, why: str | None) -> None:
    assert implausible(kind, limit, highest) == why


def checks() -> tuple[LimitChecks, list[str]]:
    said: list[str] = []
    return LimitChecks(warn=said.append), said


def test_accepted_limits_raise_the_yardstick_rejected_ones_warn_once_per_kind() -> None:
    found, said = checks()
    assert found.accept("requests", 10_000) and found.highest == {"requests": 10_000}
    assert found.accept("requests", 500)  # lower but believable: the highest stays
    assert found.highest == {"requests": 10_000}
    assert not found.accept("requests", 50)
    assert not found.accept("requests", 0.01)
    assert not found.accept("tokens", 10)
    assert said == [
        "batcher: warning: ignored x-ratelimit-limit-requests: 50 (more than 100x below the "
        "10000 announced earlier); the server's 429s still slow the run if it is right",
        "batcher: warning: ignored x-ratelimit-limit-tokens: 10 (below 1000 tokens a minute); "
        "the server's 429s still slow the run if it is right",
    ]


def test_remembered_limits_are_no_yardstick_until_the_server_confirms_them() -> None:
    found, said = checks()
    found.accept("requests", 600_000)
    found.remembered({"requests", "tokens", "other"})
    assert found.unconfirmed == {"requests", "tokens"} and "requests" not in found.highest
    assert found.accept("requests", 1_200) and not said  # not measured against the memory
    assert found.take_unconfirmed() == {"tokens"}
    assert found.take_unconfirmed() == set()
