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

import time
from typing import Any

from batcher import jsonfast

#: The ``data:`` payload that ends an OpenAI stream.
DONE = "[DONE]"
EVENT_STREAM = "text/event-stream"

_CHOICE_KEYS = frozenset({"index", "delta", "finish_reason", "logprobs"})
_DELTA_TEXTS = ("content", "refusal", "reasoning_content", "reasoning")
#: Fields of a tool call that come whole, once (llama-cpp-python repeats them in every chunk).
_SET_ONCE = frozenset({"id", "type"})
_CALL_ORDER = ("id", "type", "function")
#: Top-level chunk fields that belong to one chunk, not to the answer.
_PER_CHUNK = frozenset({"choices", "usage", "object", "obfuscation"})


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

    def __init__(self, start: float, *, usage_asked: bool = False) -> None:
        self._start = start
        self._usage_asked = usage_asked
        self._pending = b""
        self._data: list[str] = []
        self._event = ""
        self.done = False
        self.chunks = 0
        self.ttft_s: float | None = None
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None

    def feed(self, data: bytes) -> None:
        """Bytes of the response body as they arrive, split into lines here.

        Only CR, LF and CRLF end a line (the SSE rule): U+2028 and friends may stand raw
        inside a JSON string, so a general-purpose line splitter would cut an event in two.
        """
        buffer = self._pending + data
        # A CR at the very end may be the first half of a CRLF: it waits for the next bytes.
        tail_cr = buffer.endswith(b"\r")
        if tail_cr:
            buffer = buffer[:-1]
        lines = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._pending = lines.pop() + (b"\r" if tail_cr else b"")
        for line in lines:
            self.feed_line(line)
            if self.done:
                return

    def feed_line(self, raw: bytes | str) -> None:
        """One line of the response body, without its line ending."""
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        line = line.removeprefix("\ufeff") if not self.chunks else line
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
        pending, self._pending = self._pending.rstrip(b"\r"), b""
        if pending:
            self.feed_line(pending)
        self._dispatch()

    def problem(self) -> str | None:
        """Why the stream is not a whole answer, or ``None`` when it is.

        Whole means every choice has its ``finish_reason`` (and usage came, when it was asked
        for). ``[DONE]`` alone is not enough (a proxy may end a broken stream cleanly), and a
        stream that is whole but lost its ``[DONE]`` is kept rather than paid for again.
        """
        if not self._choices:
            return "the stream has no choices"
        unfinished = [i for i, c in self._choices.items() if c.finish_reason is None]
        if unfinished and self.done:
            # llama-cpp-python does this to a running stream when another request arrives
            return (
                "the server ended the stream before the answer finished ([DONE] without "
                f"finish_reason for choice {unfinished[0]})"
            )
        if unfinished:
            return f"choice {unfinished[0]} has no finish_reason"
        if not self.done and self._usage_asked and self._usage is None:
            return "the stream ended before [DONE] and its usage"
        return None

    def body(self) -> dict[str, Any]:
        """The assembled ``chat.completion`` body."""
        body: dict[str, Any] = {
            "id": self._head.get("id"),
            "object": "chat.completion",
            "created": self._head.get("created"),
            "model": self._head.get("model"),
        }
        for key, value in self._head.items():
            if key not in body:
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
            chunk = jsonfast.loads_answer(data)
        except (ValueError, RecursionError):
            raise StreamError(f"a stream event is not JSON: {_snippet(data)}") from None
        if not isinstance(chunk, dict):
            raise StreamError(f"a stream event is not a JSON object: {_snippet(data)}")
        if event == "error" or chunk.get("error") is not None:
            error = chunk.get("error", chunk)
            detail = error.get("message") if isinstance(error, dict) else error
            raise StreamError(f"the server sent an error in the stream: {detail}", error=error)
        self._add(chunk)

    def _add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        head = self._head
        for key, value in chunk.items():
            # Azure's first chunk (prompt_filter_results) has an empty id, model and created:
            # the first non-empty value counts.
            if value not in (None, "", 0) and not head.get(key) and key not in _PER_CHUNK:
                head[key] = value
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
        self.function_call: dict[str, Any] = {}  # the legacy single call (``functions``)
        self.finish_reason: Any = None
        self.logprobs: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}  # message fields beyond the known ones
        self.choice_extra: dict[str, Any] = {}  # e.g. vLLM's stop_reason, Azure's filter results

    def add(self, delta_choice: dict[str, Any]) -> bool:
        """Fold one delta in; true when it carried output (text or a tool call)."""
        if delta_choice.get("finish_reason") is not None:
            self.finish_reason = delta_choice["finish_reason"]
        for key, value in delta_choice.items():
            if key not in _CHOICE_KEYS and value is not None:
                self.choice_extra[key] = value
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
            elif key == "function_call" and isinstance(value, dict):
                _merge_function(self.function_call, value)
                output = True
            elif value is not None:
                self.extra[key] = value
        return output

    def _add_tool_calls(self, calls: Any) -> bool:
        if not isinstance(calls, list):
            return False
        for call in calls:
            if not isinstance(call, dict):
                continue
            index = call.get("index")
            if not isinstance(index, int) or isinstance(index, bool):
                index = self._index_of(call.get("id"))
            merged = self.tool_calls.setdefault(index, {})
            for key, value in call.items():
                if key == "index" or value is None:
                    continue
                if key == "function" and isinstance(value, dict):
                    _merge_function(merged.setdefault("function", {}), value)
                elif key in _SET_ONCE:
                    _set_once(merged, key, value)
                else:
                    merged[key] = value
        return bool(calls)

    def _index_of(self, call_id: Any) -> int:
        """Where a tool-call fragment without an ``index`` goes: a new call when it brings a
        new id, else the last call."""
        if call_id is not None and all(c.get("id") != call_id for c in self.tool_calls.values()):
            return len(self.tool_calls)
        return max(self.tool_calls, default=0)

    def as_dict(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role or "assistant"}
        message["content"] = "".join(self.texts["content"]) if "content" in self.texts else None
        message["refusal"] = "".join(self.texts["refusal"]) if "refusal" in self.texts else None
        for key in ("reasoning_content", "reasoning"):
            if key in self.texts:
                message[key] = "".join(self.texts[key])
        if self.tool_calls:
            message["tool_calls"] = [_in_order(self.tool_calls[i]) for i in sorted(self.tool_calls)]
        if self.function_call:
            message["function_call"] = self.function_call
        message.update(self.extra)
        return {
            "index": index,
            "message": message,
            "finish_reason": self.finish_reason,
            "logprobs": self.logprobs,
            **self.choice_extra,
        }


def _merge_function(function: dict[str, Any], fragment: dict[str, Any]) -> None:
    """Fold one fragment of a function call in: ``arguments`` appended, ``name`` once.

    OpenAI sends the name in the first fragment only; llama-cpp-python repeats it (and the
    call's id) in every one, so appending it gave ``get_weatherget_weather``. A fragment equal
    to the name so far is such a repeat; any other is appended, for a server that splits a
    name across fragments as it splits the arguments.
    """
    for part, text in fragment.items():
        if part == "arguments" and isinstance(text, str):
            function[part] = function.get(part, "") + text
        elif part == "name" and isinstance(text, str):
            name = function.get(part) or ""
            function[part] = name if text == name else name + text
        elif text is not None:
            function[part] = text


def _in_order(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call's fields in the order of a plain answer (id, type, function), whatever
    order its fragments brought them in, so a streamed record reads as the plain one."""
    return {**{key: call[key] for key in _CALL_ORDER if key in call}, **call}


def _set_once(merged: dict[str, Any], key: str, value: Any) -> None:
    """Keep the first non-empty ``value`` of ``key``; a later one (a repeat) changes nothing."""
    if value not in (None, "") and merged.get(key) in (None, ""):
        merged[key] = value


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 120 else text[:117] + "..."
