"""Pricing: lease in, ledger charges out. Pure (no I/O, no clock), Decimal only.

Rules (docs/meter.md has the reasoning):

* **Billing starts** at ``granted_at`` for a capacity-only lease (``delivery`` empty: ready at
  grant) and at the ``at`` of its ``lease.ready`` for a lease the provider delivers; a
  delivered lease that never became ready costs nothing (``billing_start`` is None).
* **Per second** (``on_demand``, ``interruptible``): ``unit_price`` is per unit-hour, locked at
  grant. The billed interval is ``[start, end)`` where ``end`` is the ending event's
  time, never later than ``lease.expires_at`` (an expired lease is billed to its expiry:
  the client held it until then). The duration is rounded up to a whole second, then
  raised to the minimum billed increment (``min_bill_s``) unless the platform ended the
  lease (preempted, lost). The interval is split at UTC calendar-month boundaries: one
  charge per month, each priced exactly and rounded on its own.
* **Reserved terms** (``reserved_month``: 1 month, ``reserved_year``: 12): ``unit_price`` is
  per unit-month; the fee is ``unit_price × units × share`` per month of the term, all posted at
  the billing start ("in advance, whether used or not"). Month *k* covers
  ``[start + (k-1)·730 h, start + k·730 h)`` (730 h is the broker's term month)
  and belongs to the period in which it starts. Releasing early refunds nothing.
* **Shares** (docs/sharing.md): a lease of ``milli`` thousandths of each device (``LeaseInfo.milli``,
  1000 = whole devices) is billed as ``units × milli / 1000`` units in every rule above, per
  second and reserved alike: rate ``unit_price × units × milli / 1000``, and quantities in
  whole-unit equivalents (0.25 unit-hours for an hour of a 250-milli share), so an invoice
  line's amount is still its unit price × its quantity.
* **Rounding**: each charge is computed exactly and rounded once, half-even, to the
  currency's minor unit (2 places; 0 for JPY, KRW, …; 3 for BHD, KWD, …).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Literal

from services.common.messages import MILLI, LeaseInfo

from .periods import period_of

# ISO 4217 minor units that differ from 2
MINOR_UNITS: dict[str, int] = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0, "PYG": 0,
    "RWF": 0, "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
}
TERM_MONTH = timedelta(hours=730)
TERM_MONTHS = {"reserved_month": 1, "reserved_year": 12}
PER_SECOND = ("on_demand", "interruptible")
RESERVED = ("reserved_month", "reserved_year")
# ending events after which the minimum increment is not charged: the platform ended the lease
NO_MINIMUM = ("lease.preempted", "lease.lost")
ENDING = ("lease.released", "lease.expired", "lease.preempted", "lease.lost", "lease.revoked", "lease.failed")

_CTX = Context(prec=60, rounding=ROUND_HALF_EVEN)
_MICROS_PER_HOUR = Decimal(3_600_000_000)
_ONE_MICRO = timedelta(microseconds=1)
QUANTITY_PLACES = Decimal("0.000001")


class PricingError(ValueError):
    """The lease cannot be billed as it stands (a poison event: dead-lettered)."""


def minor_places(currency: str) -> int:
    return MINOR_UNITS.get(currency, 2)


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Half-even to the currency's minor unit."""
    return amount.quantize(Decimal(1).scaleb(-minor_places(currency)), rounding=ROUND_HALF_EVEN, context=_CTX)


@dataclass(frozen=True, slots=True)
class Charge:
    key: str  # unique within the lease: "u.2026-03" (usage in that month) or "r01" (term month 1)
    kind: Literal["usage", "reserved"]
    period: str  # YYYY-MM the charge belongs to
    start: datetime
    end: datetime
    seconds: Decimal  # billed seconds (usage; 0 for reserved)
    quantity: Decimal  # unit-hours (usage) or unit-months (reserved), 6 places
    exact: Decimal  # the amount before rounding
    amount: Decimal  # rounded to the minor unit


def _utc(at: datetime) -> datetime:
    if at.tzinfo is UTC:
        return at
    return at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)


@lru_cache(maxsize=4096)
def _month(year: int, month: int) -> tuple[str, datetime]:
    """The period name of a month and the first instant of the next one."""
    nxt = datetime(year + 1, 1, 1, tzinfo=UTC) if month == 12 else datetime(year, month + 1, 1, tzinfo=UTC)
    return f"{year:04d}-{month:02d}", nxt


def validate(lease: LeaseInfo) -> None:
    if lease.units < 1:
        raise PricingError(f"lease {lease.lease_id}: units must be >= 1, got {lease.units}")
    if not 1 <= lease.milli <= MILLI:
        raise PricingError(f"lease {lease.lease_id}: milli must be 1-{MILLI} (a share of each device), "
                           f"got {lease.milli}")
    price = lease.unit_price
    if not isinstance(price, Decimal) or not price.is_finite() or price < 0:
        raise PricingError(f"lease {lease.lease_id}: unit_price must be a finite amount >= 0, got {price}")
    if lease.billing in PER_SECOND and lease.price_basis != "unit_hour":
        raise PricingError(f"lease {lease.lease_id}: {lease.billing} is priced per unit_hour, not {lease.price_basis}")
    if lease.billing in RESERVED:
        if lease.price_basis != "unit_month":
            raise PricingError(f"lease {lease.lease_id}: {lease.billing} is priced per unit_month, "
                               f"not {lease.price_basis}")
        if lease.term_months not in (0, TERM_MONTHS[lease.billing]):
            raise PricingError(f"lease {lease.lease_id}: {lease.billing} has a term of "
                               f"{TERM_MONTHS[lease.billing]} month(s), not {lease.term_months}")
    if lease.billing not in PER_SECOND and lease.billing not in RESERVED:
        raise PricingError(f"lease {lease.lease_id}: unknown billing {lease.billing!r}")


