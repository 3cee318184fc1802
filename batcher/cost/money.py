"""Dollar amounts as batcher prints them: to the hundredth of a cent, and a nonzero amount too
small for that with its first two significant digits, so that a cost is never shown as $0."""

from __future__ import annotations

import math

#: Decimals of an amount (a hundredth of a cent: a short request costs about that).
DECIMALS = 4


def usd(amount: float, *, grouped: bool = False) -> str:
    """``$0.0123``; ``$0.000023`` for a nonzero amount below half a hundredth of a cent (it
    would round to ``$0.0000``). ``grouped``: thousands separated (``$1,234.5678``)."""
    decimals = DECIMALS
    size = abs(amount)
    if 0 < size < 0.5 * 10**-DECIMALS and math.isfinite(size):
        decimals = 1 - math.floor(math.log10(size))  # two significant digits
    return f"${amount:,.{decimals}f}" if grouped else f"${amount:.{decimals}f}"
