"""Requests cut into chunks: every request in exactly one, one model each, within the limits,
with keys that the same plan gives again."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from batcher.batch.chunks import batch_line, chunk_key, plan_chunks
from batcher.records import Request

MODELS = ("gpt-4o-mini", "gpt-4o", "m3")


def request(i: int, model: str | None, text: str = "hi", variant: str | None = None) -> Request:
    body: dict[str, object] = {"messages": [{"role": "user", "content": text}]}
    if model is not None:
        body["model"] = model
    return Request(custom_id=f"r{i}", line=i + 1, body=body, variant=variant)


specs = st.lists(st.tuples(st.sampled_from(MODELS), st.text(max_size=300)), min_size=0, max_size=60)


@settings(max_examples=80, deadline=None)
@given(
    specs=specs,
    max_requests=st.integers(1, 12),
    max_bytes=st.integers(100, 3000),
    job=st.text(min_size=1, max_size=20),
)
def test_every_request_in_one_chunk_of_one_model_within_limits(
    specs: list[tuple[str, str]], max_requests: int, max_bytes: int, job: str
) -> None:
    requests = [request(i, model, text) for i, (model, text) in enumerate(specs)]
    plan = plan_chunks(requests, job=job, max_requests=max_requests, max_bytes=max_bytes)
    placed = [r.custom_id for chunk in plan.chunks for r in chunk.requests]
    refused = [r.custom_id for r, _ in plan.refused]
    assert sorted(placed + refused) == sorted(r.custom_id for r in requests)
    assert len(set(placed)) == len(placed)
    for chunk in plan.chunks:
        assert {r.body["model"] for r in chunk.requests} == {chunk.model}
        assert 1 <= len(chunk.requests) <= max_requests
        assert chunk.size <= max_bytes
        # the lines are the requests' own, in the Batch API's shape
        lines = [json.loads(line) for line in chunk.lines]
        assert [line["custom_id"] for line in lines] == [r.custom_id for r in chunk.requests]
        assert all(line["method"] == "POST" for line in lines)
        assert all(line["url"] == "/v1/chat/completions" for line in lines)
    # a refused request is one whose line alone is over the limit
    assert all(len(batch_line(r)) > max_bytes for r, _ in plan.refused)
    again = plan_chunks(list(requests), job=job, max_requests=max_requests, max_bytes=max_bytes)
    assert [c.key for c in again.chunks] == [c.key for c in plan.chunks]
    keys = [c.key for c in plan.chunks]
    assert len(set(keys)) == len(keys)


def test_input_order_is_kept_within_a_model_and_a_new_chunk_starts_at_the_limit() -> None:
    requests = [request(i, MODELS[i % 2]) for i in range(7)]
    plan = plan_chunks(requests, job="j", max_requests=2, max_bytes=10_000)
    assert [[r.custom_id for r in c.requests] for c in plan.chunks] == [
        ["r0", "r2"],
        ["r4", "r6"],
        ["r1", "r3"],
        ["r5"],
    ]


def test_keys_change_with_the_job_the_round_and_the_ids() -> None:
    requests = [request(i, "m") for i in range(3)]
    base = plan_chunks(requests, job="j", max_requests=10, max_bytes=10_000).chunks[0].key
    other_job = plan_chunks(requests, job="k", max_requests=10, max_bytes=10_000)
    resubmitted = plan_chunks(requests, job="j", max_requests=10, max_bytes=10_000, round=1)
    fewer = plan_chunks(requests[:2], job="j", max_requests=10, max_bytes=10_000)
    assert len({base, other_job.chunks[0].key, resubmitted.chunks[0].key, fewer.chunks[0].key}) == 4
    # ids are length-prefixed: "a\0b" is not "a" then "b"
    assert chunk_key("j", "m", 0, ["a\x00b"]) != chunk_key("j", "m", 0, ["a", "b"])


def test_no_model_and_oversized_lines_are_refused_with_a_reason() -> None:
    requests = [request(0, None), request(1, "m", "x" * 500), request(2, "m")]
    plan = plan_chunks(requests, job="j", max_requests=10, max_bytes=300)
    reasons = {r.custom_id: reason for r, reason in plan.refused}
    assert "no model" in reasons["r0"]
    assert "over max_bytes (300)" in reasons["r1"]
    assert [r.custom_id for r in plan.chunks[0].requests] == ["r2"]


def test_streaming_fields_are_left_out_and_variants_get_their_own_line_id(tmp_path: Path) -> None:
    streamed = Request(
        custom_id="a",
        line=1,
        body={"model": "m", "messages": [], "stream": True, "stream_options": {"x": 1}},
        variant="v2",
    )
    plan = plan_chunks([streamed], job="j", max_requests=10, max_bytes=10_000)
    [chunk] = plan.chunks
    [line] = [
        json.loads(raw) for raw in chunk.write(tmp_path / "c.jsonl").read_bytes().splitlines()
    ]
    assert line["body"] == {"model": "m", "messages": []}
    assert line["custom_id"] == "a\x00v2"
    assert chunk.by_custom_id() == {"a\x00v2": streamed}
    assert chunk.metadata("j") == {"batcher_job": "j", "batcher_chunk": chunk.key}
