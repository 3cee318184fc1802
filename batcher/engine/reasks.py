"""The ``response_format`` check of an ok answer, and the re-asks while it is invalid.

Before each re-ask the answer so far is journaled provisionally, so a crash mid-way does not
lose what was paid for; the final record replaces it. The result keeps the last ok answer;
its attempts, usage and cost add up every ask.
"""

from __future__ import annotations

import dataclasses

from batcher.config import ValidateConfig
from batcher.engine.asking import Asker
from batcher.engine.control import RunControl
from batcher.engine.endpoints import Router
from batcher.engine.outcomes import combined, not_asked_again, reask_request
from batcher.engine.recording import Recorder
from batcher.engine.validation import Verdict, check_answer, expected_format
from batcher.records import Request, Result


class Reasker:
    """Checks ok answers against their request's ``response_format``; re-asks while invalid."""

    def __init__(
        self, validate: ValidateConfig, asker: Asker, recorder: Recorder, control: RunControl
    ) -> None:
        self._max_reasks = validate.max_reasks
        self._asker = asker
        self._recorder = recorder
        self._stopping = control.stopping

    async def check(self, request: Request, result: Result, router: Router) -> tuple[Result, int]:
        """The result with its verdict, and the re-asks sent."""
        expected = expected_format(request.body)
        if expected is None:
            return result, 0
        verdict = check_answer(result.body, expected)
        asked, reasks = request, 0
        while verdict.valid is False and verdict.reask and reasks < self._max_reasks:
            if self._stopping.is_set() or not self._journal_provisionally(request, result, verdict):
                verdict = not_asked_again(verdict)
                break
            asked = reask_request(asked, result.body, verdict)
            answer = await self._asker.ask(asked, router, first=False)
            if answer is None:  # the budget is spent
                verdict = not_asked_again(verdict)
                break
            reasks += 1
            result = combined(result, answer)
            if answer.status != "ok":
                failed = f"{verdict.error}; re-ask {reasks} failed: {answer.error_code}"
                verdict = Verdict(False, failed)
                break
            verdict = check_answer(result.body, expected)
        checked = dataclasses.replace(
            result, schema_valid=verdict.valid, schema_error=verdict.error
        )
        return checked, reasks

    def _journal_provisionally(self, request: Request, result: Result, verdict: Verdict) -> bool:
        """Journal an invalid answer before it is re-asked; false if the journal failed."""
        pending = dataclasses.replace(
            result, schema_valid=False, schema_error=f"{verdict.error} (re-ask under way)"
        )
        return self._recorder.journal(pending, request.body_hash, provisional=True)
