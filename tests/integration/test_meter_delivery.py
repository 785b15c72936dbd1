"""Billing from ready (issue 12) through the meter's real consumer, ledger and HTTP API:
delivered leases' events published on a real JetStream stream the way the broker does
(subject per region and tenant, ``Nats-Msg-Id`` = event id), the ledger read back from
its stream."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import msgspec

from services.common.messages import BillingEvent, BudgetExhausted
from services.common.nats_conn import read_stream
from services.meter.model import LedgerEntry, LedgerRecord, UnchargedAttempt

from ..helpers import EventTap, eventually
from .test_meter_support import T0, Clock, ended, lease, meter_world, provisioning, ready

_record = msgspec.json.Decoder(LedgerRecord)


def delivered(**over):
    """A lease the provider must deliver over ssh, 36/unit-hour (0.01 a second)."""
    return lease(**{"delivery": "ssh", "provision_timeout_s": 300, "unit_price": Decimal("36"), **over})


async def ledger(w) -> list:
    names = w.names
    return [_record.decode(data) async for _, data in read_stream(w.js, names.ledger_stream, names.ledger_subjects)]


async def entries_of(w, lease_id: str) -> list[LedgerEntry]:
    return [r for r in await ledger(w) if isinstance(r, LedgerEntry) and r.lease_id == lease_id]


async def invoice(w, who: str = "t1", period: str = "2026-03") -> dict:
    r = await w.get(f"/v1/invoices/{period}", who, tenant=None if who != "ops" else "t1")
    assert r.status_code == 200, r.text
    return r.json()


async def test_provisioning_ready_released_is_billed_from_ready(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        a = delivered()
        await w.publish(provisioning(a), ready(a, T0 + timedelta(seconds=240)),
                        ended(a, "released", T0 + timedelta(seconds=540), seq=3))
        await w.settled()
        [entry] = await entries_of(w, a.lease_id)
        assert entry.start == T0 + timedelta(seconds=240) and entry.seconds == 300
        assert entry.amount == Decimal("3.00")  # 300 s from ready, not 540 s from the grant
        inv = await invoice(w)
        assert inv["totals"] == {"USD": "3.00"} and inv["uncharged"] == []


async def test_failed_attempt_costs_nothing_and_is_listed_as_not_charged(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        bad = delivered(billing="reserved_month", unit_price=Decimal("1000"), pool_id="p9", provider="flaky")
        good = delivered(pool_id="p2", attempt=2, replaces=bad.lease_id, request_id=bad.request_id,
                         granted_at=T0 + timedelta(seconds=301))
        good = delivered(**{**msgspec.structs.asdict(good), "billing": "on_demand"})
        await w.publish(provisioning(bad), ended(bad, "failed", T0 + timedelta(seconds=300),
                                                 reason="not ready within 300 s"))
        await w.publish(provisioning(good), ready(good, T0 + timedelta(seconds=400)),
                        ended(good, "released", T0 + timedelta(seconds=1000), seq=3))
        await w.settled()
        assert await entries_of(w, bad.lease_id) == []  # no term, no minimum
        [x] = [r for r in await ledger(w) if isinstance(r, UnchargedAttempt) and r.lease_id == bad.lease_id]
        assert x.lease_id == bad.lease_id and x.reason == "not ready within 300 s"
        inv = await invoice(w)
        assert inv["totals"] == {"USD": "6.00"}  # only the replacement, from its ready
        [line] = inv["uncharged"]
        assert (line["lease_id"], line["pool_id"], line["provider"], line["reason"], line["charge"]) == (
            bad.lease_id, "p9", "flaky", "not ready within 300 s", "not charged")
        assert (await invoice(w, "ops"))["uncharged"] == inv["uncharged"]
        assert (await invoice(w, "t2"))["uncharged"] == []  # another tenant's invoice does not show it
        listing = (await w.get("/v1/invoices", "t1")).json()
        assert listing["invoices"][0]["uncharged"] == 1


async def test_lost_before_ready_costs_nothing(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        a = delivered()
        await w.publish(provisioning(a), ended(a, "lost", T0 + timedelta(seconds=90), reason="pool offline"))
        await w.settled()
        assert await entries_of(w, a.lease_id) == []
        inv = await invoice(w)
        assert inv["totals"] == {} and [u["reason"] for u in inv["uncharged"]] == ["pool offline"]


async def test_a_redelivered_ready_is_not_billed_twice(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        term = delivered(billing="reserved_month", unit_price=Decimal("1000"))
        a = delivered()
        first = [provisioning(term), ready(term, T0 + timedelta(seconds=60)), provisioning(a),
                 ready(a, T0 + timedelta(seconds=60)), ended(a, "released", T0 + timedelta(seconds=360), seq=3)]
        await w.publish(*first)
        await w.settled()
        before = await ledger(w)
        # the readies again under other message ids (the stream keeps them: a replay)
        await w.publish(ready(term, T0 + timedelta(seconds=60)), ready(a, T0 + timedelta(seconds=60)),
                        msg_id="again-")
        await w.settled()
        assert await ledger(w) == before
        assert (await w.usage("t1"))["totals"] == {"USD": "1003.00"}
        [entry] = await entries_of(w, term.lease_id)
        assert entry.start == T0 + timedelta(seconds=60)  # the term runs from ready
        status = (await w.get("/v1/meter/status", "ops")).json()
        assert status["processed"]["duplicate"] >= 2


async def test_ready_stored_after_the_end_still_bills_from_ready(settings, nc) -> None:
    """Two broker replicas may store a lease's ready and its release in either order."""
    async with meter_world(settings, nc) as w:
        a = delivered()
        await w.publish(provisioning(a), ended(a, "released", T0 + timedelta(seconds=400), seq=3))
        await w.settled()
        assert [u["lease_id"] for u in (await invoice(w))["uncharged"]] == [a.lease_id]
        await w.publish(ready(a, T0 + timedelta(seconds=100)))
        await w.settled()
        [entry] = await entries_of(w, a.lease_id)
        assert entry.amount == Decimal("3.00") and entry.start == T0 + timedelta(seconds=100)
        inv = await invoice(w)
        assert inv["totals"] == {"USD": "3.00"} and inv["uncharged"] == []  # charged after all


