"""Several endpoints in one job: each with its own client, limits and outage state, and the
router that picks one for every attempt.

The router sends an attempt where it can go soonest: endpoints that are down (see
``outage.py``) come last; then those that must wait (a 429 pause, an RPM or TPM meter without
credit, no free slot); among the rest, the one with the fewest requests in flight for its
weight, discounted by how often it has failed lately. So the load follows the weights while
every endpoint has room, shifts to the others when one is rate-limited or failing, and the
combined throughput is the sum of what each allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from batcher.engine.outage import Outage
from batcher.http.client import ChatClient
from batcher.limits.endpoint import Limits

#: How fast the failure rate follows new outcomes (an exponentially weighted average).
FAILURE_SMOOTHING = 0.1
#: The same for the failure share that tells sporadic failures from a failing server: slower
#: (about the last 50 attempts), so a few failures close together do not swing it.
SHARE_SMOOTHING = 0.02
#: Below this share of failed attempts an endpoint is steady: its failures are sporadic (a
#: request's bad luck, not the server's state). A steady lane's refused requests lend their
#: workers while they wait (``pool``), and wait the first step of the backoff however often
#: they failed (``retry``): the pool's load is the same either way, only the unlucky request
#: is slower. Past it, both stop: waiting requests keep their places and back off
#: exponentially, so the lane slows down with a server that fails much of what it gets.
STEADY_BELOW = 0.25
#: The least health an endpoint can have: a failing endpoint still gets the odd request,
#: which is how the router notices it has recovered.
MIN_HEALTH = 0.05
#: Waits shorter than this count as none (a meter's pacing between two requests).
NEGLIGIBLE_WAIT_S = 0.05


@dataclass(eq=False, kw_only=True)
class Endpoint:
    """One endpoint's runtime state."""

    name: str
    client: ChatClient
    limits: Limits
    outage: Outage
    weight: float = 1.0
    failure_rate: float = field(default=0.0)
    failure_share: float = field(default=0.0)  # the same, slower: ``SHARE_SMOOTHING``
    assigned: int = 0  # attempts routed here and not over yet (waiting on limits included)
    #: Called once with the limits after the endpoint's first ok answer, to remember what
    #: the server announced (``known_limits``); ``None`` once called, or not wanted.
    remember: Callable[[Limits], object] | None = None

    def record(self, ok: bool) -> None:
        """Note an attempt's outcome (a server error or a failed connection is not ok)."""
        failed = 0.0 if ok else 1.0
        self.failure_rate += FAILURE_SMOOTHING * (failed - self.failure_rate)
        self.failure_share += SHARE_SMOOTHING * (failed - self.failure_share)

    def wait_s(self) -> float:
        """Seconds before this endpoint's limits let another request go (0 if now)."""
        limits = self.limits
        wait = limits.paused_s
        if limits.rpm is not None:
            wait = max(wait, limits.rpm.delay())
        if limits.tpm is not None:
            wait = max(wait, limits.tpm.delay())
        return wait


class Router:
    """Picks the endpoint for each attempt (see the module's docstring)."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self.endpoints = list(endpoints)

    @property
    def all_exhausted(self) -> bool:
        """Every endpoint has been down for longer than its outage patience."""
        return all(e.outage.exhausted for e in self.endpoints)

    def steady(self) -> bool:
        """Whether some endpoint that takes requests (not down) fails only sporadically
        (``STEADY_BELOW``): where the router can send a retry to a server that answers most
        attempts. An endpoint that is down gets no attempts, so its share says nothing of now."""
        return any(
            e.failure_share < STEADY_BELOW and not e.outage.active and not e.outage.exhausted
            for e in self.endpoints
        )

    def another_is_up(self, endpoint: Endpoint) -> bool:
        """Whether some other endpoint answered its last request (a failover target)."""
        return any(e is not endpoint and not e.outage.consecutive_failures for e in self.endpoints)

    def choose(self) -> Endpoint | None:
        """The endpoint for the next attempt; ``None`` when every one is past its patience."""
        if len(self.endpoints) == 1:
            only = self.endpoints[0]
            return None if only.outage.exhausted else only
        best: Endpoint | None = None
        best_key: tuple[bool, float, bool, float] | None = None
        for endpoint in self.endpoints:
            if endpoint.outage.exhausted:
                continue
            wait = endpoint.wait_s()
            # a refused connection since its last answer: the least health at once
            failing = endpoint.outage.consecutive_failures > 0
            health = MIN_HEALTH if failing else max(MIN_HEALTH, 1.0 - endpoint.failure_rate)
            key = (
                endpoint.outage.active,
                wait if wait > NEGLIGIBLE_WAIT_S else 0.0,
                endpoint.assigned >= endpoint.limits.concurrency.total_tokens,
                (endpoint.assigned + 1) / (endpoint.weight * health),
            )
            if best_key is None or key < best_key:
                best, best_key = endpoint, key
        return best
