"""What every part of the broker shares: its connections, the world it places on, and
the few writes all of them make (request records, request and allocation events, the
announcement of a lease's end)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from datetime import datetime

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from services.common.auth import Principal
from services.common.clock import utcnow
from services.common.errors import Forbidden
from services.common.keys import Keys
from services.common.messages import (
    ENDING_EVENTS,
    AllocEvent,
    LeaseFailed,
    LeaseLost,
    RequestEvent,
)
from services.common.nats_conn import FAILOVER_ERRORS, AckedPublisher, publish_durably
from services.common.subjects import Subjects
from services.common.tracing import nats_headers

from .access import AccessStore
from .domain.requests import ComputeRequest, to_ask
from .leases import PENDING_S, Ended, LeaseStore, Lookup, lookups_into
from .metrics import LEASE_ENDS
from .outbox import Notice, Outbox, iso, owed_event, tag_of
from .queue_cap import TenantQueueCap
from .records import RequestRecord
from .request_states import RequestStates
from .world import World


def tenant_of(principal: Principal) -> str:
    if principal.role != "tenant":
        raise Forbidden("only a tenant key places requests (its tenant id is the one billed)")
    return principal.subject


def per_item(flat: list, sizes: list[int]) -> list[list]:
    """``flat`` (the results of a batch's groups, in order) cut back into one list per
    item of ``sizes`` groups."""
    out, i = [], 0
    for size in sizes:
        out.append(flat[i:i + size])
        i += size
    return out


class Core:
    def __init__(self, *, nc: NATS, js: JetStreamContext, redis: Redis, keys: Keys, subjects: Subjects,
                 world: World, leases: LeaseStore, clock: Callable[[], datetime] = utcnow) -> None:
        self.nc, self.js, self.redis, self.keys, self.subjects = nc, js, redis, keys, subjects
        self.world, self.leases, self.clock = world, leases, clock
        self.queue_kick = asyncio.Event()
        self.requests = RequestStates(redis, keys)
        self.acks = AckedPublisher(nc)
        self.spread = random.Random()  # the order of the options tried after a lost race
        self.queue_cap = TenantQueueCap(redis, keys, 0)  # the app sets the cap from its settings
        self.pending_s = PENDING_S  # the provisional expiry of a reservation (the app sets it from its settings)
        self.access: AccessStore | None = None  # access details (the app opens the bucket)
        self.outbox = Outbox(redis, keys)  # the app sets the grace from its settings

    def ask_for(self, body: ComputeRequest, exclude: frozenset[str] = frozenset()):  # noqa: ANN201
        return to_ask(body, self.world.catalogue, self.world.countries, exclude)

    async def publish_request(self, event: RequestEvent) -> None:
        """Request events are informational: published without waiting for the ack
        (JetStream still stores them); the lease events are the durable record."""
        await self.nc.publish(self.subjects.request(event.tenant), msgspec.json.encode(event),
                              headers=nats_headers({"Nats-Msg-Id": event.id}))

    async def publish_request_durably(self, event: RequestEvent) -> None:
        """For an event that records a change of a queued request already made in Redis
        (placed, rejected, cancelled, expired): the rebuild after a Redis loss reads it,
        so it is acknowledged (retried through a failover), not just sent."""
        subject = self.subjects.request(event.tenant)
        try:
            await self.acks.publish(subject, event)
        except FAILOVER_ERRORS:
            await publish_durably(self.js, subject, event)

    async def publish_alloc(self, event: AllocEvent) -> None:
        """Published with the concurrent others (``AckedPublisher``); retried through a
        NATS failover: a grant not acknowledged is undone by the caller, but a release,
        renewal or expiry has already happened in Redis. A failed or lost lease goes to
        the failover work queue first: once its event is in the record, its replacement
        cannot be forgotten."""
        if isinstance(event, (LeaseFailed, LeaseLost)):
            await self._publish_acked(self.subjects.failover_work(event.lease.region), event)
        await self._publish_acked(self.subjects.alloc(event.lease.region, event.lease.tenant), event)

    async def _publish_acked(self, subject: str, event: AllocEvent) -> None:
        try:
            await self.acks.publish(subject, event)
        except FAILOVER_ERRORS:
            await publish_durably(self.js, subject, event)

    async def save(self, record: RequestRecord) -> None:
        pipe = self.redis.pipeline(transaction=False)
        self.save_into(pipe, record)
        await pipe.execute()

    def save_into(self, pipe: Pipeline, *records: RequestRecord, lookups: Sequence[Lookup] = ()) -> None:
        """Records of requests decided by the call that accepted them (placed or
        rejected at once), and one ZADD per tenant. ``lookups``: more index entries to
        write with them (a batch's leases); with those, or several records, all of it is
        one script call, and the caller runs the pipeline again after a NOSCRIPT
        (``LeaseStore.run_pipeline``)."""
        by_tenant: dict[str, list] = {}
        for r in records:
            by_tenant.setdefault(r.tenant, []).extend((r.created_at.timestamp(), r.request_id))
        tenants = [(self.keys.tenant_requests(tenant), "z", pairs) for tenant, pairs in by_tenant.items()]
        if lookups or len(records) > 1:
            self.requests.record_into(pipe, *records, lookups=[*lookups, *tenants])
            return
        self.requests.record_into(pipe, *records)  # one record: plain commands, no NOSCRIPT to meet
        lookups_into(pipe, tenants)

    async def record(self, request_id: str) -> RequestRecord | None:
        return await self.requests.get(request_id)

    async def announce(self, notice: Notice, ended: Ended) -> None:
        """``announce_end`` of the event ``notice`` says (the one its script put in the outbox)."""
        await self.announce_end(notice.kind, ended, notice.at, **notice.extra)

    async def announce_end(self, kind: type, ended: Ended, now: datetime, **extra: object) -> None:
        """A lease ended in Redis: the engine hears the pool's free units, the record the
        ending event (then its outbox entry goes), and the queue a kick (units came back)."""
        if ended.free_after >= 0:
            self.world.observe_free(ended.lease.pool_id, ended.free_after)
        event = owed_event(tag_of(kind), iso(now), msgspec.json.encode(extra).decode(),
                           msgspec.json.encode(ended.lease), ended.seq, ended.free_after, ended.pending,
                           ended.devices_free_after)
        await self.publish_owed(event)

    async def publish_owed(self, event: AllocEvent) -> None:
        """Publish an event a transition owes (after its script, or republished by the
        sweep), then clear its outbox entry and do what follows an ending."""
        await self.publish_alloc(event)
        await self.outbox.published(event.lease.region, event.id)
        if not isinstance(event, ENDING_EVENTS):
            return
        LEASE_ENDS.labels(type(event).__name__.removeprefix("Lease").lower()).inc()
        self.queue_kick.set()
        if event.lease.delivery and not isinstance(event, LeaseFailed) and self.access is not None:
            await self.access.delete(event.lease.lease_id)  # a failed lease never had any
