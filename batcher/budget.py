"""A hard spending cap (``--max-cost``) with reservations.

Before a request is sent it reserves its worst-case cost (its prompt uncached plus its whole
completion budget); when the answer comes the reservation is settled with the real cost. A
request whose reservation would take spent + reserved past the cap is not sent, and dispatch
stops, so the total never passes the cap even with every request in flight costing its worst.
The cap counts what earlier runs of the same output spent (from the journal), so a resumed run
continues under a new, higher cap.
"""

from __future__ import annotations


class Budget:
    """Spent and reserved dollars against a cap."""

    def __init__(self, cap_usd: float, *, spent_before: float = 0.0) -> None:
        self.cap = cap_usd
        self.spent = spent_before
        self.reserved = 0.0

    def try_reserve(self, amount: float) -> bool:
        """Reserve ``amount``; False (and nothing reserved) if that could pass the cap."""
        if self.spent + self.reserved + amount > self.cap:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        """Replace a reservation by what the request really cost."""
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += actual
