"""The values that flow through a run: a ``Request`` in, a ``Result`` out, ``Usage`` inside.

Plain frozen dataclasses with no I/O, so every stage can be tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["ok", "error"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One valid input line, ready to send.

    ``body`` is the JSON body of ``POST /chat/completions`` with the job's defaults merged under
    the line's own fields (and the variant's overrides over them, when the job has variants).
    ``prompt_tokens`` is the prompt counted with tiktoken, or ``None`` when nothing needed the
    count when the line was read (no TPM limit, no ``--max-cost``: see ``tokens``);
    ``completion_budget`` is the worst-case completion (``max_tokens`` × ``n``). ``body_hash``
    identifies the body, so resume notices a changed line. ``input`` holds the row's own
    columns when the input is a table (CSV, Parquet, rows through a ``[template]``).
    """

    custom_id: str
    line: int
    body: dict[str, Any]
    metadata: dict[str, Any] | None = None
    prompt_tokens: int | None = None
    completion_budget: int = 0
    body_hash: str = ""
    variant: str | None = None
    input: dict[str, Any] | None = None

    @property
    def est_tokens(self) -> int:
        """What the TPM meter charges at admission: the prompt plus the completion budget (the
        budget alone for a prompt not counted, which no TPM meter then needs)."""
        return (self.prompt_tokens or 0) + self.completion_budget

    @property
    def key(self) -> str:
        """What the journal and resume know this request by: its id, and its variant if any."""
        return record_key(self.custom_id, self.variant)


def record_key(custom_id: str, variant: str | None) -> str:
    """The journal key of a request: ``custom_id``, or ``custom_id`` NUL ``variant``.

    Variant names never hold a NUL (``config`` checks them), so the key splits back at its last
    NUL; a job without variants keeps the plain ids its journals always had.
    """
    return custom_id if variant is None else f"{custom_id}\x00{variant}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Token usage of one answer, as the server reported it."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None

    def plus(self, other: Usage | None) -> Usage:
        """The usage of two answers together (a field is ``None`` only when both are)."""
        if other is None:
            return self

        def add(a: int | None, b: int | None) -> int | None:
            return None if a is None and b is None else (a or 0) + (b or 0)

        return Usage(
            prompt_tokens=add(self.prompt_tokens, other.prompt_tokens),
            completion_tokens=add(self.completion_tokens, other.completion_tokens),
            total_tokens=add(self.total_tokens, other.total_tokens),
            cached_tokens=add(self.cached_tokens, other.cached_tokens),
            reasoning_tokens=add(self.reasoning_tokens, other.reasoning_tokens),
        )

    @classmethod
    def from_body(cls, body: Any) -> Usage | None:
        """Read ``usage`` from a chat-completion body; ``None`` when absent or malformed."""
        if not isinstance(body, dict):
            return None
        usage = body.get("usage")
        if not isinstance(usage, dict):
            return None
        prompt_details = usage.get("prompt_tokens_details")
        completion_details = usage.get("completion_tokens_details")
        return cls(
            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
            completion_tokens=_int_or_none(usage.get("completion_tokens")),
            total_tokens=_int_or_none(usage.get("total_tokens")),
            cached_tokens=_int_or_none(
                prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None
            ),
            reasoning_tokens=_int_or_none(
                completion_details.get("reasoning_tokens")
                if isinstance(completion_details, dict)
                else None
            ),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """The final outcome of one request: exactly one per valid input line.

    ``body`` is the parsed JSON answer of the last attempt (or its raw text when it was not JSON,
    or ``None`` when no HTTP answer came). ``latency_s`` is the duration of the last attempt;
    ``started_at``/``finished_at`` (Unix seconds) span all attempts including backoff.
    ``ttft_s`` is the last attempt's time to first token (streamed requests only);
    ``schema_valid`` says whether the answer matched the request's JSON schema (``None`` when it
    was not checked) and ``schema_error`` why not. ``variant`` names the job's variant that
    asked (``None`` in a job without variants). ``choices_asked`` is the request's ``n`` when
    it asked for more than one choice (a server may answer with fewer). ``batch_id`` names
    the Batch API batch that answered (``None`` for a request sent online). ``messages`` are
    the messages as sent (after defaults, template and variant; before any re-ask), and
    ``input`` the row of a tabular input (``Request.input``).
    """

    custom_id: str
    line: int
    status: Status
    model: str | None
    attempts: int
    latency_s: float
    started_at: float
    finished_at: float
    status_code: int | None = None
    request_id: str | None = None
    body: Any = None
    usage: Usage | None = None
    error_code: str | None = None
    error_message: str | None = None
    metadata: dict[str, Any] | None = None
    cost_usd: float | None = None
    ttft_s: float | None = None
    schema_valid: bool | None = None
    schema_error: str | None = None
    endpoint: str | None = None
    variant: str | None = None
    choices_asked: int | None = None
    batch_id: str | None = None
    messages: list[Any] | None = None
    input: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject:
    """An input line that cannot become a request: it goes to ``OUTPUT.rejects.jsonl``."""

    line: int
    reason: str
    text: str
    custom_id: str | None = None


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None
