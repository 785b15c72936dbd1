"""The ledger fold and invoices built from it: lines, adjustments for late charges,
currencies, usage grouping. Pure: no servers."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal

from services.meter.aggregate import Aggregate, fold
from services.meter.invoices import build_invoice, to_csv, usage_rows, usage_totals
from services.meter.model import LedgerEntry, PeriodsClosed

FA = datetime(2026, 3, 4, tzinfo=UTC)


def entry(i: int, *, tenant: str = "t1", period: str = "2026-02", amount: str = "1.00", currency: str = "USD",
          billing: str = "on_demand", pool: str = "p1", region: str = "cn-yrd", model: str = "m1",
          provider: str = "acme", price: str = "2.00", posted: datetime | None = None,
          quantity: str = "0.5") -> LedgerEntry:
    y, m = int(period[:4]), int(period[5:])
    start = datetime(y, m, 2, tzinfo=UTC)
    return LedgerEntry(id=f"lease_{i}.u.{period}", tenant=tenant, provider=provider, pool_id=pool, region=region,
                       model=model, lease_id=f"lease_{i}", billing=billing,
                       kind="reserved" if billing.startswith("reserved") else "usage", period=period, start=start,
                       end=start, units=1, quantity=Decimal(quantity), unit_price=Decimal(price), currency=currency,
                       amount=Decimal(amount), posted_at=posted or start)


def test_lines_group_entries_and_currencies_stay_apart() -> None:
    agg = fold(enumerate([
        entry(1, amount="1.25"), entry(2, amount="2.50"), entry(3, amount="10.00", pool="p2", price="5.00"),
        entry(4, amount="70.00", currency="CNY", pool="p3", price="9.80"),
        entry(5, amount="1100.00", billing="reserved_month", price="1100", quantity="1"),
        entry(6, tenant="t2", amount="99.00"),
        entry(7, period="2026-03", amount="3.00"),
    ], start=1))
    inv = build_invoice("t1", "2026-02", agg.invoice_cells("t1", "2026-02"), final=False, final_after=FA)
    assert inv.status == "draft" and inv.entries == 5
    assert inv.totals == {"CNY": Decimal("70.00"), "USD": Decimal("1113.75")}
    usd = next(s for s in inv.currencies if s.currency == "USD")
    assert [(x.pool_id, x.billing, x.amount, x.entries, x.unit) for x in usd.lines] == [
        ("p1", "on_demand", Decimal("3.75"), 2, "unit-hour"), ("p2", "on_demand", Decimal("10.00"), 1, "unit-hour"),
        ("p1", "reserved_month", Decimal("1100.00"), 1, "unit-month")]
    assert usd.adjustments == [] and usd.total == usd.subtotal
    # another tenant's and another period's entries are not on it
    assert agg.invoice_periods("t1") == ["2026-02", "2026-03"]
    assert build_invoice("t2", "2026-02", agg.invoice_cells("t2", "2026-02"), final=False,
                         final_after=FA).totals == {"USD": Decimal("99.00")}


def test_late_charges_become_adjustments_on_the_period_they_were_posted_in() -> None:
    agg = Aggregate()
    agg.apply(1, entry(1, amount="5.00"))
    closed = agg.apply(2, PeriodsClosed(id="close.2026-02", at=FA, through="2026-02"))
    assert closed == ["2026-02"] and agg.is_final("2026-02") and not agg.is_final("2026-03")
    before = build_invoice("t1", "2026-02", agg.invoice_cells("t1", "2026-02"), final=True, final_after=FA)
    # a late charge for February, posted in April: it lands on April's invoice as an adjustment
    agg.apply(3, entry(2, amount="7.00", posted=datetime(2026, 4, 2, tzinfo=UTC)))
    # a late charge posted in February itself (after the close): the first open period, March
    agg.apply(4, entry(3, amount="1.00", posted=datetime(2026, 2, 27, tzinfo=UTC)))
    after = build_invoice("t1", "2026-02", agg.invoice_cells("t1", "2026-02"), final=True, final_after=FA)
    assert after == before and after.totals == {"USD": Decimal("5.00")}
    april = build_invoice("t1", "2026-04", agg.invoice_cells("t1", "2026-04"), final=False, final_after=FA)
    [usd] = april.currencies
    assert usd.lines == [] and [(a.period, a.amount) for a in usd.adjustments] == [("2026-02", Decimal("7.00"))]
    assert usd.total == Decimal("7.00") and usd.adjustments_total == Decimal("7.00")
    march = build_invoice("t1", "2026-03", agg.invoice_cells("t1", "2026-03"), final=False, final_after=FA)
    assert march.totals == {"USD": Decimal("1.00")}
    # usage is by service period: all three February charges are February's
    rows = usage_rows(agg.cells("t1"), ["period"], {})
    assert rows == [{"period": "2026-02", "currency": "USD", "amount": Decimal("13.00"),
                     "unit_hours": Decimal("1.5"), "unit_months": Decimal(0), "entries": 3}]


def test_fold_ignores_replayed_sequences_and_old_markers() -> None:
    agg = Aggregate()
    agg.apply(1, entry(1))
    agg.apply(1, entry(1))  # the same stream message seen twice (a re-subscribe)
    agg.apply(2, PeriodsClosed(id="c", at=FA, through="2026-02"))
    assert agg.apply(3, PeriodsClosed(id="c2", at=FA, through="2026-01")) == []
    assert agg.closed_through == "2026-02" and agg.entries == 1


def test_closing_reports_every_newly_closed_period() -> None:
    agg = Aggregate()
    agg.apply(1, entry(1, period="2025-11"))
    assert agg.apply(2, PeriodsClosed(id="c", at=FA, through="2026-01")) == ["2025-11", "2025-12", "2026-01"]
    assert agg.apply(3, PeriodsClosed(id="c", at=FA, through="2026-02")) == ["2026-02"]


def test_usage_grouping_filters_and_csv() -> None:
    agg = fold(enumerate([
        entry(1, amount="1.00", region="cn-yrd"), entry(2, amount="2.00", region="us-east", model="m2"),
        entry(3, amount="4.00", tenant="t2", region="us-east"), entry(4, amount="8.00", currency="CNY"),
        entry(5, amount="16.00", period="2026-03"),
    ], start=1))
    rows = usage_rows(agg.cells(), ["tenant", "region"], {"period": "2026-02"})
    assert [(r["tenant"], r["region"], r["currency"], r["amount"]) for r in rows] == [
        ("t1", "cn-yrd", "CNY", Decimal("8.00")), ("t1", "cn-yrd", "USD", Decimal("1.00")),
        ("t1", "us-east", "USD", Decimal("2.00")), ("t2", "us-east", "USD", Decimal("4.00"))]
    assert usage_totals(rows) == {"CNY": Decimal("8.00"), "USD": Decimal("7.00")}
    only = usage_rows(agg.cells("t1"), [], {"region": "us-east", "model": "m2"})
    assert [(r["currency"], r["amount"], r["entries"]) for r in only] == [("USD", Decimal("2.00"), 1)]
    text = to_csv(rows, ["tenant", "region", "currency", "amount"])
    assert text.splitlines()[0] == "tenant,region,currency,amount" and "t2,us-east,USD,4.00" in text


def test_totals_per_tenant_and_currency() -> None:
    agg = fold(enumerate([entry(1, amount="1.10"), entry(2, amount="2.20"), entry(3, tenant="t2", amount="3.30"),
                          entry(4, currency="JPY", amount="500")], start=1))
    assert agg.totals() == {("t1", "USD"): Decimal("3.30"), ("t2", "USD"): Decimal("3.30"),
                            ("t1", "JPY"): Decimal("500")}
    assert agg.spent("t1", "USD") == Decimal("3.30") and agg.spent("t1", "USD", "2026-03") == 0


def test_an_invoice_over_a_million_entries_is_fast() -> None:
    """The aggregate keeps cells, not entries: an invoice costs the same for 10 or 10^6."""
    agg = Aggregate()
    pools = [f"p{i}" for i in range(50)]
    base = [entry(j, pool=pools[j % 50], amount="0.01") for j in range(50)]
    t0 = time.perf_counter()
    for i in range(1, 1_000_001):
        agg.add(base[i % 50])
    fold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    inv = build_invoice("t1", "2026-02", agg.invoice_cells("t1", "2026-02"), final=False, final_after=FA)
    took = time.perf_counter() - t0
    assert inv.entries == 1_000_000 and inv.totals == {"USD": Decimal("10000.00")}
    assert took < 0.05, took
    assert fold_s < 20