def _chain(second_ready: bool) -> tuple[list, list]:
    """A reserved term on three attempts: the first ready then lost; the second ready then
    lost (or failed, never ready); the third ready."""
    first = delivered(billing="reserved_month", unit_price=Decimal("1000"))
    leases, events = [first], [provisioning(first), ready(first, T0 + timedelta(minutes=5)),
                               ended(first, "lost", T0 + timedelta(hours=5), seq=3, reason="unhealthy")]
    for n in (2, 3):
        nxt = delivered(billing="reserved_month", unit_price=Decimal("1000"), pool_id=f"p{n}",
                        request_id=first.request_id, attempt=n, replaces=leases[-1].lease_id,
                        granted_at=T0 + timedelta(hours=4 * n), expires_at=first.expires_at)
        events.append(provisioning(nxt))
        if n == 3 or second_ready:
            events.append(ready(nxt, nxt.granted_at + timedelta(minutes=5)))
        if n == 2:
            events.append(ended(nxt, "lost" if second_ready else "failed", T0 + timedelta(hours=9),
                                seq=3 if second_ready else 2, reason="pool offline"))
        leases.append(nxt)
    return leases, events


async def test_reserved_term_replaced_after_ready_is_charged_once(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        carried, carried_events = _chain(second_ready=True)
        through_failed, failed_events = _chain(second_ready=False)
        # all in one batch: the replacements' accounts depend on the earlier ones
        await w.publish(*carried_events, *failed_events)
        await w.settled()
        terms = [r for r in await ledger(w) if isinstance(r, LedgerEntry)]
        assert sorted((e.id, e.lease_id, e.amount) for e in terms) == sorted(
            [(f"{chain[0].lease_id}.r01", chain[0].lease_id, Decimal("1000.00"))
             for chain in (carried, through_failed)])
        inv = await invoice(w)
        assert inv["totals"] == {"USD": "2000.00"}
        assert [u["lease_id"] for u in inv["uncharged"]] == [through_failed[1].lease_id]


async def test_replacement_of_a_term_never_ready_is_charged(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        old = delivered(billing="reserved_month", unit_price=Decimal("1000"))
        new = delivered(billing="reserved_month", unit_price=Decimal("1000"), pool_id="p2",
                        request_id=old.request_id, attempt=2, replaces=old.lease_id,
                        granted_at=T0 + timedelta(minutes=6), expires_at=old.expires_at)
        await w.publish(provisioning(old), ended(old, "failed", T0 + timedelta(minutes=5), reason="no capacity"))
        await w.settled()
        await w.publish(provisioning(new), ready(new, T0 + timedelta(minutes=10)))
        await w.settled()
        terms = [r for r in await ledger(w) if isinstance(r, LedgerEntry)]
        assert [(e.lease_id, e.amount, e.start) for e in terms] == [
            (new.lease_id, Decimal("1000.00"), T0 + timedelta(minutes=10))]
        inv = await invoice(w)
        assert inv["totals"] == {"USD": "1000.00"} and [u["lease_id"] for u in inv["uncharged"]] == [old.lease_id]


async def test_budget_is_not_consumed_by_a_provisioning_lease(settings, nc) -> None:
    clock = Clock(T0)
    async with meter_world(settings, nc, clock) as w, \
            EventTap(nc.jetstream(), w.subjects.events("billing"), BillingEvent) as billing:
        a = delivered(expires_at=T0 + timedelta(days=1))
        await w.publish(provisioning(a))
        await w.settled()
        r = await w.client.put("/v1/budgets/t1", json={"kind": "prepaid", "amount": "10.00", "currency": "USD"},
                               headers=w.admin)
        assert r.status_code == 200, r.text
        clock.set(T0 + timedelta(seconds=1500))  # 15.00 had it been billed from the grant
        view = (await w.get("/v1/budgets/t1", "t1")).json()
        assert view["accrued"] == "0.00" and view["exhausted"] is False
        await w.publish(ready(a, T0 + timedelta(seconds=1400)))
        await w.settled()
        await eventually(lambda: _accrued(w, "1.00"), timeout=10, what="accrued from ready")
        assert not [e for e in billing.events if isinstance(e, BudgetExhausted)]
        clock.set(T0 + timedelta(seconds=2400))  # 10.00 from ready
        exhausted = await billing.wait_for(lambda e: isinstance(e, BudgetExhausted))
        assert exhausted.spent == Decimal("10.00")


async def _accrued(w, amount: str) -> bool:
    return (await w.get("/v1/budgets/t1", "ops")).json()["accrued"] == amount


async def test_many_delivered_leases_in_any_batching_bill_exactly_once(settings, nc) -> None:
    """300 delivered leases (ready then released, failed, or lost while provisioning), each
    event published twice (the second time under another message id, with the ready after
    the end): the two consumer workers split them as they come, yet every lease is billed
    from its ready once and only the never-ready ones are listed."""
    async with meter_world(settings, nc) as w:
        events, again, owed, never = [], [], Decimal(0), set()
        for i in range(300):
            a = delivered()
            events.append(provisioning(a))
            if i % 3 == 0:
                up, down = ready(a, T0 + timedelta(seconds=10 + i)), \
                    ended(a, "released", T0 + timedelta(seconds=100 + 2 * i), seq=3)
                events += [up, down]
                again += [down, up]
                owed += Decimal(max(60, 90 + i)) / 100
            else:
                end = ended(a, "failed" if i % 3 == 1 else "lost", T0 + timedelta(seconds=300), reason="no")
                events.append(end)
                again.append(end)
                never.add(a.lease_id)
        await w.publish(*events)
        await w.publish(*again, msg_id="again-")
        await w.settled()
        inv = await invoice(w)
        assert inv["totals"] == {"USD": str(owed)}
        assert {u["lease_id"] for u in inv["uncharged"]} == never
        ids = [r.id for r in await ledger(w) if isinstance(r, LedgerEntry)]
        assert len(ids) == len(set(ids)) == 100
