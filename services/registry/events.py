"""Capacity events: built from what a pool change did, published to JetStream."""

from __future__ import annotations

from datetime import datetime

from nats.js import JetStreamContext

from services.common.ids import new_id
from services.common.messages import (
    CapacityEvent,
    Pool,
    PoolDraining,
    PoolOffline,
    PoolOnline,
    PoolRegistered,
    PoolRemoved,
    PoolUpdated,
)
from services.common.nats_conn import publish_durably
from services.common.subjects import Subjects

from .store import Transition


class CapacityEvents:
    def __init__(self, js: JetStreamContext, subjects: Subjects) -> None:
        self.js, self.subjects = js, subjects

    async def publish(self, event: CapacityEvent) -> int:
        """Retried through a NATS failover: the pool change is already in the record and
        in Redis; a lost event would leave the brokers' view behind until a resync."""
        return await publish_durably(self.js, self.subjects.capacity(event.region, event.provider), event)


def _base(pool_id: str, provider: str, region: str, at: datetime, event_id: str | None = None) -> dict:
    return {"id": event_id or new_id("ev"), "at": at, "pool_id": pool_id, "provider": provider, "region": region}


def for_upsert(pool: Pool, t: Transition, at: datetime, created: bool) -> CapacityEvent:
    """``created``: the durable record was created (not the Redis hash: the record decides)."""
    base = _base(pool.pool_id, pool.provider, pool.spec.region, at)
    if created:
        return PoolRegistered(**base, pool=pool, free=t.free)
    return PoolUpdated(**base, pool=pool, free=t.free, overcommit=t.overcommit)


def for_status(pool_id: str, provider: str, region: str, t: Transition, at: datetime,
               event_id: str | None = None) -> CapacityEvent | None:
    """The event for a status change, if the call changed the status."""
    if not t.changed:
        return None
    base = _base(pool_id, provider, region, at, event_id)
    if t.status == "offline":
        return PoolOffline(**base, generation=t.generation, lease_ids=t.lost)
    if t.status == "draining":
        return PoolDraining(**base)
    if t.status == "online":
        return PoolOnline(**base, free=t.free)
    if t.status == "removed":
        return PoolRemoved(**base, leased=t.leased, generation=t.generation, lease_ids=t.lost)
    return None
