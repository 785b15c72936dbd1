"""Failover with two broker replicas on real NATS, JetStream and Redis: every lost lease
is replaced exactly once, whether the durable consumer spreads the events over the
replicas or both replicas handle the same event at once (a redelivery while the first is
still at it); and a replica that dies in the middle of a replacement leaves it to the
other, which completes it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from services.broker.domain.requests import ComputeRequest
from services.broker.feeds import DurableFeed, Later
from services.broker.pool_loss import PoolLossFeed
from services.broker.service import Broker
from services.common.messages import AllocEvent, LeaseGranted, LeaseLost, LeaseReplaced

from ..helpers import EventTap, eventually
from .broker_replicas import REGION, Gate, Replicas, replicas, tenant


def _feeds(broker: Broker, r: Replicas, ack_wait_s: float = 30.0) -> list[DurableFeed]:
    async def on_loss(event) -> None:  # noqa: ANN001 - PoolOffline | PoolRemoved
        await broker.pool_lost(event.region, event.pool_id, "pool removed", generation=event.generation,
                               lease_ids=event.lease_ids)

    core = broker.core
    return [PoolLossFeed(core.nc, core.js, r.subjects, on_loss),
            broker.failover.feed(core.nc, core.js, r.subjects, ack_wait_s=ack_wait_s)]


@contextlib.asynccontextmanager
async def running(feeds: list[DurableFeed]) -> AsyncIterator[None]:
    for feed in feeds:
        await feed.start()
    try:
        yield
    finally:
        for feed in feeds:
            await feed.stop()


async def _remove(r: Replicas, pool_id: str) -> None:
    resp = await r.registry.delete(f"/v1/pools/{pool_id}", headers=r.provider)
    assert resp.status_code == 200, resp.text


async def _place(broker: Broker, n: int) -> list[tuple[str, str]]:
    """``n`` requests of one unit: (request id, lease id) each."""
    out = []
    for _ in range(n):
        status, view = await broker.place(tenant("t1"), ComputeRequest(units=1))
        assert status == 201
        out.append((view.request_id, view.leases[0].lease_id))
    return out


async def _current(broker: Broker, request_id: str) -> list:
    record = await broker.record(request_id)
    assert record is not None
    return [lease for lease in [await broker.leases.get(i) for i in record.lease_ids] if lease]


async def test_two_replicas_replace_each_lost_lease_exactly_once(settings, nc, subjects) -> None:
    async with replicas(settings, 2) as r, EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        await r.pool("a", 16)
        placed = await _place(r.brokers[0], 8)
        await r.pool("b", 16)
        feeds = [feed for broker in r.brokers for feed in _feeds(broker, r)]
        async with running(feeds):
            await _remove(r, "a")
            for _, old in placed:
                await alloc.wait_for(lambda e, old=old: isinstance(e, LeaseReplaced) and e.lease.lease_id == old,
                                     timeout=20)
            for request_id, old in placed:
                [lease] = await _current(r.brokers[1], request_id)
                assert lease.pool_id == "b" and lease.attempt == 2 and lease.replaces == old
            replaced = [e.lease.lease_id for e in alloc.events if isinstance(e, LeaseReplaced)]
            assert sorted(replaced) == sorted(old for _, old in placed)  # one each
            grants = [e for e in alloc.events if isinstance(e, LeaseGranted) and e.lease.replaces]
            assert len(grants) == 8
            assert (await r.registry.get("/v1/pools/b", headers=r.provider)).json()["leased"] == 8


async def test_the_same_event_handled_by_both_replicas_at_once_replaces_once(settings, nc, subjects) -> None:
    """A redelivery reaching a second replica while the first is still replacing (or
    after it finished but before it acknowledged): one replacement, one lease.replaced."""
    async with replicas(settings, 2) as r, EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        await r.pool("a", 8)
        [(request_id, old)] = await _place(r.brokers[0], 1)
        await r.pool("b", 8)
        assert await r.brokers[0].pool_lost(REGION, "a", "pool offline", generation=1, lease_ids=(old,)) == 1
        lost = await alloc.wait_for(lambda e: isinstance(e, LeaseLost) and e.lease.lease_id == old)

        async def handle(broker: Broker) -> None:
            """As the consumer would: again (the redelivery delay, shortened) while it hears ``Later``."""

            async def once() -> bool:
                try:
                    await broker.failover.on_ended(lost)
                except Later:
                    return False
                return True

            await eventually(once, timeout=10, what="the lost lease handled")

        await asyncio.gather(*(handle(b) for b in r.brokers))
        await asyncio.gather(*(handle(b) for b in r.brokers))  # redelivered once more to each: no change
        [lease] = await _current(r.brokers[0], request_id)
        assert lease.pool_id == "b" and lease.attempt == 2 and lease.replaces == old
        await alloc.wait_for(lambda e: isinstance(e, LeaseReplaced) and e.lease.lease_id == old)
        grants = [e for e in alloc.events if isinstance(e, LeaseGranted) and e.lease.replaces == old]
        assert len(grants) == 1
        assert (await r.registry.get("/v1/pools/b", headers=r.provider)).json()["leased"] == 1
        await eventually(lambda: sum(isinstance(e, LeaseReplaced) for e in alloc.events) >= 1)
        assert sum(isinstance(e, LeaseReplaced) for e in alloc.events) == 1  # re-announced under the same id


async def test_a_replica_killed_mid_replacement_leaves_it_to_the_other(settings, nc, subjects) -> None:
    """Replica 0 takes the event, reserves the replacement and makes its grant durable,
    then dies before it settles the request. Its claim expires, the event comes back to
    replica 1, which replaces the lease."""
    async with replicas(settings, 2) as r, EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        dead, live = r.brokers
        await r.pool("a", 8)
        [(request_id, old)] = await _place(dead, 1)
        await r.pool("b", 8)
        dead.failover.claim_s = live.failover.claim_s = 1.0
        gate = Gate(dead.core.requests, "settle_replacement")
        dead_feeds = _feeds(dead, r, ack_wait_s=2.0)
        for feed in dead_feeds:
            await feed.start()
        await _remove(r, "a")
        await asyncio.wait_for(gate.entered.wait(), 15)
        half = [e for e in alloc.events if isinstance(e, LeaseGranted) and e.lease.replaces == old]
        # the crash: its connections go, then its tasks (nothing it would still do reaches anything)
        await dead.core.nc.close()
        await dead.core.redis.aclose()
        for feed in dead_feeds:
            await feed.stop()
        async with running([live.failover.feed(live.core.nc, live.core.js, r.subjects, ack_wait_s=2.0)]):
            replaced = await alloc.wait_for(lambda e: isinstance(e, LeaseReplaced) and e.lease.lease_id == old,
                                            timeout=30)
        [lease] = await _current(live, request_id)
        assert lease.lease_id == replaced.by_lease and lease.pool_id == "b" and lease.attempt == 2
        assert lease.replaces == old
        assert len(half) <= 1 and all(e.lease.lease_id != lease.lease_id for e in half)  # the dead one's is not it
        record = await live.record(request_id)
        assert record is not None and record.state == "placed" and record.replacements == 1
