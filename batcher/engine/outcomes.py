"""From attempts to records: a request's ``Result``, a re-ask and the record that combines both
asks, and the answers that stop a run (the engine's bookkeeping, without its I/O)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from batcher.cost.tokens import count_message_tokens, encoding_for_model
from batcher.engine.validation import Verdict, reask_body
from batcher.http.answers import Attempt, is_retryable_failure
from batcher.records import Request, Result


def reask_request(request: Request, answer: object, verdict: Verdict) -> Request:
    """The request that asks again, its token estimates grown by the two turns it adds."""
    body = reask_body(request.body, answer, verdict)
    if request.prompt_tokens is None:  # not counted: the engine counts it if a meter needs it
        return dataclasses.replace(request, body=body)
    model = body.get("model")
    added = count_message_tokens(
        body["messages"][-2:], encoding_for_model(model if isinstance(model, str) else None)
    )
    return dataclasses.replace(request, body=body, prompt_tokens=request.prompt_tokens + added)


def not_asked_again(verdict: Verdict) -> Verdict:
    return Verdict(False, f"{verdict.error}; not asked again: the run stopped", reask=False)


def combined(before: Result, after: Result) -> Result:
    """One record for a request asked twice: the later ok answer (else the earlier), with
    attempts, usage and cost of both."""
    kept = after if after.status == "ok" else before
    usage = after.usage if before.usage is None else before.usage.plus(after.usage)
    costs = [c for c in (before.cost_usd, after.cost_usd) if c is not None]
    return dataclasses.replace(
        kept,
        attempts=before.attempts + after.attempts,
        usage=usage,
        cost_usd=sum(costs) if costs else None,
        started_at=before.started_at,
        finished_at=after.finished_at,
        messages=before.messages,  # what was asked first, not the re-ask's longer thread
    )


def answering_model(request: Request, last: Attempt) -> str | None:
    """The model an ok answer names, else the one asked for."""
    body = last.body
    model = body.get("model") if last.ok and isinstance(body, dict) else None
    if isinstance(model, str):
        return model
    asked = request.body.get("model")
    return asked if isinstance(asked, str) else None


def result_of(
    request: Request,
    last: Attempt,
    attempts: int,
    started: float,
    endpoint: str | None,
    *,
    model: str | None,
    cost: float | None,
) -> Result:
    return Result(
        custom_id=request.custom_id,
        line=request.line,
        status="ok" if last.ok else "error",
        model=model,
        attempts=attempts,
        latency_s=last.latency_s,
        started_at=started,
        finished_at=time.time(),
        status_code=last.status_code,
        request_id=last.request_id,
        body=last.body,
        usage=last.usage,
        error_code=last.error_code,
        error_message=last.error_message,
        metadata=request.metadata,
        cost_usd=cost,
        ttft_s=last.ttft_s,
        endpoint=endpoint,
        variant=request.variant,
        choices_asked=choices_asked(request.body),
        messages=request.body.get("messages"),
        input=request.input,
    )


def choices_asked(body: Mapping[str, Any]) -> int | None:
    """The request's ``n`` when it asks for more than one choice, else ``None``."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else None


#: What an attempt that is not made any more (the outage outlasted its patience) returns.
UNREACHABLE = Attempt(
    ok=False,
    retryable=False,
    latency_s=0.0,
    error_code="connection_error",
    error_message="the endpoint is unreachable: not sent",
)


def cut_off(result: Result) -> bool:
    """Whether a failed request may have failed only because the run stopped: its failure
    is one a retry may clear (a refused connection in an outage, a 503...), and nothing was
    billed. Recorded, it would stay an error on a plain re-run; left out, the re-run sends it.
    """
    return (
        result.status == "error"
        and result.usage is None
        and not result.cost_usd
        and is_retryable_failure(result.status_code, result.error_code)
    )


def stops_the_run(result: Result) -> bool:
    """Answers that every later request would get too: a refused key, an exhausted quota."""
    return result.status_code in (401, 403) or result.error_code == "insufficient_quota"


def stop_reason(result: Result) -> str:
    detail = f"{result.status_code} {result.error_code}: {result.error_message}"
    if result.error_code == "insufficient_quota":
        return f"the account has no quota left ({detail}); add credits or raise the limit"
    return f"the endpoint refused the API key ({detail}); check the key and its permissions"
