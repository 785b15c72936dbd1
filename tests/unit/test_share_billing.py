"""Billing of shares (issue 14, docs/sharing.md): a lease of ``milli`` thousandths of each
device costs unit_price x units x milli/1000, per second and reserved alike, and its
invoice line says which share it was. Pure: no servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.meter import pricing
from services.meter.accounts import transition
from services.meter.aggregate import fold
from services.meter.invoices import build_invoice
from services.meter.model import LedgerEntry
from services.meter.pricing import PricingError, accrued, ending_charges, reserved_charges, usage_charges

from .test_pricing import T0, lease

FA = datetime(2026, 4, 4, tzinfo=UTC)


def test_a_quarter_share_costs_a_quarter_per_second() -> None:
    # 36/unit-hour = 0.01 a second; 250 milli for 1000 s = 2.50, and 0.25 x 1000/3600 unit-hours
    [c] = usage_charges(lease(unit_price=Decimal("36"), milli=250), T0 + timedelta(seconds=1000), min_bill_s=60)
    assert c.amount == Decimal("2.50") and c.quantity == Decimal("0.069444")
    [whole] = usage_charges(lease(unit_price=Decimal("36")), T0 + timedelta(seconds=1000), min_bill_s=60)
    assert whole.amount == Decimal("10.00")


def test_the_minimum_increment_of_a_share_is_its_share_of_the_minimum() -> None:
    [c] = usage_charges(lease(unit_price=Decimal("36"), milli=100), T0 + timedelta(seconds=5), min_bill_s=60)
    assert c.seconds == 60 and c.amount == Decimal("0.06")


def test_interruptible_shares_and_platform_ends() -> None:
    lz = lease(billing="interruptible", unit_price=Decimal("3.60"), milli=500)
    [c] = ending_charges("lease.preempted", T0 + timedelta(seconds=30), lz, min_bill_s=60)
    assert c.seconds == 30 and c.amount == Decimal("0.02")  # 0.001/s x 0.5 x 30 s = 0.015, no minimum
    assert accrued(lz, T0 + timedelta(seconds=2000), min_bill_s=60) == Decimal("1.00")


def test_a_reserved_share_pays_its_share_of_every_term_month() -> None:
    year = lease(billing="reserved_year", price_basis="unit_month", unit_price=Decimal("1000"), term_months=12,
                 expires_at=T0 + timedelta(hours=730 * 12), milli=300)
    charges = reserved_charges(year)
    assert len(charges) == 12
    assert all(c.amount == Decimal("300.00") and c.quantity == Decimal("0.3") for c in charges)


def test_a_share_across_a_month_boundary_is_split_and_adds_up() -> None:
    start = datetime(2026, 3, 31, 23, 0, tzinfo=UTC)
    lz = lease(unit_price=Decimal("36"), milli=750, granted_at=start, expires_at=start + timedelta(days=1))
    march, april = usage_charges(lz, start + timedelta(hours=2), min_bill_s=60)
    assert (march.period, april.period) == ("2026-03", "2026-04")
    assert march.amount == april.amount == Decimal("27.00")  # 36 x 0.75 for each hour
    assert march.quantity == april.quantity == Decimal("0.75")


@pytest.mark.parametrize("milli", [0, -5, 1001, 5000])
def test_a_share_out_of_range_cannot_be_billed(milli: int) -> None:
    with pytest.raises(PricingError, match="milli must be 1-1000"):
        pricing.validate(lease(milli=milli))


@given(milli=st.integers(1, 1000), seconds=st.integers(0, 40 * 86400), units=st.integers(1, 8),
       price=st.decimals(min_value=Decimal("0.01"), max_value=Decimal("1000"), places=2))
def test_share_cost_is_the_whole_cost_scaled(milli: int, seconds: int, units: int, price: Decimal) -> None:
    """Before rounding, a share's charge is exactly milli/1000 of the whole lease's charge."""
    end = T0 + timedelta(seconds=seconds)
    share = usage_charges(lease(units=units, unit_price=price, milli=milli), end, min_bill_s=60)
    whole = usage_charges(lease(units=units, unit_price=price), end, min_bill_s=60)
    assert [c.seconds for c in share] == [c.seconds for c in whole]
    for s, w in zip(share, whole, strict=True):
        assert s.exact * 1000 == w.exact * milli
        assert abs(s.amount - s.exact) <= Decimal("0.005")


def test_ledger_entries_carry_the_share_and_invoices_show_it() -> None:
    from services.common.messages import LeaseGranted, LeaseReleased
    share = lease(lease_id="lease_s", unit_price=Decimal("36"), milli=250)
    whole = lease(lease_id="lease_w", unit_price=Decimal("36"))
    records = []
    for lz in (share, whole):
        acct, _ = transition(None, LeaseGranted(id=f"{lz.lease_id}.1", at=T0, lease=lz, seq=1), min_bill_s=60, now=T0)
        end = LeaseReleased(id=f"{lz.lease_id}.2", at=T0 + timedelta(hours=1), lease=lz, seq=2)
        _, posted = transition(acct, end, min_bill_s=60, now=T0)
        records += posted
    [es] = [r for r in records if isinstance(r, LedgerEntry) and r.lease_id == "lease_s"]
    assert es.milli == 250 and es.amount == Decimal("9.00") and es.quantity == Decimal("0.25")
    agg = fold(enumerate(records, start=1))
    inv = build_invoice("t1", "2026-03", agg.invoice_cells("t1", "2026-03"), final=False, final_after=FA)
    [usd] = inv.currencies
    # same pool, price and billing: the share is a line of its own, after the whole units
    assert [(x.share, x.milli, x.quantity, x.amount) for x in usd.lines] == [
        ("whole", 1000, Decimal("1.000000"), Decimal("36.00")), ("250/1000", 250, Decimal("0.250000"), Decimal("9.00"))]
    assert all(x.amount == x.unit_price * x.quantity for x in usd.lines)
    assert inv.totals == {"USD": Decimal("45.00")}
