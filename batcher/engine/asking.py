"""A request asked: priced, reserved under the budget (``--max-cost``), sent with its retries
(``attempt.py``), and made into its one ``Result``, with its cost settled against the budget.

A price lookup can take 0.3 s: never on the event loop (in a thread, or made while the request
is out). One ``Result`` is built per request, priced: replacing a field of a frozen ``Result``
afterwards costs more than building it.
"""

from __future__ import annotations

import time

import anyio

from batcher.cost.budget import Budget
from batcher.cost.pricing import MAX_ANSWERING_MODELS, Pricer
from batcher.engine.attempt import Sender, Sent, maybe_billed
from batcher.engine.control import RunControl
from batcher.engine.endpoints import Router
from batcher.engine.outcomes import answering_model, result_of
from batcher.engine.usage_check import checked as usage_checked
from batcher.http.answers import Attempt
from batcher.output.resume import ResumePlan
from batcher.records import Request, Result


class Asker:
    """Asks requests through a ``Sender``, under the run's pricer and budget."""

    def __init__(
        self,
        sender: Sender,
        control: RunControl,
        pricer: Pricer,
        budget: Budget | None,
        plan: ResumePlan | None,
        encoding: str | None,
    ) -> None:
        """``plan``: what earlier runs recorded (a request it knows is counted as re-sent).
        ``encoding``: the job's token encoding, for a reservation's prompt count."""
        self._sender = sender
        self._control = control
        self._stats = control.stats
        self._stopping = control.stopping
        self._pricer = pricer
        self._budget = budget
        self._plan = plan
        self._encoding = encoding

    async def ask(self, request: Request, router: Router, *, first: bool = True) -> Result | None:
        """Send a request (with its retries) under the budget; its result, priced.

        ``None`` when the budget cannot take it (the run is stopping). ``first`` is false for
        a re-ask, which is not another submitted request.
        """
        pricer = self._pricer
        asked = request.body.get("model")
        if not pricer.known(asked):
            # Under --max-cost the reservation needs the price now; otherwise it is looked up
            # while the request is out.
            if self._budget is not None:
                await anyio.to_thread.run_sync(pricer.price, asked)
            else:
                pricer.prefetch(asked)
        reserved = self._reserve(request)
        if reserved is None:
            return None
        if first:
            self._stats.submitted += 1
            if self._plan and self._plan.known(request.key):
                self._stats.resent += 1
        started = time.time()
        sent = await self._sender.send(request, router, reserved)
        last, attempts, where = sent.last, sent.attempts, sent.where
        last = usage_checked(request, last)  # usage that cannot be true is dropped, and said
        model = answering_model(request, last)
        if not pricer.ready(asked, model, last.usage):
            await anyio.to_thread.run_sync(pricer.cost_of, asked, model, last.usage)
        cost = pricer.cost_of(asked, model, last.usage)
        if self._budget is not None:
            cost = self._settle(sent, last, reserved, cost, (asked, model))
        return result_of(request, last, attempts, started, where, model=model, cost=cost)

    def _settle(
        self,
        sent: Sent,
        last: Attempt,
        reserved: float,
        cost: float | None,
        models: tuple[object, str | None],
    ) -> float | None:
        """Settle a request's reservation with its cost; the cost to record (``models``: the
        model asked for and the one that answered, to say why a cost overshot).

        An answer without (valid) usage may have been billed, and so may a 2xx that could not
        be used: its worst case is counted and recorded (with what its retried attempts were
        charged), so a resumed run's budget starts from it too.
        """
        budget = self._budget
        assert budget is not None
        if self._pricer.answering_models_capped and not self._stopping.is_set():
            self._control.stop(
                f"--max-cost: the endpoint named more than {MAX_ANSWERING_MODELS} models in "
                "its answers; an answer's cost can no longer be known, so the cap cannot hold"
            )
        if not sent.reserved:
            cost = None  # ``last`` went unretried for the budget: in ``sent.charged``
        else:
            if cost is None and (last.ok or maybe_billed(last)):
                cost = reserved
            if budget.settle(reserved, cost or 0.0):
                self._control.stop(budget.overshoot(cost or 0.0, reserved, *models))
        if sent.charged:
            cost = (cost or 0.0) + sent.charged
        return cost

    def _reserve(self, request: Request) -> float | None:
        """Reserve the request's worst-case cost under ``--max-cost``; ``None`` if it cannot go
        (the run then stops, saying why)."""
        if self._budget is None:
            return 0.0
        model = request.body.get("model")
        price = self._pricer.price(model if isinstance(model, str) else None)
        reserved = self._budget.reserve_for(request, price, self._encoding)
        if isinstance(reserved, str):
            self._control.stop(reserved)
            return None
        return reserved
