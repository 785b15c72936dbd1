"""Money is Decimal with a currency, never float.

Prices are quoted per unit-hour or per unit-month and may carry up to six decimal
places (a unit-second of a cheap card is a fraction of a cent); amounts that are
billed are rounded to the currency's minor unit, half-even, by the meter.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

import msgspec

PRICE_PLACES = 6
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$(?!\n)", description="ISO 4217 code")]
Price = Annotated[Decimal, msgspec.Meta(description="decimal string, e.g. \"2.49\"")]
MAX_PRICE = Decimal("1000000")


def price_problem(value: Decimal) -> str | None:
    """Why ``value`` is not a usable price, or None. (msgspec cannot bound Decimals.)"""
    if not value.is_finite():
        return "must be a finite number"
    if value <= 0:
        return "must be > 0"
    if value > MAX_PRICE:
        return f"must be at most {MAX_PRICE}"
    if not price_places_ok(value):
        return f"has more than {PRICE_PLACES} decimal places"
    return None


def price_places_ok(value: Decimal) -> bool:
    exponent = value.as_tuple().exponent
    return isinstance(exponent, int) and -exponent <= PRICE_PLACES
