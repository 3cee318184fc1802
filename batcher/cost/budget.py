"""A hard spending cap (``--max-cost``) with reservations.

Before a request is sent it reserves its worst-case cost (its prompt uncached plus its whole
completion budget); when the answer comes the reservation is settled with the real cost. A
request whose reservation would take spent + reserved past the cap is not sent, and dispatch
stops, so the total never passes the cap even with every request in flight costing its worst.
The cap counts what earlier runs of the same output spent (from the journal), so a resumed run
continues under a new, higher cap.

A reservation is a bound, not a promise: a gateway may answer with a pricier model than the one
asked (the answer is costed at the model that answered), or a server bill more than the bound.
The first answer that cost more than its reservation stops dispatch, so the total passes the
cap by no more than what the requests then in flight overshoot. Usage that cannot be true
(``usage_check``) is never credited: such an answer costs its reservation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batcher.cost.money import usd
from batcher.errors import ConfigError
from batcher.input.requests import estimate_prompt_tokens, prompt_bound

if TYPE_CHECKING:
    from batcher.config import JobConfig
    from batcher.cost.pricing import Price, Pricer
    from batcher.records import Request


#: How the stop reasons of a request ``--max-cost`` cannot bound begin: a model with no price,
#: no completion limit (``runner.progress.how_to_go_on`` says what the next run needs).
_NO_PRICE = "no price known for model"
UNPRICED = f"--max-cost: {_NO_PRICE}"
NO_COMPLETION_LIMIT = "--max-cost: needs max_tokens"


def unpriced_problem(model: object) -> str:
    """Why ``--max-cost`` cannot run requests to ``model``, and how to give it a price."""
    return (
        f"{_NO_PRICE} {model!r}, so its cost cannot be capped; add "
        f'[pricing."{model}"] input = ..., output = ... (USD per million tokens) to the job'
    )


def check_priced(job: JobConfig, pricer: Pricer) -> None:
    """Raise ``ConfigError`` when ``--max-cost`` is set and a model the job names (its
    ``[request]`` default, its variants') has no price: nothing could be sent.

    Models named only by the lines are checked as they come (``Budget.reserve_for``).
    """
    if job.limits.max_cost_usd is None:
        return
    models = [job.request.get("model")] + [v.request.get("model") for v in job.variants]
    for model in dict.fromkeys(m for m in models if isinstance(m, str) and m):
        if pricer.price(model) is None:
            raise ConfigError("--max-cost", unpriced_problem(model))


class Budget:
    """Spent and reserved dollars against a cap."""

    def __init__(self, cap_usd: float, *, spent_before: float = 0.0) -> None:
        self.cap = cap_usd
        self.spent = spent_before
        self.reserved = 0.0
        #: Set when a request could not be sent for a reason of the job's configuration (a
        #: model with no price, no completion limit) rather than the cap being reached.
        self.misconfigured = False

    def try_reserve(self, amount: float) -> bool:
        """Reserve ``amount``; False (and nothing reserved) if that could pass the cap."""
        if self.spent + self.reserved + amount > self.cap:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> bool:
        """Replace a reservation by what the request really cost (never a credit); true when
        it cost more than was reserved for it."""
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += max(0.0, actual)
        return actual > reserved * (1 + 1e-9) + 1e-12  # past float noise

    def overshoot(self, actual: float, reserved: float, asked: object, answered: object) -> str:
        """Why dispatch stops after an answer cost more than its reservation."""
        by = (
            f"answered by {answered!r}, priced above {asked!r}"
            if answered != asked
            else ("billed for more tokens than its bound")
        )
        return (
            f"--max-cost ${self.cap:g}: an answer cost {usd(actual)}, more than the "
            f"{usd(reserved)} reserved for it ({by}); no new requests, so the cap holds "
            "within those in flight"
        )

    def reserve_for(
        self, request: Request, price: Price | None, encoding: str | None
    ) -> float | str:
        """Reserve ``request``'s worst case at ``price``: the amount reserved, or why it
        cannot be sent (a ``str``: the run stops with it). ``encoding`` counts a prompt that
        was not counted when read."""
        model = request.body.get("model")
        if price is None:
            self.misconfigured = True
            return f"--max-cost: {unpriced_problem(model)}"
        body = request.body
        if not (body.get("max_tokens") or body.get("max_completion_tokens")):
            self.misconfigured = True
            return (
                f"{NO_COMPLETION_LIMIT} (or max_completion_tokens) on every request, to "
                "bound what an answer can cost; set it in the job's [request] or on the lines"
            )
        counted = request.prompt_tokens
        if counted is None:  # not counted when read (an Engine fed by other than the runner)
            counted = estimate_prompt_tokens(body, encoding)
        worst = price.worst_case(prompt_bound(body, counted), request.completion_budget)
        if not self.try_reserve(worst):
            return (
                f"--max-cost ${self.cap:g} reached: {usd(self.spent)} spent, "
                f"{usd(self.reserved)} reserved by requests in flight, next would reserve "
                f"{usd(worst)}"
            )
        return worst
