"""Keeping Redis true to the world: expired leases swept, leases of vanished pools
marked lost, and after a Redis loss the live leases and the queue rebuilt from the
durable record (JetStream)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta

import msgspec

from services.common.messages import (
    AllocEvent,
    LeaseExpired,
    LeaseGranted,
    LeaseInfo,
    LeaseLost,
    LeaseProvisioning,
    LeaseReady,
    LeaseRenewed,
    RequestEvent,
    RequestQueued,
    RequestRejected,
)
from services.common.ids import new_id
from services.common.nats_conn import read_stream

from .budgets import Budgets
from .core import Core
from .deliveries import time_out
from .domain.requests import ComputeRequest
from .locks import OwnedLock
from .outbox import Notice
from .queue import RequestQueue
from .records import RequestRecord

log = logging.getLogger("broker")
_alloc = msgspec.json.Decoder(AllocEvent)
_request_event = msgspec.json.Decoder(RequestEvent)
REBUILD_LOCK_MS = 60_000
# a lease whose last event is one of these is live (the others end it, or say it was replaced)
OPEN_EVENTS = (LeaseGranted, LeaseProvisioning, LeaseReady, LeaseRenewed)
RETRACTED = ("grant not completed", "grant never completed")  # a LeaseLost that undid a grant
LOSE_AT_ONCE = 256  # leases of a vanished pool ended concurrently


def granted_requests(last: dict[str, AllocEvent]) -> set[str]:
    """Requests with a grant in the durable record that was not undone: placed, whatever
    the request stream says last (its broker may have died before recording that)."""
    return {e.lease.request_id for e in last.values()
            if not (isinstance(e, LeaseLost) and e.reason in RETRACTED)}


class Recovery:
    def __init__(self, core: Core, queue: RequestQueue, budgets: Budgets) -> None:
        self.core, self.queue, self.budgets = core, queue, budgets
        self._lost_regions: set[str] = set()  # regions refused for a lost live state (logged once)
        self.lock = OwnedLock(core.redis, core.keys.lock("rebuild"), REBUILD_LOCK_MS)

    async def sweep_and_rebuild(self) -> None:
        await self.rebuild_if_lost()
        if await self.core.redis.exists(self.core.keys.rebuilt_marker("broker")):
            await self._mark_new_regions_ready()
        await self.sweep()
        await self.budgets.revoke_over_budget()

    async def _mark_new_regions_ready(self) -> None:
        """Regions added since the last rebuild start ready: they have no leases to lose.
        A region without its marker but with allocations in the durable record lost its
        live state on its own (its Redis Cluster master came back empty, while the global
        rebuilt markers live elsewhere): it stays refused (503) rather than be booked over
        leases Redis no longer holds, and the rebuilt markers are removed, so that the
        registry puts its pools back and ``rebuild_if_lost`` its leases."""
        core = self.core
        missing = await core.leases.not_ready(list(core.world.countries))
        self._lost_regions.intersection_update(missing)
        new = []
        for region in missing:
            info = await core.js.stream_info(core.subjects.stream("alloc"),
                                             subjects_filter=core.subjects.alloc(region, "*"))
            if not info.state.subjects:
                new.append(region)
            elif region not in self._lost_regions:
                self._lost_regions.add(region)
                log.error("region %s lost its live leases in Redis while the rest did not; it refuses "
                          "placements while the registry and the broker rebuild it from JetStream", region)
                for service in ("registry", "broker"):  # the rebuild restores the regions without a marker
                    await core.redis.delete(core.keys.rebuilt_marker(service))
        if new:
            await core.leases.mark_ready(new)

    async def sweep(self) -> int:
        """Expire unrenewed leases, and fail those not delivered by their provision
        deadline. Safe in every replica: the scripts re-check expiry and deadline, and
        only the caller that removed a lease announces it."""
        core = self.core
        now = core.clock()
        n = 0
        notice = Notice(LeaseExpired, now)
        for lease in await core.leases.expired_in(list(core.world.countries), now.timestamp()):
            ended = await core.leases.end(lease, "expire", now.timestamp(), notice)
            if ended is not None:
                if ended.pending:
                    # its broker died between reservation and confirmation: nobody was told
                    # 201; it ends in the record at its grant time, nothing billed (``owed_event``)
                    log.warning("lease %s was never confirmed by its broker: given back", lease.lease_id)
                await core.announce(notice, ended)
                n += 1
        for lease in await core.leases.provisioning_due(list(core.world.countries), now.timestamp()):
            if await time_out(core, lease, now) is not None:  # not ready by its deadline: failed
                n += 1
        return n + await self.republish_owed()

    async def republish_owed(self) -> int:
        """Events owed longer than the outbox's grace (their broker died after the script,
        or NATS stayed away past its retries): published under their own ids, then
        cleared. Every replica may do it at once: a repeat is dropped by JetStream's
        duplicate window, or after it by the consumers (per lease and seq)."""
        core = self.core
        owed = await core.outbox.owed(list(core.world.countries), core.clock().timestamp())
        unreadable = [(region, event_id) for region, event_id, event in owed if event is None]
        await core.outbox.remove(unreadable)
        events = [event for _, _, event in owed if event is not None]
        for i in range(0, len(events), LOSE_AT_ONCE):
            results = await asyncio.gather(*map(core.publish_owed, events[i:i + LOSE_AT_ONCE]),
                                           return_exceptions=True)
            for event, result in zip(events[i:i + LOSE_AT_ONCE], results, strict=True):
                if isinstance(result, Exception):  # still owed: the next sweep tries again
                    log.warning("owed event %s not republished yet (%s)", event.id, result)
        if events:
            log.warning("republished %d lease events owed since before a broker died or NATS was away",
                        len(events))
        return len(events)

    async def rebuild_if_lost(self) -> int:
        """Redis lost or flushed: once the registry has put the pools back, replay the
        allocation stream and restore every live lease (and the units it holds), then
        the queue from the request stream. One replica does it (a lock)."""
        core = self.core
        marker = core.keys.rebuilt_marker("broker")
        if await core.redis.exists(marker):
            return 0
        token = await self.lock.acquire()
        if token is None:
            return 0
        try:
            # read the record while the registry puts the pools back; restore after it has
            t0 = time.perf_counter()
            last: dict[str, AllocEvent] = {}
            ready_at: dict[str, float] = {}  # delivering leases that became ready: they come back ready
            async for _, data in read_stream(core.js, core.subjects.stream("alloc"), core.subjects.events("alloc"),
                                             batch=5000):
                event = _alloc.decode(data)
                if isinstance(event, LeaseReady):
                    ready_at[event.lease.lease_id] = event.at.timestamp()
                seen = last.get(event.lease.lease_id)
                if seen is None or event.seq >= seen.seq:
                    last[event.lease.lease_id] = event
            for _ in range(200):
                if await core.redis.exists(core.keys.rebuilt_marker("registry")):
                    break
                await asyncio.sleep(0.05)
            else:
                return 0  # the registry is not back: try again on the next pass
            t_read = time.perf_counter()
            now = core.clock()
            open_ = [e for e in last.values() if isinstance(e, OPEN_EVENTS)]
            # the regions that lost their leases (all of them after a flush; one when a Redis
            # Cluster master came back empty): only theirs are restored, as a lease of an
            # intact region released meanwhile must not come back; the others' lookups are
            # written again (they may have been on that master)
            lost = set(await core.leases.not_ready(sorted(set(core.world.countries) |
                                                          {e.lease.region for e in open_})))
            alive = [e for e in open_ if e.lease.expires_at > now]
            await core.leases.restore([(e.lease, e.seq, ready_at.get(e.lease.lease_id))
                                       for e in alive if e.lease.region in lost])
            await core.leases.index([e.lease for e in alive if e.lease.region not in lost])
            restored = sum(1 for e in alive if e.lease.region in lost)
            t_restored = time.perf_counter()
            # expired while Redis was lost, so no sweeper saw them: end them in the record,
            # else the meter (which bills on the ending event) would never bill them
            gone = [e for e in open_ if e.lease.expires_at <= now and e.lease.region in lost]
            for i in range(0, len(gone), 500):
                await asyncio.gather(*(core.publish_alloc(LeaseExpired(
                    id=f"{e.lease.lease_id}.{e.seq + 1}", at=now, lease=e.lease, seq=e.seq + 1))
                    for e in gone[i:i + 500]))
            await self.restore_queue(granted_requests(last), now)
            await core.leases.mark_ready(list(core.world.countries))
            await core.redis.set(marker, now.isoformat())
            await core.world.resync()
            if restored:
                log.warning("rebuilt %d live leases in Redis from the allocation stream (%d events read in %.2fs, "
                            "restored in %.2fs, ready after %.2fs)", restored, len(last), t_read - t0,
                            t_restored - t_read, time.perf_counter() - t0)
            core.queue_kick.set()
            return restored
        finally:
            await self.lock.release(token)

    async def restore_queue(self, granted: set[str], now: datetime) -> int:
        """The queue from the request stream: each request whose last event says queued
        and that was never granted goes back (create-only: one Redis still knows is kept)."""
        core = self.core
        last: dict[str, RequestEvent] = {}
        async for _, data in read_stream(core.js, core.subjects.stream("request"), core.subjects.events("request")):
            event = _request_event.decode(data)
            last[event.request_id] = event
        n = 0
        for event in last.values():
            if isinstance(event, RequestQueued) and event.body and event.request_id not in granted:
                body = msgspec.json.decode(event.body, type=ComputeRequest)
                if event.workload_stored:
                    workload = await core.access.workload(event.request_id) if core.access is not None else None
                    if workload is None:  # the bucket lost it: queued again, it would be delivered wrong
                        await self._reject_lost_workload(event, body, now)
                        continue
                    body = msgspec.structs.replace(body, workload=workload)
                record = RequestRecord(request_id=event.request_id, tenant=event.tenant, state="queued",
                                       created_at=event.at, updated_at=now, body=body, reasons=list(event.reasons))
                if body.deadline_s:
                    record.deadline_at = event.at + timedelta(seconds=body.deadline_s)
                n += await self.queue.add(record, event.at)
        return n

    async def _reject_lost_workload(self, event: RequestQueued, body: ComputeRequest, now: datetime) -> None:
        """A queued request whose workload the access bucket no longer has: rejected (its
        client reads why), in Redis and durably, never placed without what it runs."""
        if await self.core.record(event.request_id) is not None:
            return  # Redis still knows it (with its workload): nothing to restore
        reason = "its workload was lost from the access bucket while it was queued; submit the request again"
        log.error("queued request %s not restored: %s", event.request_id, reason)
        record = RequestRecord(request_id=event.request_id, tenant=event.tenant, state="rejected",
                               created_at=event.at, updated_at=now, body=body, reasons=[reason])
        # the record of it first (a failure here leaves it queued in the stream: the next
        # rebuild decides again), then Redis
        await self.core.publish_request_durably(RequestRejected(id=new_id("ev"), at=now, request_id=event.request_id,
                                                                tenant=event.tenant, reasons=(reason,)))
        await self.core.save(record)

    async def pool_lost(self, region: str, pool_id: str, reason: str, generation: int = 0,
                        lease_ids: tuple[str, ...] = ()) -> int:
        """End the leases a pool outage or removal took: those the event names (the pool's
        leases at that moment; none named is none, as a lease granted after the pool came
        back must outlive a late event). An event that names no generation (an older
        registry's) names no leases either: then every lease on the pool of that
        generation or older; never a lease granted on a later generation (the pool
        registered again since)."""
        core = self.core
        now = core.clock()
        if lease_ids or generation:
            leases = await core.leases.of_region(region, lease_ids)
        else:
            leases = [lease for lease in await core.leases.on_pool(region, pool_id)
                      if not generation or lease.pool_generation <= generation]
        notice = Notice(LeaseLost, now, {"reason": reason})

        async def lose(lease: LeaseInfo) -> int:
            ended = await core.leases.end(lease, "lost", now.timestamp(), notice)
            if ended is None:
                return 0
            await core.announce(notice, ended)
            return 1

        n = 0
        for i in range(0, len(leases), LOSE_AT_ONCE):  # concurrently: each lost lease is failed over from its event
            n += sum(await asyncio.gather(*map(lose, leases[i:i + LOSE_AT_ONCE])))
        return n
