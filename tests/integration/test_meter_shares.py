"""Shares (issue 14) through the meter's real consumer, ledger and HTTP API on a real
JetStream: a lease of ``milli`` thousandths of a device is billed unit_price x units x
milli/1000 in every billing mode, exactly once across replays and across a crash between
the ledger append and the account write, and its invoice line shows the share."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from decimal import Decimal

import msgspec

from services.common.nats_conn import read_stream
from services.meter.accounts import transition
from services.meter.ledger import encode
from services.meter.model import LedgerEntry, LedgerRecord

from .test_meter_support import T0, ended, granted, lease, meter_world, renewed

_record = msgspec.json.Decoder(LedgerRecord)
PRICE = Decimal("36")  # per unit-hour: 0.01 a second for a whole device


async def ledger_entries(w) -> list[LedgerEntry]:
    return [r async for _, data in read_stream(w.js, w.names.ledger_stream, w.names.ledger_subjects)
            if isinstance(r := _record.decode(data), LedgerEntry)]


async def test_shares_of_every_billing_mode_are_billed_once_and_shown_on_the_invoice(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        od = lease(unit_price=PRICE, milli=250, devices=(3,))
        irq = lease(billing="interruptible", unit_price=PRICE, milli=500, devices=(0,), pool_id="p2")
        rm = lease(billing="reserved_month", unit_price=Decimal("1000"), milli=300, devices=(1,), pool_id="p3")
        ry = lease(billing="reserved_year", unit_price=Decimal("1200"), milli=100, devices=(2,), pool_id="p4")
        whole = lease(unit_price=PRICE, units=2, devices=(4, 5))
        crashed = lease(unit_price=PRICE, milli=400, devices=(3,))
        events = [
            granted(od), renewed(od, 2, T0 + timedelta(seconds=300)), ended(od, "released", T0 + timedelta(seconds=1000),
                                                                            seq=3),
            granted(irq), ended(irq, "preempted", T0 + timedelta(seconds=30)),  # no minimum: 30 s of half
            granted(rm), ended(rm, "released", T0 + timedelta(hours=1)),  # a term is never refunded
            granted(ry),
            granted(whole), ended(whole, "released", T0 + timedelta(seconds=100)),
            granted(crashed), ended(crashed, "released", T0 + timedelta(seconds=500)),
        ]
        # A meter died after appending `crashed`'s charge and before writing its account:
        # the entry is in the ledger, the events are not acked (here: not yet consumed).
        account, _ = transition(None, events[-2], min_bill_s=60, now=T0)
        _, [posted] = transition(account, events[-1], min_bill_s=60, now=T0)
        assert isinstance(posted, LedgerEntry)
        await w.js.publish(w.names.ledger(posted.tenant, posted.id), encode(posted),
                           headers={"Nats-Msg-Id": posted.id, "Nats-Expected-Last-Subject-Sequence": "0"})
        await w.publish(*events)
        await w.publish(*events, msg_id="again-")  # every event replayed under another message id
        await w.settled()

        entries = await ledger_entries(w)
        assert len({e.id for e in entries}) == len(entries)
        by_lease = Counter(e.lease_id for e in entries)
        assert by_lease == {od.lease_id: 1, irq.lease_id: 1, rm.lease_id: 1, ry.lease_id: 12, whole.lease_id: 1,
                            crashed.lease_id: 1}
        amount = {x.lease_id: e.amount for x in (od, irq, rm, whole, crashed) for e in entries if e.lease_id == x.lease_id}
        assert amount == {od.lease_id: Decimal("2.50"),  # 1000 s x 0.01 x 250/1000
                          irq.lease_id: Decimal("0.15"),  # 30 s x 0.01 x 500/1000
                          rm.lease_id: Decimal("300.00"),  # 1000/month x 300/1000
                          whole.lease_id: Decimal("2.00"),  # 2 units x 100 s x 0.01
                          crashed.lease_id: Decimal("2.00")}  # 500 s x 0.01 x 400/1000
        year = [e for e in entries if e.lease_id == ry.lease_id]
        assert {e.amount for e in year} == {Decimal("120.00")} and {e.milli for e in year} == {100}
        assert all(e.milli == x.milli for x in (od, irq, rm, whole, crashed) for e in entries
                   if e.lease_id == x.lease_id)

        assert (await w.usage("t1"))["totals"] == {"USD": "1746.65"}  # 2.50+0.15+300+12x120+2+2
        by_share = {r["milli"]: (r["amount"], r["entries"]) for r in
                    (await w.usage("t1", group_by="milli"))["rows"]}
        assert by_share == {1000: ("2.00", 1), 500: ("0.15", 1), 400: ("2.00", 1), 300: ("300.00", 1),
                            250: ("2.50", 1), 100: ("1440.00", 12)}
        r = await w.get("/v1/invoices/2026-03", "t1")
        assert r.status_code == 200, r.text
        inv = r.json()
        assert inv["totals"] == {"USD": "426.65"}  # the year's first term month only
        [usd] = inv["currencies"]
        p1 = [(x["share"], x["milli"], x["quantity"], x["amount"]) for x in usd["lines"] if x["pool_id"] == "p1"]
        assert p1 == [("whole", 1000, "0.055556", "2.00"), ("400/1000", 400, "0.055556", "2.00"),
                      ("250/1000", 250, "0.069444", "2.50")]
        others = {x["pool_id"]: (x["billing"], x["share"], x["unit"], x["quantity"], x["amount"])
                  for x in usd["lines"] if x["pool_id"] != "p1"}
        assert others == {"p2": ("interruptible", "500/1000", "unit-hour", "0.004167", "0.15"),
                          "p3": ("reserved_month", "300/1000", "unit-month", "0.300000", "300.00"),
                          "p4": ("reserved_year", "100/1000", "unit-month", "0.100000", "120.00")}
        status = (await w.get("/v1/meter/status", "ops")).json()
        assert status["processed"]["duplicate"] >= 6  # the replayed events that an account had seen


async def test_a_lease_with_an_impossible_share_is_dead_lettered_not_billed(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        bad = lease(unit_price=PRICE, milli=1500)
        await w.publish(granted(bad), ended(bad, "released", T0 + timedelta(seconds=100)))
        await w.settled()
        assert [e for e in await ledger_entries(w) if e.lease_id == bad.lease_id] == []
        r = await w.get("/v1/deadletters", "ops")
        assert r.status_code == 200, r.text
        errors = [d["error"] for d in r.json()["items"]]
        assert len(errors) == 2 and all("milli must be 1-1000" in e for e in errors), errors
