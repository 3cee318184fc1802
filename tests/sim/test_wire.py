"""The simulator's streamed answers (``batcher.sim.wire.stream_events``), read back by batcher's
own stream reader (``batcher.http.streaming``) however the bytes are cut: the same answer."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from batcher.http.streaming import StreamReader
from batcher.sim.wire import stream_events

finish_reasons = st.sampled_from(["stop", "length", "content_filter"])


@st.composite
def answers(draw: st.DrawFn) -> dict[str, Any]:
    contents = draw(st.lists(st.text(max_size=60), min_size=1, max_size=3))
    choices = [
        {"index": i, "message": {"role": "assistant", "content": content},
         "finish_reason": draw(finish_reasons)}
        for i, content in enumerate(contents)
    ]  # fmt: skip
    usage = {"prompt_tokens": draw(st.integers(0, 99)), "completion_tokens": 5, "total_tokens": 9}
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "system_fingerprint": None, "choices": choices, "usage": usage}  # fmt: skip


@given(answers(), st.booleans(), st.lists(st.integers(1, 50), max_size=20))
def test_a_streamed_answer_reads_back_whole_however_it_is_cut(
    answer: dict[str, Any], include_usage: bool, cuts: list[int]
) -> None:
    events = stream_events(answer, include_usage=include_usage)
    assert events[-1] == b"data: [DONE]\n\n"
    data = b"".join(events)
    reader = StreamReader(0.0, usage_asked=include_usage)
    at = 0
    for size in cuts:  # the bytes as the network may hand them over
        reader.feed(data[at : at + size])
        at += size
    reader.feed(data[at:])
    reader.finish()
    assert reader.done and reader.problem() is None
    body = reader.body()
    got = [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]]
    want = [(c["index"], c["message"]["content"], c["finish_reason"]) for c in answer["choices"]]
    assert got == want
    assert body.get("usage") == (answer["usage"] if include_usage else None)
    assert (body["id"], body["model"]) == ("chatcmpl-1", "m")


def test_a_long_answer_comes_in_at_most_two_hundred_pieces() -> None:
    words = " ".join(f"w{i}" for i in range(10_000))
    answer = {
        "id": "a",
        "created": 1,
        "model": "m",
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"content": words}, "finish_reason": "stop"}],
    }
    events = stream_events(answer, include_usage=False)  # fmt: skip
    # a role chunk, the pieces, a finish chunk, [DONE]
    assert len(events) == 1 + 200 + 1 + 1
