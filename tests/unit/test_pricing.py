"""Pricing of leases: per-second math, minimum increment, month splits, reserved terms,
rounding and currencies. Pure: no servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.messages import LeaseInfo
from services.meter import pricing
from services.meter.periods import (
    BadPeriod,
    final_at,
    last_final_period,
    next_period,
    parse_period,
    period_of,
    prev_period,
)
from services.meter.pricing import (
    PricingError,
    accrued,
    ending_charges,
    month_pieces,
    reserved_charges,
    round_money,
    usage_charges,
)

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def lease(**over: object) -> LeaseInfo:
    base: dict = dict(lease_id="lease_1", request_id="req_1", tenant="t1", pool_id="p1", provider="acme",
                      region="cn-yrd", model="nvidia-a100-sxm-80gb", units=1, billing="on_demand",
                      unit_price=Decimal("3.60"), price_basis="unit_hour", currency="USD", granted_at=T0,
                      expires_at=T0 + timedelta(days=30), term_months=0, ttl_s=300)
    base.update(over)
    return LeaseInfo(**base)


def test_per_second_exact() -> None:
    # 3.60/unit-hour = 0.001 per unit-second; 2 units for 1000 s = 2.00
    [c] = usage_charges(lease(units=2), T0 + timedelta(seconds=1000), min_bill_s=60)
    assert c.amount == Decimal("2.00") and c.period == "2026-03" and c.kind == "usage"
    assert c.seconds == 1000 and c.quantity == Decimal("0.555556") and c.key == "u.2026-03"
    assert str(c.amount) == "2.00"  # two places, always


def test_partial_second_rounds_up_to_a_whole_second() -> None:
    [c] = usage_charges(lease(unit_price=Decimal("36")), T0 + timedelta(seconds=100, microseconds=1), min_bill_s=0)
    assert c.seconds == 101 and c.amount == Decimal("1.01")


def test_minimum_increment() -> None:
    [c] = usage_charges(lease(unit_price=Decimal("36")), T0 + timedelta(seconds=5), min_bill_s=60)
    assert c.seconds == 60 and c.amount == Decimal("0.60")
    [c] = usage_charges(lease(unit_price=Decimal("36")), T0 + timedelta(seconds=61), min_bill_s=60)
    assert c.seconds == 61 and c.amount == Decimal("0.61")
    # a zero-length lease still pays the minimum; without a minimum it pays nothing
    assert pricing.total(usage_charges(lease(unit_price=Decimal("36")), T0, min_bill_s=60)) == Decimal("0.60")
    assert usage_charges(lease(), T0, min_bill_s=0) == []
    # an end before the grant (clock skew) is a zero-length lease, never negative
    assert usage_charges(lease(), T0 - timedelta(hours=1), min_bill_s=0) == []


def test_minimum_not_charged_when_the_platform_ends_the_lease() -> None:
    at = T0 + timedelta(seconds=5)
    big = lease(unit_price=Decimal("36"))
    assert pricing.total(ending_charges("lease.released", at, big, min_bill_s=60)) == Decimal("0.60")
    assert pricing.total(ending_charges("lease.revoked", at, big, min_bill_s=60)) == Decimal("0.60")
    assert pricing.total(ending_charges("lease.preempted", at, big, min_bill_s=60)) == Decimal("0.05")
    assert pricing.total(ending_charges("lease.lost", at, big, min_bill_s=60)) == Decimal("0.05")


def test_expired_is_billed_to_expiry_and_nothing_beyond() -> None:
    lz = lease(unit_price=Decimal("36"), expires_at=T0 + timedelta(seconds=300))
    # the sweeper noticed late: billed until expires_at
    assert pricing.total(ending_charges("lease.expired", T0 + timedelta(seconds=900), lz, min_bill_s=60)) == \
        Decimal("3.00")
    # a release after the expiry is also capped at the expiry
    assert pricing.total(ending_charges("lease.released", T0 + timedelta(seconds=900), lz, min_bill_s=60)) == \
        Decimal("3.00")
    # released before expiry: the release time
    assert pricing.total(ending_charges("lease.released", T0 + timedelta(seconds=100), lz, min_bill_s=60)) == \
        Decimal("1.00")


def test_split_at_calendar_month_boundaries() -> None:
    start = datetime(2026, 1, 31, 23, 0, tzinfo=UTC)
    lz = lease(granted_at=start, unit_price=Decimal("1"), expires_at=start + timedelta(days=90))
    charges = usage_charges(lz, datetime(2026, 3, 1, 1, 0, tzinfo=UTC), min_bill_s=60)
    assert [c.period for c in charges] == ["2026-01", "2026-02", "2026-03"]
    assert [c.seconds for c in charges] == [3600, 28 * 24 * 3600, 3600]
    assert [c.amount for c in charges] == [Decimal("1.00"), Decimal("672.00"), Decimal("1.00")]
    assert charges[0].end == charges[1].start == datetime(2026, 2, 1, tzinfo=UTC)
    # year boundary
    pieces = month_pieces(datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC))
    assert [p[0] for p in pieces] == ["2025-12", "2026-01"]


def test_minimum_extends_across_a_month_boundary() -> None:
    start = datetime(2026, 4, 30, 23, 59, 30, tzinfo=UTC)
    lz = lease(granted_at=start, unit_price=Decimal("36"))
    charges = usage_charges(lz, start + timedelta(seconds=10), min_bill_s=60)
    assert [(c.period, c.seconds) for c in charges] == [("2026-04", 30), ("2026-05", 30)]
    assert pricing.total(charges) == Decimal("0.60")


def test_each_piece_rounded_half_even_on_its_own() -> None:
    # 0.000125 per second: 20 s = 0.0025 -> 0.00 (half-even), 60 s = 0.0075 -> 0.01
    lz = lease(unit_price=Decimal("0.45"))
    [c] = usage_charges(lz, T0 + timedelta(seconds=20), min_bill_s=0)
    assert c.exact == Decimal("0.0025") and c.amount == Decimal("0.00")
    [c] = usage_charges(lz, T0 + timedelta(seconds=60), min_bill_s=0)
    assert c.exact == Decimal("0.0075") and c.amount == Decimal("0.01")
    assert round_money(Decimal("0.125"), "USD") == Decimal("0.12")
    assert round_money(Decimal("0.135"), "USD") == Decimal("0.14")


def test_currencies_minor_units() -> None:
    assert round_money(Decimal("1234.5"), "JPY") == Decimal("1234")  # half-even
    assert round_money(Decimal("1235.5"), "JPY") == Decimal("1236")
    assert str(round_money(Decimal("10"), "KRW")) == "10"
    assert str(round_money(Decimal("1.23456"), "KWD")) == "1.235"
    assert str(round_money(Decimal("1.2"), "CNY")) == "1.20"
    [c] = usage_charges(lease(currency="JPY", unit_price=Decimal("500")), T0 + timedelta(seconds=3599),
                        min_bill_s=0)
    assert c.amount == Decimal("500")  # 499.86 -> 500


def test_reserved_month_and_year_terms() -> None:
    month = lease(billing="reserved_month", price_basis="unit_month", unit_price=Decimal("1100"), units=4,
                  term_months=1, expires_at=T0 + timedelta(hours=730))
    [c] = reserved_charges(month)
    assert c.amount == Decimal("4400.00") and c.kind == "reserved" and c.quantity == 4 and c.key == "r01"
    assert c.period == "2026-03" and c.end - c.start == timedelta(hours=730)
    year = lease(billing="reserved_year", price_basis="unit_month", unit_price=Decimal("900.005"), units=1,
                 term_months=12, expires_at=T0 + timedelta(hours=730 * 12))
    charges = reserved_charges(year)
    assert len(charges) == 12 and len({c.key for c in charges}) == 12
    assert all(c.amount == Decimal("900.00") for c in charges)  # half-even of 900.005
    assert charges[0].period == "2026-03" and charges[1].period == "2026-04"
    assert charges[11].start == T0 + 11 * timedelta(hours=730)
    # 730 h months drift against calendar months: every term month has exactly one charge
    assert [c.period for c in charges] == ["2026-03", "2026-04", "2026-05", "2026-06", "2026-07", "2026-08",
                                           "2026-09", "2026-10", "2026-11", "2026-12", "2027-01", "2027-02"]
    # release never refunds: an ending event bills nothing more for a term
    assert ending_charges("lease.released", T0 + timedelta(hours=1), year, min_bill_s=60) == []
    # term_months 0 on the wire: derived from the billing
    assert len(reserved_charges(lease(billing="reserved_year", price_basis="unit_month", term_months=0))) == 12


def test_accrued_is_what_an_end_now_would_bill() -> None:
    lz = lease(unit_price=Decimal("36"), expires_at=T0 + timedelta(seconds=600))
    assert accrued(lz, T0 + timedelta(seconds=100), min_bill_s=60) == Decimal("1.00")
    assert accrued(lz, T0 + timedelta(hours=5), min_bill_s=60) == Decimal("6.00")  # capped at expiry
    assert accrued(lz, T0 + timedelta(seconds=1), min_bill_s=60) == Decimal("0.60")
    assert accrued(lease(billing="reserved_month", price_basis="unit_month"), T0, min_bill_s=60) == 0


@pytest.mark.parametrize("bad", [
    dict(units=0), dict(unit_price=Decimal("-1")), dict(unit_price=Decimal("NaN")),
    dict(billing="reserved_month", price_basis="unit_hour"), dict(billing="on_demand", price_basis="unit_month"),
    dict(billing="reserved_year", price_basis="unit_month", term_months=5),
])
def test_unbillable_leases_are_refused(bad: dict) -> None:
    with pytest.raises(PricingError):
        pricing.validate(lease(**bad))


def test_periods() -> None:
    assert parse_period("2026-03") == "2026-03"
    for bad in ("2026-13", "2026-00", "last month", "2026-3", "26-03", "", "2026-03-01", "1999-12"):
        with pytest.raises(BadPeriod):
            parse_period(bad)
    assert next_period("2025-12") == "2026-01" and prev_period("2026-01") == "2025-12"
    assert period_of(datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC)) == "2026-02"
    assert final_at("2026-02", 3 * 86400) == datetime(2026, 3, 4, tzinfo=UTC)
    assert last_final_period(datetime(2026, 3, 3, tzinfo=UTC), 3 * 86400) == "2026-01"
    assert last_final_period(datetime(2026, 3, 4, tzinfo=UTC), 3 * 86400) == "2026-02"


@given(seconds=st.integers(min_value=0, max_value=200 * 86400), micros=st.integers(0, 999_999),
       start_s=st.integers(min_value=0, max_value=400 * 86400), units=st.integers(1, 64),
       price=st.decimals(min_value=Decimal("0.000001"), max_value=Decimal("1000"), places=6))
def test_splits_add_up(seconds: int, micros: int, start_s: int, units: int, price: Decimal) -> None:
    """However a lease falls across months, its pieces cover the billed seconds exactly once and
    each piece's amount is its exact amount rounded (so the sum is within half a cent per piece)."""
    start = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=start_s, microseconds=micros)
    lz = lease(granted_at=start, units=units, unit_price=price, expires_at=start + timedelta(days=400))
    charges = usage_charges(lz, start + timedelta(seconds=seconds), min_bill_s=60)
    billed = max(seconds, 60)
    assert sum(c.seconds for c in charges) == billed
    assert len({c.period for c in charges}) == len(charges)
    exact_total = price * units * billed / Decimal(3600)
    assert abs(pricing.total(charges) - exact_total) <= Decimal("0.005") * len(charges) + Decimal("1e-20")
    for a, b in zip(charges, charges[1:], strict=False):
        assert a.end == b.start