def billed_units(lease: LeaseInfo) -> Decimal:
    """Whole-unit equivalents the lease is billed for: ``units × milli / 1000`` (exact)."""
    if lease.milli == MILLI:
        return Decimal(lease.units)
    return _CTX.divide(_CTX.multiply(Decimal(lease.units), Decimal(lease.milli)), Decimal(MILLI))


def delivers(lease: LeaseInfo) -> bool:
    """Whether the provider must deliver this lease (it starts provisioning; billed from ready)."""
    return bool(lease.delivery)


def billing_start(lease: LeaseInfo, ready_at: datetime | None) -> datetime | None:
    """Where billing starts: the grant for capacity only, the ready for a delivered lease
    (None while it is not known to be ready)."""
    return ready_at if delivers(lease) else lease.granted_at


def billed_end(kind: str, at: datetime, lease: LeaseInfo) -> datetime:
    """Where the billed interval of a per-second lease ends for an ending event."""
    if kind == "lease.expired":
        return lease.expires_at
    return min(at, lease.expires_at)


def month_pieces(start: datetime, end: datetime) -> list[tuple[str, datetime, datetime]]:
    """``[start, end)`` cut at UTC calendar-month boundaries."""
    out = []
    a = _utc(start)
    end = _utc(end)
    while a < end:
        p, boundary = _month(a.year, a.month)
        b = end if end < boundary else boundary
        out.append((p, a, b))
        a = b
    return out


def usage_charges(lease: LeaseInfo, end: datetime, *, min_bill_s: int, apply_minimum: bool = True,
                  start: datetime | None = None) -> list[Charge]:
    """Per-second charges of ``lease`` from ``start`` (default: its grant) to ``end``."""
    start = _utc(start or lease.granted_at)
    micros = max(0, (_utc(end) - start) // _ONE_MICRO)
    seconds = -(-micros // 1_000_000)  # up to a whole second
    if apply_minimum:
        seconds = max(seconds, min_bill_s)
    if seconds <= 0:
        return []
    units = billed_units(lease)
    rate = _CTX.multiply(lease.unit_price, units)  # per hour for all units (their share of them)
    out = []
    for period, a, b in month_pieces(start, start + timedelta(seconds=seconds)):
        piece = Decimal((b - a) // _ONE_MICRO)
        exact = _CTX.divide(_CTX.multiply(rate, piece), _MICROS_PER_HOUR)
        quantity = _CTX.divide(_CTX.multiply(units, piece), _MICROS_PER_HOUR)
        out.append(Charge(key=f"u.{period}", kind="usage", period=period, start=a, end=b,
                          seconds=piece.scaleb(-6), quantity=quantity.quantize(QUANTITY_PLACES, context=_CTX),
                          exact=exact, amount=round_money(exact, lease.currency)))
    return out


def reserved_charges(lease: LeaseInfo, start: datetime | None = None) -> list[Charge]:
    """The whole term from ``start`` (default: the grant), one charge per term month, each
    in the period where it starts."""
    months = lease.term_months or TERM_MONTHS[lease.billing]
    units = billed_units(lease)
    fee = _CTX.multiply(lease.unit_price, units)
    start0 = _utc(start or lease.granted_at)
    out = []
    for k in range(1, months + 1):
        a = start0 + (k - 1) * TERM_MONTH
        out.append(Charge(key=f"r{k:02d}", kind="reserved", period=period_of(a), start=a, end=a + TERM_MONTH,
                          seconds=Decimal(0), quantity=units.quantize(QUANTITY_PLACES, context=_CTX),
                          exact=fee, amount=round_money(fee, lease.currency)))
    return out


def ending_charges(kind: str, at: datetime, lease: LeaseInfo, *, min_bill_s: int,
                   start: datetime | None = None) -> list[Charge]:
    """What an ending event of a per-second lease bills from ``start`` (default: the grant;
    nothing for reserved terms)."""
    if lease.billing not in PER_SECOND:
        return []
    return usage_charges(lease, billed_end(kind, at, lease), min_bill_s=min_bill_s,
                         apply_minimum=kind not in NO_MINIMUM, start=start)


def accrued(lease: LeaseInfo, now: datetime, *, min_bill_s: int, start: datetime | None = None,
            period: str | None = None) -> Decimal:
    """Cost so far of an open per-second lease billed from ``start`` (default: the grant),
    as it would be billed if it ended now (only what falls in ``period``, if given)."""
    if lease.billing not in PER_SECOND:
        return Decimal(0)
    return sum((c.amount for c in usage_charges(lease, min(_utc(now), _utc(lease.expires_at)),
                                                 min_bill_s=min_bill_s, start=start)
                if period is None or c.period == period), Decimal(0))


def total(charges: list[Charge]) -> Decimal:
    return sum((c.amount for c in charges), Decimal(0))
