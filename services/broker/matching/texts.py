"""How reasons print quantities, money and lists (the engine's and the shares' alike)."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

MICRO = Decimal("0.000001")


def fmt_money(d: Decimal) -> str:
    q = d.quantize(MICRO).normalize()
    return format(q, "f")


def fmt_num(x: float) -> str:
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.1f}"


def few(items: Iterable[str], n: int = 6) -> str:
    items = sorted(set(items))
    if len(items) <= n:
        return str(items)
    return f"{items[:n]} and {len(items) - n} more"
