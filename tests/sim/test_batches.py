"""The simulator's Files and Batches API over a loopback socket, on a clock the test moves."""

from __future__ import annotations

import json

import pytest

from batcher.sim.batches import BatchSimConfig
from tests.batch_sim import KEY, OTHER_KEY, batch_sim, create, lines_of, request_line, upload

SLOW = BatchSimConfig(validating_s=10, in_progress_s=100, finalizing_s=10, cancelling_s=5)


def test_status_progression_and_answers_equal_online_ones() -> None:
    lines = [request_line(f"q{i}", f"question {i}", max_tokens=8) for i in range(10)]
    with batch_sim(SLOW) as sim, sim.http() as http:
        file_id = upload(http, lines)
        assert http.get(f"/files/{file_id}").json()["purpose"] == "batch"
        batch = create(http, file_id, batcher_chunk="abc")
        assert batch["status"] == "validating"
        assert batch["metadata"] == {"batcher_chunk": "abc"}
        assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}

        def now() -> dict[str, object]:
            got: dict[str, object] = http.get(f"/batches/{batch['id']}").json()
            return got

        sim.clock.advance(10)
        assert now()["status"] == "in_progress"
        sim.clock.advance(45)  # 45 of 100 seconds: 4 of 10 requests done
        state = now()
        assert state["status"] == "in_progress"
        assert state["request_counts"] == {"total": 10, "completed": 4, "failed": 0}
        assert state["output_file_id"] is None
        sim.clock.advance(60)
        assert now()["status"] == "finalizing"
        sim.clock.advance(10)
        done = now()
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
        assert done["error_file_id"] is None
        assert done["completed_at"] == batch["created_at"] + 10 + 100 + 10
        output = lines_of(http.get(f"/files/{done['output_file_id']}/content").content)
        assert sorted(line["custom_id"] for line in output) == [f"q{i}" for i in range(10)]
        for line in output:
            body = json.loads(lines[int(line["custom_id"][1:])])["body"]
            online = http.post("/chat/completions", json=body).json()
            answer = line["response"]["body"]
            assert line["response"]["status_code"] == 200
            assert answer["choices"] == online["choices"]
            assert answer["usage"] == online["usage"]
        assert sim.stats()["batches"]["created"] == 1


def test_a_bad_file_fails_validation_naming_its_lines() -> None:
    lines = [
        request_line("a", "one"),
        request_line("a", "duplicate id"),
        json.dumps({"custom_id": "c", "method": "GET", "url": "/v1/chat/completions", "body": {}}),
        request_line("d", "other model", model="gpt-4o"),
        "{not json",
    ]
    with batch_sim(SLOW) as sim, sim.http() as http:
        batch = create(http, upload(http, lines))
        sim.clock.advance(10)
        failed = http.get(f"/batches/{batch['id']}").json()
    assert failed["status"] == "failed"
    errors = {(e["line"], e["code"]) for e in failed["errors"]["data"]}
    assert errors == {
        (2, "duplicate_custom_id"),
        (3, "invalid_method"),
        (4, "mismatched_model"),
        (5, "invalid_json_line"),
    }
    assert failed["output_file_id"] is None


def test_partial_errors_go_to_the_error_file() -> None:
    config = BatchSimConfig(validating_s=0, in_progress_s=1, finalizing_s=0, error_rate=0.5)
    lines = [request_line(f"q{i}", f"question {i}") for i in range(40)]
    lines.append(request_line("bad", "n out of range", n=0))
    with batch_sim(config) as sim, sim.http() as http:
        batch = create(http, upload(http, lines))
        sim.clock.advance(1)
        done = http.get(f"/batches/{batch['id']}").json()
        output = lines_of(http.get(f"/files/{done['output_file_id']}/content").content)
        errors = lines_of(http.get(f"/files/{done['error_file_id']}/content").content)
    counts = done["request_counts"]
    assert counts["total"] == 41
    assert counts["completed"] == len(output) and counts["failed"] == len(errors)
    assert 0 < len(output) < 40
    assert {line["custom_id"] for line in output + errors} == {f"q{i}" for i in range(40)} | {"bad"}
    codes = {line["response"]["status_code"] for line in errors}
    assert codes <= {500, 429, 400} and len(codes) > 1
    bad = next(line for line in errors if line["custom_id"] == "bad")
    assert bad["response"]["status_code"] == 400
    assert "n must be an integer" in bad["response"]["body"]["error"]["message"]


def test_an_expired_batch_keeps_what_it_answered() -> None:
    config = BatchSimConfig(validating_s=0, in_progress_s=100, window_s=30, finalizing_s=0)
    lines = [request_line(f"q{i}", f"question {i}") for i in range(10)]
    with batch_sim(config) as sim, sim.http() as http:
        batch = create(http, upload(http, lines))
        sim.clock.advance(29)
        assert http.get(f"/batches/{batch['id']}").json()["status"] == "in_progress"
        sim.clock.advance(500)
        expired = http.get(f"/batches/{batch['id']}").json()
        output = lines_of(http.get(f"/files/{expired['output_file_id']}/content").content)
        errors = lines_of(http.get(f"/files/{expired['error_file_id']}/content").content)
    assert expired["status"] == "expired"
    assert expired["request_counts"] == {"total": 10, "completed": 3, "failed": 7}
    assert sorted(line["custom_id"] for line in output) == ["q0", "q1", "q2"]
    assert sorted(line["custom_id"] for line in errors) == [f"q{i}" for i in range(3, 10)]
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert all(line["response"] is None for line in errors)


