"""Two meter replicas share the durable consumer: every event is applied once between
them, and both serve the same totals (each folds the whole ledger); shares of devices
among the leases are billed x milli/1000 once too."""

from __future__ import annotations

import random
from decimal import Decimal

from services.common.subjects import Subjects

from ..faults.test_meter_exactly_once import MIN_BILL_S, expected_totals, scenario
from .test_meter_support import FAST, ROLES, issue_keys, meter_world, publish_many


async def test_two_replicas_bill_every_lease_once(settings, nc) -> None:
    s = scenario(random.Random(7), leases=1500, duplicates=0.05, shares=0.3)
    assert sum(1 for e in s.events if e.lease.milli < 1000) > 300  # shares of devices among them
    keys = await issue_keys(settings, nc, ROLES)
    assert FAST["min_bill_s"] == MIN_BILL_S
    async with meter_world(settings, nc, keys=keys) as a, meter_world(settings, nc, keys=keys) as b:
        await publish_many(nc.jetstream(), Subjects(settings.prefix), s.events, msg_ids=s.msg_ids)
        await a.settled(timeout=60)
        await b.settled(timeout=60)
        want = {f"{t}/{c}": v for (t, c), v in expected_totals(s).items()}
        for replica in (a, b):
            rows = (await replica.usage("ops", group_by="tenant"))["rows"]
            assert {f"{r['tenant']}/{r['currency']}": Decimal(r["amount"]) for r in rows} == want
        sa, sb = [(await w.get("/v1/meter/status", "ops")).json() for w in (a, b)]
        assert sa["processed"]["applied"] > 0 and sb["processed"]["applied"] > 0  # both did work
        assert sa["entries"] == sb["entries"]
