"""Signs in an endpoint's first answers that the job is set up wrong
(``batcher.engine.setup_check``)."""

from __future__ import annotations

import pytest

from batcher.engine.outage import Outage
from batcher.engine.setup_check import (
    WRONG_PATH_AFTER,
    SetupCheck,
    is_wrong_path,
    origin,
    waiting_note,
)
from batcher.http.answers import Attempt
from batcher.records import Result

URL = "https://user:secret@api.example.com:8443/v1/chat/completions"


def answer(status: int | None, *, code: str | None = None, message: str | None = None,
           failure: str | None = None) -> Attempt:  # fmt: skip
    return Attempt(
        ok=status == 200, retryable=False, latency_s=0.1, status_code=status,
        error_code=code, error_message=message,
        connect_failure=failure,  # type: ignore[arg-type]  # a Literal, given as plain str here
    )  # fmt: skip


def record(status: int, message: str = "not found") -> Result:
    return Result(custom_id="a", line=1, status="error", model="m", attempts=1, latency_s=0.1,
                  started_at=0.0, finished_at=0.1, status_code=status,
                  error_message=message)  # fmt: skip


@pytest.mark.parametrize(
    ("status", "code", "message", "wrong"),
    [
        (404, None, "Not Found", True),
        (405, None, None, True),
        (404, "model_not_found", None, False),
        (404, None, "The model `gpt-9` does not exist", False),
        (400, None, "bad", False),
        (None, None, None, False),
    ],
)
def test_a_404_about_a_model_is_the_request_s_not_the_url_s(
    status: int | None, code: str | None, message: str | None, wrong: bool
) -> None:
    assert is_wrong_path(status, code, message) is wrong


def test_origin_drops_credentials_path_and_query() -> None:
    assert origin(URL) == "https://api.example.com:8443"
    assert origin("http://[::1]:8000/v1?key=k") == "http://[::1]:8000"
    assert origin("http://localhost/v1") == "http://localhost"


def test_a_host_that_never_resolved_is_a_typo_and_the_message_hides_the_password() -> None:
    check = SetupCheck(URL)
    problem = check.check(answer(None, message="dns", failure="dns"))
    assert problem is not None and "'api.example.com' does not resolve" in problem
    assert "secret" not in problem and not problem.endswith("/chat/completions; check the URL")
    answered = SetupCheck(URL)
    assert answered.check(answer(200)) is None
    assert answered.check(answer(None, failure="dns")) is None  # it answered before: an outage
    assert SetupCheck(URL).check(answer(None, failure="refused")) is None


def test_only_404s_from_the_start_stop_the_run() -> None:
    check = SetupCheck(URL)
    for _ in range(WRONG_PATH_AFTER - 1):
        assert check.check(answer(404)) is None
    problem = check.check(answer(404))
    assert problem is not None and f"answered 404 to {WRONG_PATH_AFTER} requests" in problem
    assert "usually in /v1" in problem and "secret" not in problem


def test_a_success_first_makes_later_404s_the_requests_own() -> None:
    check = SetupCheck(URL)
    assert check.check(answer(200)) is None
    assert all(check.check(answer(404)) is None for _ in range(3 * WRONG_PATH_AFTER))
    assert check.wrong_paths == 0


def test_results_that_may_be_a_wrong_url_s_are_held_until_released() -> None:
    check = SetupCheck(URL)
    assert check.hold(record(404), "h1") and check.hold(record(405), "h2")
    assert not check.hold(record(500), "h3")  # not a wrong path: recorded at once
    assert not check.hold(record(404, "model_not_found"), "h4")
    assert check.holding
    released = check.release()
    assert [h for _, h in released] == ["h1", "h2"] and not check.holding
    check.check(answer(200))
    assert not check.hold(record(404), "h5")  # after a success a 404 is the request's own


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_waiting_notes_say_whether_the_server_is_starting_or_gone() -> None:
    clock = Clock()
    outage = Outage(patience_s=600, clock=clock)
    outage.failed()
    refused = answer(None, message="connection refused", failure="refused")
    note = waiting_note("main", URL, refused, outage)
    assert "nothing listens at https://api.example.com:8443 yet (connection refused)" in note
    assert "after" not in note and "patience 600 s" in note and "secret" not in note
    clock.now += 42
    assert "yet after 42 s" in waiting_note("main", URL, refused, outage)
    outage.answered()
    while not outage.active:  # once it answered, an outage takes a few failures in a row
        outage.failed()
    reset = answer(None, message="reset by peer")
    assert "main is unreachable (reset by peer); waiting, probing" in waiting_note(
        "main", URL, reset, outage
    )
    clock.now += 90
    assert "main still unreachable after 90 s" in waiting_note("main", URL, reset, outage)
