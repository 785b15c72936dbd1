"""Budgets: the meter tells everyone (``cb.events.billing.<tenant>``) when a tenant's spend,
posted plus accrued on open leases, reaches its budget, and again when a top-up restores it."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from services.common.messages import BillingEvent, BudgetExhausted, BudgetRestored

from ..helpers import EventTap, eventually
from .test_meter_support import T0, Clock, ended, granted, lease, meter_world


async def test_prepaid_exhausted_by_posted_and_accrued_spend_then_restored(settings, nc) -> None:
    clock = Clock(T0)
    async with meter_world(settings, nc, clock) as w, \
            EventTap(nc.jetstream(), w.subjects.events("billing"), BillingEvent) as billing:
        done = lease(unit_price=Decimal("36"))  # 0.01/s
        await w.publish(granted(done), ended(done, "released", T0 + timedelta(seconds=300)))  # 3.00 posted
        running = lease(unit_price=Decimal("36"), expires_at=T0 + timedelta(days=1))
        await w.publish(granted(running))
        await w.settled()
        r = await w.client.put("/v1/budgets/t1", json={"kind": "prepaid", "amount": "10.00", "currency": "USD"},
                               headers=w.admin)
        assert r.status_code == 200, r.text
        view = r.json()
        assert view["posted"] == "3.00" and view["accrued"] == "0.60"  # the open lease: its minimum so far
        assert view["exhausted"] is False and view["window"] == "all time"
        # the open lease runs on: at T0 + 700 s it has accrued 7.00 -> 10.00 spent
        clock.set(T0 + timedelta(seconds=700))
        exhausted = await billing.wait_for(lambda e: isinstance(e, BudgetExhausted))
        assert exhausted.tenant == "t1" and exhausted.budget == Decimal("10.00") and exhausted.spent >= 10
        seen = (await w.get("/v1/budgets/t1", "t1")).json()
        assert seen["exhausted"] is True and Decimal(seen["remaining"]) <= 0
        # topping up restores
        r = await w.client.put("/v1/budgets/t1", json={"kind": "prepaid", "amount": "100.00", "currency": "USD"},
                               headers=w.admin)
        assert r.status_code == 200
        restored = await billing.wait_for(lambda e: isinstance(e, BudgetRestored))
        assert restored.budget == Decimal("100.00") and restored.spent < 100
        assert (await w.get("/v1/budgets/t1", "ops")).json()["exhausted"] is False
        # each transition is announced once, however many evaluations ran
        clock.advance(seconds=1)
        await eventually(lambda: _evaluated(w), timeout=5)
        kinds = [type(e).__name__ for e in billing.events]
        assert kinds == ["BudgetExhausted", "BudgetRestored"]


async def _evaluated(w) -> bool:
    return (await w.get("/v1/budgets/t1", "ops")).json()["exhausted"] is False


async def test_monthly_limit_counts_this_month_and_an_ending_lease(settings, nc) -> None:
    clock = Clock(T0)
    async with meter_world(settings, nc, clock) as w, \
            EventTap(nc.jetstream(), w.subjects.events("billing"), BillingEvent) as billing:
        feb = lease(unit_price=Decimal("36"), granted_at=T0 - timedelta(days=30),
                    expires_at=T0 - timedelta(days=29))
        await w.publish(granted(feb), ended(feb, "released", feb.granted_at + timedelta(seconds=1000)))  # 10.00 Feb
        await w.settled()
        r = await w.client.put("/v1/budgets/t1", json={"kind": "limit", "amount": "5.00", "currency": "USD"},
                               headers=w.admin)
        assert r.status_code == 200 and r.json()["spent"] == "0.00" and r.json()["window"] == "2026-03"
        a = lease(unit_price=Decimal("36"))
        await w.publish(granted(a), ended(a, "released", T0 + timedelta(seconds=500)))  # 5.00 in March
        exhausted = await billing.wait_for(lambda e: isinstance(e, BudgetExhausted))
        assert exhausted.spent == Decimal("5.00")
        # a new month: the limit applies afresh
        clock.set(T0 + timedelta(days=25))
        await billing.wait_for(lambda e: isinstance(e, BudgetRestored))
