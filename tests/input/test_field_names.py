"""Near-miss request field names are warned about once, before they are sent, and still sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

import batcher
from batcher.input.field_names import near_miss


def test_near_misses_of_known_fields_and_names_left_alone() -> None:
    assert near_miss("max_token") == "max_tokens"
    assert near_miss("temprature") == "temperature"
    assert near_miss("stream_option") == "stream_options"
    # known fields, other servers' fields and deliberate names are no typos
    for name in ("max_tokens", "top_k", "min_p", "min_tokens", "user_id", "my_tag"):
        assert near_miss(name) is None, name


class Recorder:
    """A MockTransport handler: a good answer to everything, the bodies kept."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        answer = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": "ok"},
        }
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        return httpx.Response(200, json={"choices": [answer], "usage": usage})  # fmt: skip


def test_near_misses_are_warned_once_and_sent_unchanged(tmp_path: Path) -> None:
    lines = [
        {"prompt": "a", "temprature": 0.2},
        {"prompt": "b", "temprature": 0.3, "top_k": 5},
        {"prompt": "c", "max_token": 9},  # the [request] one again: warned already
        {"prompt": "d"},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    server = Recorder()
    result = batcher.run(
        {
            "job": {"input": str(src), "output": str(tmp_path / "o.jsonl")},
            "endpoint": {"base_url": "http://mock.test/v1"},
            "request": {"model": "m", "max_token": 5},
        },
        transport=httpx.MockTransport(server),
    )
    assert result.exit_code == 0, result.summary
    warnings = [line for line in result.log.splitlines() if "not a known field" in line]
    assert warnings == [
        "batcher: warning: request field 'max_token' ([request]) is not a known field; did you "
        "mean 'max_tokens'? It is sent as it is",
        "batcher: warning: request field 'temprature' (first on line 1) is not a known field; "
        "did you mean 'temperature'? It is sent as it is",
    ]
    assert len(server.bodies) == 4
    assert all(body["max_token"] in (5, 9) for body in server.bodies)
    assert sorted(body.get("temprature", 0) for body in server.bodies) == [0, 0, 0.2, 0.3]
