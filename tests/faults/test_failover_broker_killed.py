"""Failover with real processes (issue 12, item 4): a pool holding six leases is removed;
the broker that takes the lost leases' events is SIGKILLed while it replaces them (the
other broker paused meanwhile, so that the first one has them). Resumed, the other broker
gets the events again from the durable consumer and finishes: every request ends with
exactly one replacement lease (attempt 2, on another pool), never two, and the auditor
(invariants 1-4) passes, with the background load running throughout."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from services.broker.failover import DURABLE as FAILOVER
from services.cli.audit import read_alloc
from services.common.messages import AllocEvent, LeaseGranted, LeaseLost, LeaseReplaced
from services.common.nats_conn import connect
from services.common.subjects import Subjects

from ..helpers import EventTap, eventually
from ..integration.conftest import pool_body
from .stack import running_stack

pytestmark = pytest.mark.timeout(180)

N = 6
MODEL = "amd-mi300x"  # acme-5 in eu-central at 2.50: the victim (2.40) is the cheapest of this model
PENDING_S = 6.0  # the provisional expiry: well above a grant's confirmation, far below the default 30 s
ACK_WAIT_S = 11.0  # the dead broker's events come back to the other one after this (its claims lapse at 10 s)
ASK = {"units": 1, "accelerators": {"models": [MODEL]}, "placement": {"regions": ["eu-central"]}, "lease_ttl_s": 600}


async def test_a_broker_killed_mid_failover_leaves_the_replacements_to_the_other(tmp_path: Path) -> None:
    async with running_stack(tmp_path, pending_s=PENDING_S, failover_ack_wait_s=ACK_WAIT_S) as stack:
        assert stack.load is not None
        registry, b1, b2 = stack.services["registry"].url, stack.services["broker1"].url, stack.services["broker2"].url
        acme = stack.load.providers["acme"]
        admin = {"Authorization": f"Bearer {stack.settings.admin_key}"}
        nc = await connect(stack.settings.nats_url, "fault-test")
        try:
            async with httpx.AsyncClient(timeout=10) as c, \
                    EventTap(nc.jetstream(), Subjects(stack.settings.prefix).events("alloc"), AllocEvent) as alloc:
                r = await c.post(f"{registry}/v1/keys", json={"role": "tenant", "subject": "fo"}, headers=admin)
                tenant = {"Authorization": f"Bearer {r.json()['key']}"}
                r = await c.put(f"{registry}/v1/pools/victim", headers=acme, json=pool_body(
                    region="eu-central", model=MODEL, units=8, prices={"on_demand": "2.40"}))
                assert r.status_code == 201, r.text
                stack.load.pools["acme"].append("victim")  # acme's agent keeps it alive

                async def on_victim() -> list[tuple[str, str]] | None:
                    placed = []
                    for _ in range(N):
                        r = await c.post(f"{b1}/v1/requests", json=ASK, headers=tenant)
                        assert r.status_code == 201, r.text
                        lease = r.json()["leases"][0]
                        placed.append((r.json()["request_id"], lease["lease_id"]))
                        if lease["pool_id"] != "victim":  # broker1 had not heard of the victim yet
                            for _, lease_id in placed:
                                await c.post(f"{b1}/v1/leases/{lease_id}/release", headers=tenant)
                            return None
                    return placed

                placed = await eventually(on_victim, timeout=20, what="six leases on the victim")
                olds = {old for _, old in placed}

                stack.kill("broker2", signal.SIGSTOP)  # broker1 alone takes the events
                try:
                    js, stream = nc.jetstream(), Subjects(stack.settings.prefix)

                    async def broker2_pulls_expired() -> bool:
                        """A pull broker2 made just before it stopped would still be handed
                        events until it expires (1 s): then only broker1's are waiting."""
                        waiting = [(await js.consumer_info(stream.stream(kind), durable)).num_waiting
                                   for kind, durable in (("capacity", "broker-pool-loss"), ("failover", FAILOVER))]
                        return all((n or 0) <= 1 for n in waiting)

                    await eventually(broker2_pulls_expired, timeout=10, what="broker2's pulls expired")
                    r = await c.delete(f"{registry}/v1/pools/victim", headers=acme)
                    assert r.status_code == 200, r.text
                    stack.load.pools["acme"].remove("victim")
                    for old in olds:  # broker1's pool-loss consumer ended them; its failover is under way
                        await alloc.wait_for(lambda e, old=old: isinstance(e, LeaseLost) and e.lease.lease_id == old,
                                             timeout=20)
                    stack.kill("broker1")
                    before = {e.lease.lease_id for e in alloc.events if isinstance(e, LeaseReplaced)}
                finally:
                    stack.kill("broker2", signal.SIGCONT)
                t0 = time.monotonic()
                for old in olds:  # the rest through broker2, once the events come back (ack wait, claim expiry)
                    await alloc.wait_for(lambda e, old=old: isinstance(e, LeaseReplaced) and e.lease.lease_id == old,
                                         timeout=60)
                took = time.monotonic() - t0
                for request_id, old in placed:
                    r = await c.get(f"{b2}/v1/requests/{request_id}", headers=tenant)
                    view = r.json()
                    assert view["state"] == "placed", view
                    [lease] = view["leases"]
                    assert (lease["pool_id"], lease["attempt"], lease["replaces"]) == ("acme-5", 2, old), lease
                    assert [a["state"] for a in view["attempts"]] == ["lost", "ready"]

            async def one_replacement_each() -> bool:
                """Replacement grants per lost lease, but those given back at their grant
                time: broker1's grants it never confirmed end so once their provisional
                expiry (``PENDING_S``) passes, through the sweep."""
                events, _ = await read_alloc(nc.jetstream(), Subjects(stack.settings.prefix))
                retracted = {e.lease.lease_id for _, e in events
                             if isinstance(e, LeaseLost) and e.at == e.lease.granted_at}
                kept.clear()
                for _, e in events:
                    if isinstance(e, LeaseGranted) and e.lease.replaces in olds and e.lease.lease_id not in retracted:
                        kept[e.lease.replaces] = kept.get(e.lease.replaces, 0) + 1
                return kept == {old: 1 for old in olds}

            kept: dict[str, int] = {}
            try:
                await eventually(one_replacement_each, timeout=45, every=0.5, what="one replacement each")
            except AssertionError:
                raise AssertionError(f"replacements kept per lost lease: {kept}") from None
        finally:
            await nc.drain()
        print(f"replaced by broker1 before its kill: {len(before & olds)} of {N}; the rest by broker2 "
              f"{took:.1f}s after the kill")
        stack.services["broker1"].start()
        await asyncio.to_thread(stack.services["broker1"].wait_healthy, 60)
        await stack.audit_passes(time.monotonic(), timeout=60)

