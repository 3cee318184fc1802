"""Dollar amounts as printed: never $0 for a cost that is not zero."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from batcher.cost.money import usd


def test_amounts_to_a_hundredth_of_a_cent() -> None:
    assert usd(0) == "$0.0000"
    assert usd(0.0123) == "$0.0123"
    assert usd(1234.56789, grouped=True) == "$1,234.5679"
    assert usd(0.000049) == "$0.000049"
    assert usd(0.0000001234) == "$0.00000012"


@given(st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_a_nonzero_amount_is_never_shown_as_zero_and_reads_back_close(amount: float) -> None:
    text = usd(amount, grouped=True)
    shown = float(text.removeprefix("$").replace(",", ""))
    assert shown > 0
    # two significant digits at least: within 5 % of the amount, or the 4 decimals' rounding
    assert math.isclose(shown, amount, rel_tol=0.05) or abs(shown - amount) <= 0.00005
