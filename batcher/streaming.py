"""Reading a streamed chat completion (``stream: true``): server-sent events in, one body out.

``StreamReader`` is fed the response's lines as they arrive. It decodes the server-sent events
(``data:`` lines, an empty line ends an event) and folds every ``chat.completion.chunk`` into
the ``chat.completion`` body a non-streamed call would have returned: content, refusal and
logprobs concatenated per choice, tool calls merged by index, ``usage`` from the last chunk
(sent when the request has ``stream_options.include_usage``). It also notes when the first
token came.

The decoder is transport-neutral (lines of bytes from any HTTP client) rather than httpx-sse,
so the same code serves every transport batcher can post with.
"""

from __future__ import annotations

import json
import time
from typing import Any

#: The ``data:`` payload that ends an OpenAI stream.
DONE = "[DONE]"
EVENT_STREAM = "text/event-stream"

_DELTA_TEXTS = ("content", "refusal", "reasoning_content", "reasoning")


class StreamError(Exception):
    """The stream carried something that is not a chat-completion chunk, or an error event."""

    def __init__(self, message: str, *, error: Any = None) -> None:
        super().__init__(message)
        self.error = error


class StreamReader:
    """Decodes SSE lines and assembles the chunks; ``body()`` once ``done`` is true.

    ``start`` is the ``time.perf_counter()`` at which the request was sent; ``ttft_s`` is the
    time from then to the first chunk that carried content, a refusal or a tool call.
    """

    def __init__(self, start: float) -> None:
        self._start = start
        self._data: list[str] = []
        self._event = ""
        self.done = False
        self.chunks = 0
        self.ttft_s: float | None = None
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None

    def feed_line(self, raw: bytes | str) -> None:
        """One line of the response body, with or without its line ending."""
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if not line:
            self._dispatch()
            return
        if line.startswith(":"):
            return  # a comment: keep-alive pings
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value

    def finish(self) -> None:
        """The body ended: an event not followed by an empty line still counts."""
        self._dispatch()

    def body(self) -> dict[str, Any]:
        """The assembled ``chat.completion`` body."""
        body: dict[str, Any] = {
            "id": self._head.get("id"),
            "object": "chat.completion",
            "created": self._head.get("created"),
            "model": self._head.get("model"),
        }
        for key, value in self._head.items():
            if key not in body and key not in ("choices", "usage", "object"):
                body[key] = value
        body["choices"] = [self._choices[i].as_dict(i) for i in sorted(self._choices)]
        if self._usage is not None:
            body["usage"] = self._usage
        return body

    def _dispatch(self) -> None:
        if not self._data:
            self._event = ""
            return
        data, event = "\n".join(self._data), self._event
        self._data, self._event = [], ""
        if data.strip() == DONE:
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            raise StreamError(f"a stream event is not JSON: {_snippet(data)}") from None
        if not isinstance(chunk, dict):
            raise StreamError(f"a stream event is not a JSON object: {_snippet(data)}")
        if event == "error" or "error" in chunk:
            error = chunk.get("error", chunk)
            detail = error.get("message") if isinstance(error, dict) else error
            raise StreamError(f"the server sent an error in the stream: {detail}", error=error)
        self._add(chunk)

    def _add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        for key, value in chunk.items():
            if key not in self._head and value is not None:
                self._head[key] = value
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for position, delta_choice in enumerate(choices):
            if not isinstance(delta_choice, dict):
                continue
            index = delta_choice.get("index")
            index = index if isinstance(index, int) and not isinstance(index, bool) else position
            choice = self._choices.get(index)
            if choice is None:
                choice = self._choices[index] = _Choice()
            if choice.add(delta_choice) and self.ttft_s is None:
                self.ttft_s = time.perf_counter() - self._start


class _Choice:
    """One choice being assembled from its deltas."""

    def __init__(self) -> None:
        self.role: str | None = None
        self.texts: dict[str, list[str]] = {}
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: Any = None
        self.logprobs: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}

    def add(self, delta_choice: dict[str, Any]) -> bool:
        """Fold one delta in; true when it carried output (text or a tool call)."""
        if delta_choice.get("finish_reason") is not None:
            self.finish_reason = delta_choice["finish_reason"]
        logprobs = delta_choice.get("logprobs")
        if isinstance(logprobs, dict):
            merged = self.logprobs if self.logprobs is not None else {}
            for key, items in logprobs.items():
                if isinstance(items, list):
                    kept = merged.get(key)
                    merged[key] = [*kept, *items] if isinstance(kept, list) else list(items)
                else:
                    merged.setdefault(key, items)
            self.logprobs = merged
        delta = delta_choice.get("delta")
        if not isinstance(delta, dict):
            return False
        output = False
        for key, value in delta.items():
            if key == "role":
                self.role = value if isinstance(value, str) else self.role
            elif key in _DELTA_TEXTS:
                if isinstance(value, str):
                    self.texts.setdefault(key, []).append(value)
                    output = output or bool(value)
            elif key == "tool_calls":
                output = self._add_tool_calls(value) or output
            elif value is not None:
                self.extra[key] = value
        return output

    def _add_tool_calls(self, calls: Any) -> bool:
        if not isinstance(calls, list):
            return False
        for position, call in enumerate(calls):
            if not isinstance(call, dict):
                continue
            index = call.get("index")
            index = index if isinstance(index, int) and not isinstance(index, bool) else position
            merged = self.tool_calls.setdefault(index, {})
            for key, value in call.items():
                if key == "index" or value is None:
                    continue
                if key == "function" and isinstance(value, dict):
                    function = merged.setdefault("function", {})
                    for part, text in value.items():
                        if part in ("name", "arguments") and isinstance(text, str):
                            function[part] = function.get(part, "") + text
                        elif text is not None:
                            function[part] = text
                else:
                    merged[key] = value
        return bool(calls)

    def as_dict(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role or "assistant"}
        message["content"] = "".join(self.texts["content"]) if "content" in self.texts else None
        message["refusal"] = "".join(self.texts["refusal"]) if "refusal" in self.texts else None
        for key in ("reasoning_content", "reasoning"):
            if key in self.texts:
                message[key] = "".join(self.texts[key])
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        message.update(self.extra)
        return {
            "index": index,
            "message": message,
            "finish_reason": self.finish_reason,
            "logprobs": self.logprobs,
        }


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 120 else text[:117] + "..."
