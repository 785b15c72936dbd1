"""The meter through its HTTP API, fed real allocation events on a real JetStream stream:
usage, invoices (draft, final, late adjustments), statements, duplicates, dead letters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal


from services.common.messages import BillingEvent, InvoiceIssued
from services.meter.ledger import ensure_ledger

from ..helpers import EventTap, eventually
from .test_meter_support import T0, Clock, ended, granted, lease, meter_world, money, renewed


async def test_on_demand_usage_and_draft_invoice(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        a = lease(units=2, unit_price=Decimal("3.60"))  # 0.002/s for 2 units
        b = lease(pool_id="p2", region="us-east", model="nvidia-h100-sxm-80gb", unit_price=Decimal("7.20"))
        await w.publish(granted(a), granted(b))
        await w.publish(renewed(a, 2, T0 + timedelta(seconds=200)))
        await w.publish(ended(a, "released", T0 + timedelta(seconds=500), seq=3),
                        ended(b, "released", T0 + timedelta(seconds=10)))  # below the minimum: 60 s
        await w.settled()
        usage = await w.usage("t1", group_by="pool")
        assert [(r["pool"], money(r["amount"])) for r in usage["rows"]] == [("p1", Decimal("1.00")),
                                                                          ("p2", Decimal("0.12"))]
        assert usage["totals"] == {"USD": "1.12"}
        assert money(usage["rows"][0]["unit_hours"]) == Decimal("0.277778")
        r = await w.get("/v1/invoices/2026-03", "t1")
        assert r.status_code == 200, r.text
        inv = r.json()
        assert inv["status"] == "draft" and inv["totals"] == {"USD": "1.12"} and inv["entries"] == 2
        assert inv["final_after"].startswith("2026-04-04")
        [usd] = inv["currencies"]
        assert [(x["pool_id"], x["amount"], x["unit"]) for x in usd["lines"]] == [
            ("p1", "1.00", "unit-hour"), ("p2", "0.12", "unit-hour")]
        listing = (await w.get("/v1/invoices", "t1")).json()
        assert [(i["period"], i["status"]) for i in listing["invoices"]] == [("2026-03", "draft")]


async def test_reserved_terms_are_billed_in_advance_and_never_refunded(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        year = lease(billing="reserved_year", unit_price=Decimal("900"), units=2)
        month = lease(billing="reserved_month", unit_price=Decimal("1100"), pool_id="p2")
        await w.publish(granted(year), granted(month))
        await w.settled()
        rows = (await w.usage("t1", group_by="billing,period"))["rows"]
        by = {(r["billing"], r["period"]): money(r["amount"]) for r in rows}
        assert by[("reserved_month", "2026-03")] == Decimal("1100.00")
        assert sum(v for (b, _), v in by.items() if b == "reserved_year") == Decimal("21600.00")
        assert len([k for k in by if k[0] == "reserved_year"]) == 12  # one per term month, each its own period
        assert all(money(r["unit_months"]) == 2 for r in rows if r["billing"] == "reserved_year")
        # released after an hour: nothing refunded, nothing more billed
        await w.publish(ended(year, "released", T0 + timedelta(hours=1)),
                        ended(month, "expired", T0 + timedelta(hours=730)))
        await w.settled()
        assert (await w.usage("t1"))["totals"] == {"USD": "22700.00"}
        april = (await w.get("/v1/invoices/2026-04", "t1")).json()
        assert april["totals"] == {"USD": "1800.00"}  # the second month of the year term


async def test_month_split_period_filter_and_csv(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        start = datetime(2026, 2, 28, 23, 0, tzinfo=UTC)
        a = lease(granted_at=start, expires_at=start + timedelta(days=2), unit_price=Decimal("1.00"), units=3)
        await w.publish(granted(a), ended(a, "released", start + timedelta(hours=3)))
        await w.settled()
        assert (await w.usage("t1", period="2026-02"))["totals"] == {"USD": "3.00"}
        assert (await w.usage("t1", period="2026-03"))["totals"] == {"USD": "6.00"}
        assert (await w.usage("t1", period="2026-04"))["totals"] == {}
        assert (await w.usage("ops", region="cn-yrd", model="nvidia-a100-sxm-80gb"))["totals"] == {"USD": "9.00"}
        assert (await w.usage("ops", region="us-east"))["rows"] == []
        r = await w.get("/v1/usage", "t1", group_by="period,tenant", format="csv")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert r.text.splitlines() == ["period,tenant,currency,amount,unit_hours,unit_months,entries",
                                       "2026-02,t1,USD,3.00,3.000000,0,1", "2026-03,t1,USD,6.00,6.000000,0,1"]


async def test_duplicates_and_replays_change_nothing(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        leases = [lease(unit_price=Decimal("36")) for _ in range(20)]
        r = lease(billing="reserved_month", unit_price=Decimal("500"))
        events = [granted(x) for x in leases] + [granted(r)]
        events += [ended(x, "released", T0 + timedelta(seconds=100 + i)) for i, x in enumerate(leases)]
        await w.publish(*events)
        await w.settled()
        first = await w.usage("ops", group_by="tenant")
        info = await w.js.stream_info(w.names.ledger_stream)
        # the same events again, under other message ids (so the stream keeps them), twice;
        # and the ends before the grants this time
        await w.publish(*reversed(events), msg_id="again-")
        await w.publish(*events, msg_id="and-again-")
        await w.settled()
        assert await w.usage("ops", group_by="tenant") == first
        assert first["totals"] == {"USD": str(Decimal("500.00") + sum(Decimal(100 + i) / 100 for i in range(20)))}
        after = await w.js.stream_info(w.names.ledger_stream)
        assert after.state.last_seq == info.state.last_seq  # not one ledger entry more
        status = (await w.get("/v1/meter/status", "ops")).json()
        assert status["processed"]["duplicate"] == 2 * len(events) and status["processed"]["applied"] == len(events)


async def test_out_of_order_end_before_grant_bills_once(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        a = lease(unit_price=Decimal("36"))
        y = lease(billing="reserved_year", unit_price=Decimal("10"))
        await w.publish(ended(a, "lost", T0 + timedelta(seconds=30)), ended(y, "revoked", T0 + timedelta(days=1)))
        await w.settled()
        await w.publish(granted(a), granted(y))
        await w.settled()
        totals = (await w.usage("t1", group_by="billing"))["rows"]
        assert {r["billing"]: r["amount"] for r in totals} == {"on_demand": "0.30", "reserved_year": "120.00"}


async def test_periods_become_final_and_late_events_are_adjustments(settings, nc) -> None:
    clock = Clock(datetime(2026, 3, 20, tzinfo=UTC))
    async with meter_world(settings, nc, clock) as w, \
            EventTap(nc.jetstream(), w.subjects.events("billing"), BillingEvent) as billing:
        a = lease(unit_price=Decimal("36"), granted_at=datetime(2026, 3, 5, tzinfo=UTC),
                  expires_at=datetime(2026, 4, 5, tzinfo=UTC))
        b = lease(unit_price=Decimal("36"), granted_at=datetime(2026, 3, 6, tzinfo=UTC),
                  expires_at=datetime(2026, 4, 5, tzinfo=UTC))
        await w.publish(granted(a), granted(b), ended(a, "released", a.granted_at + timedelta(seconds=100)))
        await w.settled()
        draft = (await w.get("/v1/invoices/2026-03", "t1")).json()
        assert draft["status"] == "draft" and draft["totals"] == {"USD": "1.00"}
        # April 3rd: March is closed but within its grace (3 days): still a draft
        clock.set(datetime(2026, 4, 3, tzinfo=UTC))
        await w.settled()
        assert (await w.get("/v1/invoices/2026-03", "t1")).json()["status"] == "draft"
        # April 4th: final, and announced once
        clock.set(datetime(2026, 4, 4, 0, 0, 1, tzinfo=UTC))
        issued = await billing.wait_for(lambda e: isinstance(e, InvoiceIssued) and e.period == "2026-03")
        assert issued.tenant == "t1" and issued.totals == {"USD": Decimal("1.00")}
        final = (await w.get("/v1/invoices/2026-03", "t1")).json()
        assert final["status"] == "final" and final["totals"] == {"USD": "1.00"} and final["issued_at"]
        stored = await (await w.js.key_value(w.names.invoices)).get("t1.2026-03")
        assert b'"final"' in stored.value
        # a late end for a March lease, posted on April 10th
        clock.set(datetime(2026, 4, 10, tzinfo=UTC))
        await w.publish(ended(b, "released", b.granted_at + timedelta(seconds=200)))
        await w.settled()
        assert (await w.get("/v1/invoices/2026-03", "t1")).json() == final  # immutable
        april = (await w.get("/v1/invoices/2026-04", "t1")).json()
        [usd] = april["currencies"]
        assert usd["lines"] == [] and [(x["period"], x["amount"]) for x in usd["adjustments"]] == [
            ("2026-03", "2.00")]
        assert april["totals"] == {"USD": "2.00"}
        # usage is by service period: both in March
        assert (await w.usage("t1", period="2026-03"))["totals"] == {"USD": "3.00"}
        listing = (await w.get("/v1/invoices", "t1")).json()["invoices"]
        assert [(i["period"], i["status"]) for i in listing] == [("2026-04", "draft"), ("2026-03", "final")]
        await eventually(lambda: _count(billing, InvoiceIssued) , timeout=1)
        assert len([e for e in billing.events if isinstance(e, InvoiceIssued)]) == 1


async def _count(tap, kind) -> bool:
    return any(isinstance(e, kind) for e in tap.events)


async def test_provider_statements_per_pool_and_period(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        a = lease(pool_id="p1", unit_price=Decimal("36"))
        b = lease(pool_id="p2", unit_price=Decimal("36"), tenant="t2")
        c = lease(pool_id="x9", provider="other", unit_price=Decimal("36"))
        cny = lease(pool_id="p3", unit_price=Decimal("18"), currency="CNY")
        await w.publish(*(granted(x) for x in (a, b, c, cny)))
        await w.publish(*(ended(x, "released", T0 + timedelta(seconds=100)) for x in (a, b, c, cny)))
        await w.settled()
        r = await w.get("/v1/statements", "acme")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["provider"] == "acme"
        [march] = body["periods"]
        assert march["period"] == "2026-03" and march["totals"] == {"CNY": "0.50", "USD": "2.00"}
        assert [(p["pool"], p["currency"], p["amount"]) for p in march["pools"]] == [
            ("p1", "USD", "1.00"), ("p2", "USD", "1.00"), ("p3", "CNY", "0.50")]
        other = (await w.get("/v1/statements", "ops", provider="other")).json()
        assert other["periods"][0]["totals"] == {"USD": "1.00"}
        assert (await w.get("/v1/statements", "acme", period="2026-04")).json()["periods"] == []


async def test_poison_events_are_dead_lettered_not_dropped(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        good = lease(unit_price=Decimal("36"))
        bad_basis = lease(billing="reserved_month", price_basis="unit_hour")
        bad_id = lease(lease_id="lease.with.dots")
        await w.js.publish(w.subjects.alloc("cn-yrd", "t1"), b'{"type": "lease.granted", "oops": ',
                           headers={"Nats-Msg-Id": "junk-1"})
        await w.publish(granted(bad_basis), granted(good), ended(good, "released", T0 + timedelta(seconds=100)),
                        ended(bad_id, "released", T0 + timedelta(seconds=100)))
        await w.settled()
        assert (await w.usage("t1"))["totals"] == {"USD": "1.00"}
        r = await w.get("/v1/deadletters", "ops")
        assert r.status_code == 200, r.text
        dead = r.json()
        assert dead["total"] == 3
        # the dead-letter stream keeps the order events failed in, which concurrent
        # processing does not fix: take them in the order they were published
        junk, basis, dots = sorted(dead["items"], key=lambda item: item["stream_seq"])
        assert "lease.with.dots" in dots["error"]
        assert "undecodable" in junk["error"] and junk["stream_seq"] == 1 and junk["subject"].endswith(".cn-yrd.t1")
        assert "unit_month" in basis["error"] and bad_basis.lease_id in basis["data"]
        # a retry of a poison event still fails, with the reason
        r = await w.client.post(f"/v1/deadletters/{basis['stream_seq']}/retry", headers=w.admin)
        assert r.status_code == 422 and "unit_month" in r.json()["detail"]
        r = await w.client.post("/v1/deadletters/9999/retry", headers=w.admin)
        assert r.status_code == 404
        # a retry of an event that is fine applies it (idempotently)
        r = await w.client.post("/v1/deadletters/3/retry", headers=w.admin)
        assert r.status_code == 200 and r.json()["outcome"] == "duplicate"


async def test_an_event_that_keeps_failing_is_dead_lettered_after_bounded_retries(settings, nc) -> None:
    ms = {"meter_max_attempts": 3}
    async with meter_world(settings, nc, ms=ms) as w:
        # the ledger stream vanishes: every append fails (no stream answers)
        await w.js.delete_stream(w.names.ledger_stream)
        a = lease(unit_price=Decimal("36"))
        await w.publish(granted(a), ended(a, "released", T0 + timedelta(seconds=100)))

        async def dead() -> bool:
            return (await w.get("/v1/deadletters", "ops")).json()["total"] == 1

        await eventually(dead, timeout=20)  # attempts 1, 2, 3 with 1 s and 2 s of backoff between
        [letter] = (await w.get("/v1/deadletters", "ops")).json()["items"]
        assert letter["attempts"] == 3 and "failed 3 times" in letter["error"] and a.lease_id in letter["data"]
        status = (await w.get("/v1/meter/status")).json()
        assert status["pending"] == 0 and status["ack_pending"] == 0  # not redelivered forever
        # once the cause is fixed, ops retry it: applied exactly once
        await ensure_ledger(w.js, w.names, settings)
        r = await w.client.post(f"/v1/deadletters/{letter['stream_seq']}/retry", headers=w.admin)
        assert r.status_code == 200 and r.json()["outcome"] == "applied", r.text
        r = await w.client.post(f"/v1/deadletters/{letter['stream_seq']}/retry", headers=w.admin)
        assert r.json()["outcome"] == "duplicate"

        async def billed() -> bool:
            return (await w.usage("t1"))["totals"] == {"USD": "1.00"}

        await eventually(billed, timeout=10)
