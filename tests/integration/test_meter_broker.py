"""The meter bills what the real broker grants: a lease placed and released through the
broker's API shows up in the meter's usage and draft invoice, priced at the locked price;
a delivered lease from its ready, and one that failed not at all."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import msgspec

from services.common.messages import AllocEvent, LeaseFailed, LeaseReady, LeaseReleased
from services.common.nats_conn import read_stream
from services.meter.model import LedgerEntry, LedgerRecord
from services.meter.service import utcnow

from ..helpers import EventTap, eventually
from .broker_world import broker_world
from .test_meter_support import meter_world

POOLS = {"gz-910b": {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 32,
                     "prices": {"on_demand": "1.20", "reserved_month": "700"}}}


async def test_broker_leases_are_billed(settings, nc, subjects) -> None:
    async with broker_world(settings, POOLS) as w, meter_world(settings, nc, clock=utcnow) as m, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        r = await w.request("t1", {"units": 4})
        assert r.status_code == 201, r.text
        lease = r.json()["leases"][0]
        r = await w.request("t1", {"units": 2, "billing": "reserved_month"})
        assert r.status_code == 201, r.text
        assert (await w.broker.post(f"/v1/leases/{lease['lease_id']}/release",
                                    headers=w.tenants["t1"])).status_code == 200
        await alloc.wait_for(lambda e: isinstance(e, LeaseReleased))

        async def billed() -> bool:
            rows = (await m.usage("t1", group_by="billing"))["rows"]
            return {r["billing"] for r in rows} == {"on_demand", "reserved_month"}

        await eventually(billed, timeout=10)
        rows = {r["billing"]: r for r in (await m.usage("t1", group_by="billing,pool"))["rows"]}
        # released within a second: the 60 s minimum of 4 units at 1.20/unit-hour
        assert Decimal(rows["on_demand"]["amount"]) == Decimal("0.08") and rows["on_demand"]["pool"] == "gz-910b"
        assert Decimal(rows["reserved_month"]["amount"]) == Decimal("1400.00")
        period = utcnow().strftime("%Y-%m")
        inv = (await m.get(f"/v1/invoices/{period}", "t1")).json()
        assert inv["status"] == "draft" and inv["totals"] == {"USD": "1400.08"}
        assert (await m.usage("t2"))["rows"] == []


async def test_budget_exhausted_stops_the_broker_and_a_top_up_restores_it(settings, nc, subjects) -> None:
    async with broker_world(settings, POOLS) as w, meter_world(settings, nc, clock=utcnow) as m:
        r = await m.client.put("/v1/budgets/t1", json={"kind": "prepaid", "amount": "500.00", "currency": "USD"},
                               headers=m.admin)
        assert r.status_code == 200, r.text
        assert (await w.request("t1", {"units": 1, "billing": "reserved_month"})).status_code == 201  # 700.00

        async def refused() -> bool:
            return (await w.request("t1", {"units": 1})).status_code == 422

        await eventually(refused, timeout=10)
        r = await w.request("t1", {"units": 1})
        assert r.status_code == 422 and "budget" in r.text
        assert (await w.request("t2", {"units": 1})).status_code == 201  # other tenants unaffected
        r = await m.client.put("/v1/budgets/t1", json={"kind": "prepaid", "amount": "5000.00", "currency": "USD"},
                               headers=m.admin)
        assert r.status_code == 200 and r.json()["exhausted"] is False

        async def placed() -> bool:
            return (await w.request("t1", {"units": 1})).status_code == 201

        await eventually(placed, timeout=10)


DELIVERING = {"gz-ssh": {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 16,
                         "prices": {"on_demand": "1.20"}, "delivery": ["ssh"], "provision_timeout_s": 120}}
SSH = {"kind": "ssh", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA tenant@laptop"]}


async def test_delivered_leases_are_billed_from_ready_and_a_failed_one_not_at_all(settings, nc, subjects) -> None:
    """Through the broker's API: the provider answers ready for one lease and failed for
    another; the meter bills the first from the ready's time to its release and lists the
    second as not charged."""
    async with broker_world(settings, DELIVERING) as w, meter_world(settings, nc, clock=utcnow) as m, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        ask = {"units": 2, "placement": {"regions": ["cn-gz"]}, "workload": SSH}
        good, bad = [(await w.request("t1", ask)).json()["leases"][0]["lease_id"] for _ in range(2)]
        r = await w.broker.post(f"/v1/leases/{good}/ready", json={"access": {"host": "gpu-1.example", "port": 22}},
                                headers=w.provider)
        assert r.status_code == 200, r.text
        r = await w.broker.post(f"/v1/leases/{bad}/failed", json={"reason": "image pull failed"},
                                headers=w.provider)
        assert r.status_code == 200, r.text
        assert (await w.broker.post(f"/v1/leases/{good}/release", headers=w.tenants["t1"])).status_code == 200
        ready = await alloc.wait_for(lambda e: isinstance(e, LeaseReady) and e.lease.lease_id == good)
        released = await alloc.wait_for(lambda e: isinstance(e, LeaseReleased) and e.lease.lease_id == good)
        await alloc.wait_for(lambda e: isinstance(e, LeaseFailed) and e.lease.lease_id == bad)
        assert ready.at > ready.lease.granted_at
        await m.settled()
        entries = [r for r in await _ledger(m) if isinstance(r, LedgerEntry)]
        [entry] = entries  # the failed lease: nothing, not even the minimum
        # released within the minimum: 60 s of 2 units at 1.20/unit-hour, counted from ready
        assert released.at - ready.at < timedelta(seconds=60)
        assert (entry.lease_id, entry.start, entry.end) == (good, ready.at, ready.at + timedelta(seconds=60))
        assert entry.amount == Decimal("0.04")
        period = utcnow().strftime("%Y-%m")
        inv = (await m.get(f"/v1/invoices/{period}", "t1")).json()
        assert inv["totals"] == {"USD": "0.04"}
        assert [(u["lease_id"], u["pool_id"], u["provider"], u["reason"], u["charge"]) for u in inv["uncharged"]] == [
            (bad, "gz-ssh", "acme", "image pull failed", "not charged")]


async def _ledger(m) -> list:
    decoder = msgspec.json.Decoder(LedgerRecord)
    return [decoder.decode(data)
            async for _, data in read_stream(m.js, m.names.ledger_stream, m.names.ledger_subjects)]
