"""How the simulator's answers go on the wire: whole, streamed as server-sent events, or broken
off on purpose (the transport faults), over raw ASGI messages."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio

from batcher.sim.faults import JSON_TYPE

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

#: How long a "stall" fault waits before sending the body (a client's timeout should fire).
STALL_S = 3600.0


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    headers: Headers
    content_type: bytes = JSON_TYPE
    transport_fault: str | None = None
    events: list[bytes] | None = None  # a streamed answer's server-sent events


async def send_response(
    send: Send, response: Response, receive: Receive | None = None, chunk_s: float = 0.0
) -> None:
    if response.events is not None:
        await _send_stream(send, response, receive, chunk_s)
        return
    headers = [
        (b"content-type", response.content_type),
        (b"content-length", str(len(response.body)).encode()),
        *response.headers,
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    fault = response.transport_fault
    # Returning before the response is complete makes uvicorn close the connection: to the
    # client, the peer hung up (``batcher.sim.serve`` filters out the line uvicorn logs).
    if fault == "reset_headers":
        return
    if fault == "reset_body":
        half = response.body[: len(response.body) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})
        return
    if fault == "stall":
        await _stall(receive)
        return
    await send({"type": "http.response.body", "body": response.body})


def include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


#: Chunks a streamed choice's content is split into at most (a huge answer is not a million).
_MAX_PIECES = 200


def stream_events(answer: Mapping[str, Any], *, include_usage: bool) -> list[bytes]:
    """The server-sent events OpenAI streams for ``answer``: a role chunk, one chunk a word,
    a finish chunk per choice (choices interleaved), the usage chunk when asked, ``[DONE]``."""
    head = {key: answer[key] for key in ("id", "created", "model", "system_fingerprint")}
    head["object"] = "chat.completion.chunk"
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], **extra}

    per_choice = []
    for choice in answer["choices"]:
        index, content = choice["index"], choice["message"]["content"]
        words = content.split(" ")
        size = max(1, math.ceil(len(words) / _MAX_PIECES))
        pieces = [
            ("" if start == 0 else " ") + " ".join(words[start : start + size])
            for start in range(0, len(words), size)
        ]
        chunks = [chunk(index, {"role": "assistant", "content": "", "refusal": None})]
        chunks += [chunk(index, {"content": piece}) for piece in pieces]
        chunks.append(chunk(index, {}, choice["finish_reason"]))
        per_choice.append(chunks)
    ordered = [c for group in itertools.zip_longest(*per_choice) for c in group if c is not None]
    if include_usage:
        ordered.append({**head, "choices": [], "usage": answer["usage"]})
    events = [b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n" for c in ordered]
    events.append(b"data: [DONE]\n\n")
    return events


async def _send_stream(
    send: Send, response: Response, receive: Receive | None, chunk_s: float
) -> None:
    """Send a streamed answer an event at a time (chunked: no content-length)."""
    start = {"type": "http.response.start", "status": response.status}
    headers = [(b"content-type", response.content_type), (b"cache-control", b"no-cache")]
    await send({**start, "headers": [*headers, *response.headers]})
    events = response.events or []
    fault = response.transport_fault
    if fault == "reset_headers":
        return
    if fault == "stall":
        await _stall(receive)
        return
    if fault == "reset_body":
        events = events[: len(events) // 2]
    for i, event in enumerate(events):
        if i and chunk_s > 0:
            await anyio.sleep(chunk_s)
        await send({"type": "http.response.body", "body": event, "more_body": True})
    if fault == "reset_body":
        return  # returning mid-body: uvicorn drops the connection without ending the chunks
    await send({"type": "http.response.body", "body": b""})


async def _stall(receive: Receive | None) -> None:
    """Until the client gives up and hangs up (or STALL_S): a stalled handler must not hold
    the server's shutdown hostage."""
    with anyio.move_on_after(STALL_S):
        while receive is not None and (await receive())["type"] != "http.disconnect":
            pass
        if receive is None:
            await anyio.sleep(STALL_S)