def test_cancel_keeps_the_partial_output() -> None:
    lines = [request_line(f"q{i}", f"question {i}") for i in range(10)]
    with batch_sim(SLOW) as sim, sim.http() as http:
        batch = create(http, upload(http, lines))
        sim.clock.advance(10 + 50)  # half way through
        cancelling = http.post(f"/batches/{batch['id']}/cancel").json()
        assert cancelling["status"] == "cancelling"
        sim.clock.advance(100)  # no request finishes after the cancel
        cancelled = http.get(f"/batches/{batch['id']}").json()
        again = http.post(f"/batches/{batch['id']}/cancel")
        output = lines_of(http.get(f"/files/{cancelled['output_file_id']}/content").content)
        errors = lines_of(http.get(f"/files/{cancelled['error_file_id']}/content").content)
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelled_at"] == cancelling["cancelling_at"] + 5
    assert sorted(line["custom_id"] for line in output) == [f"q{i}" for i in range(5)]
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert again.status_code == 409


def test_another_key_gets_404_for_batches_and_files() -> None:
    with batch_sim() as sim, sim.http() as mine, sim.http(OTHER_KEY) as theirs:
        file_id = upload(mine, [request_line("a", "hi")])
        batch = create(mine, file_id)
        assert theirs.get(f"/batches/{batch['id']}").status_code == 404
        assert theirs.post(f"/batches/{batch['id']}/cancel").status_code == 404
        assert theirs.get(f"/files/{file_id}/content").status_code == 404
        assert theirs.get("/batches").json()["data"] == []
        assert mine.get(f"/batches/{batch['id']}").status_code == 200
        assert "batch_" in theirs.get(f"/batches/{batch['id']}").json()["error"]["message"]


def test_list_is_newest_first_and_paginated() -> None:
    with batch_sim() as sim, sim.http() as http:
        file_id = upload(http, [request_line("a", "hi")])
        made = []
        for _ in range(5):
            made.append(create(http, file_id)["id"])
            sim.clock.advance(1)
        first = http.get("/batches", params={"limit": 2}).json()
        second = http.get("/batches", params={"limit": 2, "after": first["last_id"]}).json()
        last = http.get("/batches", params={"limit": 2, "after": second["last_id"]}).json()
    seen = [b["id"] for page in (first, second, last) for b in page["data"]]
    assert seen == made[::-1]
    assert (first["has_more"], second["has_more"], last["has_more"]) == (True, True, False)


def test_the_first_uploads_fail_when_asked() -> None:
    with batch_sim(BatchSimConfig(fail_uploads=2)) as sim, sim.http() as http:
        data = {"purpose": "batch"}
        files = {"file": ("in.jsonl", (request_line("a", "hi") + "\n").encode())}
        statuses = [http.post("/files", data=data, files=files).status_code for _ in range(3)]
        assert statuses == [500, 500, 200]
        assert sim.stats()["batches"]["uploads_failed"] == 2
        assert sim.stats()["batches"]["files_uploaded"] == 1


def test_the_enqueued_token_limit_fails_a_batch_until_others_finish() -> None:
    one = [request_line("a", "a question of some length " * 4)]  # 27 prompt tokens
    with batch_sim(BatchSimConfig(enqueued_token_limit=50)) as sim, sim.http() as http:
        file_id = upload(http, one)
        first = create(http, file_id)
        refused = create(http, file_id)
        assert refused["status"] == "failed"
        [error] = refused["errors"]["data"]
        assert error["code"] == "token_limit_exceeded"
        assert "Enqueued token limit reached for gpt-4o-mini" in error["message"]
        sim.clock.advance(10)  # the first has completed
        assert http.get(f"/batches/{first['id']}").json()["status"] == "completed"
        assert create(http, file_id)["status"] == "validating"
        assert sim.stats()["batches"]["created"] == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"endpoint": "/v1/embeddings"}, "endpoint"),
        ({"completion_window": "soon"}, "completion_window"),
        ({"metadata": {"k": 1}}, "metadata"),
    ],
)
def test_create_refuses_bad_parameters(body: dict[str, object], param: str) -> None:
    with batch_sim() as sim, sim.http() as http:
        file_id = upload(http, [request_line("a", "hi")])
        request = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            **body,
        }
        reply = http.post("/batches", json=request)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param


def test_keys_in_use_do_not_matter_when_scoping_is_off() -> None:
    with (
        batch_sim(BatchSimConfig(scope_by_key=False)) as sim,
        sim.http(KEY) as mine,
        sim.http(OTHER_KEY) as theirs,
    ):
        batch = create(mine, upload(mine, [request_line("a", "hi")]))
        assert theirs.get(f"/batches/{batch['id']}").status_code == 200
