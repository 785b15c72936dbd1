"""The queue of requests that could not be placed when they came: fair-share order,
passes that place whatever fits now (backfill), deadlines, cancellation. Each step is a
transition of the request lifecycle (``request_states``, docs/lifecycle.md): a pass
*claims* a request (queued → placing) before it places it, so that a cancel or a second
pass cannot meet it half-way; a cancel succeeds only from queued."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

import msgspec

from services.common.auth import Principal
from services.common.errors import BrokerError, Conflict, Forbidden, Unavailable
from services.common.ids import new_id
from services.common.messages import LeaseInfo, RequestCancelled, RequestPlaced, RequestQueued, RequestRejected

from .budgets import Budgets
from .core import Core
from .locks import OwnedLock
from .matching.batch import plan_queue
from .matching.model import Ask, Placement as Option
from .metrics import QUEUE_WAIT_SECONDS
from .placement import NotPlaced, Placement
from .records import RequestRecord, RequestView
from .replacement import Replacer, by_of
from .request_states import Claim, Refused
from .views import Views

log = logging.getLogger("broker")
QUEUE_PLAN_BUDGET_S = 0.02  # a queue pass plans jointly for at most this long (it blocks the loop)
QUEUE_PLAN_MAX = 200  # requests at the head of the queue planned jointly
QUEUE_LOCK_MS = 10_000  # one pass at a time, mostly: a longer pass lets another in, which the claims make safe


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RequestQueue:
    def __init__(self, core: Core, placement: Placement, budgets: Budgets, views: Views,
                 replacer: Replacer | None = None) -> None:
        self.core, self.placement, self.budgets, self.views = core, placement, budgets, views
        self.replacer = replacer or Replacer(core, placement)
        self.lock = OwnedLock(core.redis, core.keys.lock("queue"), QUEUE_LOCK_MS)
        self._taking_back: set[asyncio.Task] = set()  # queued requests whose client heard an error

    # --- accepted → queued -------------------------------------------------------------------
    async def queue(self, record: RequestRecord, now: datetime) -> None:
        """A request that found no capacity waits: durable first (its ``RequestQueued``
        acknowledged by JetStream, which a rebuild after a Redis loss replays), then in
        Redis. If the event store does not take it, nothing is queued and the caller
        hears 503: a 202 is a promise that survives a Redis loss."""
        core = self.core
        body, stored = record.body, record.body.workload is not None and core.access is not None
        if stored:  # intake stored the workload in the access bucket: no env or script in an event
            body = msgspec.structs.replace(body, workload=None)
        event = RequestQueued(id=new_id("ev"), at=now, request_id=record.request_id, tenant=record.tenant,
                              reasons=tuple(record.reasons), body=msgspec.json.encode(body), workload_stored=stored)
        try:
            await core.acks.publish(core.subjects.request(record.tenant), event)
        except Exception as exc:  # noqa: BLE001 - any failure: not durable, so not queued
            raise Unavailable("the event store did not acknowledge the queued request; nothing was queued, "
                              "retry") from exc
        try:
            await self.add(record, now)
        except Exception as exc:
            # durable but not in Redis: the caller hears 503, so the record must not hold it
            # queued either (a rebuild would place it for a client that gave up)
            await self._reject_in_record(record, now, "not queued: Redis did not answer")
            raise Unavailable("the queued request could not be written to Redis; nothing was queued, retry") from exc

    async def _reject_in_record(self, record: RequestRecord, now: datetime, reason: str) -> None:
        taken_back = RequestRejected(id=new_id("ev"), at=now, request_id=record.request_id,
                                     tenant=record.tenant, reasons=(reason,))
        try:
            await self.core.publish_request_durably(taken_back)
        except Exception as again:  # noqa: BLE001 - both stores failing: say so
            log.error("request %s is queued in the record but not in Redis (%s)", record.request_id, again)

    def take_back_later(self, record: RequestRecord, now: datetime) -> None:
        """A request made durable as queued whose client then heard an error (the
        placement's deadline passed, or its 202 could not be given): it leaves the queue
        and the record, so that it is neither placed later nor brought back by a rebuild.
        In the background: the answer is not held up by a store that is not answering.
        A queue pass that claimed it first has placed it: that stands."""
        async def take_back() -> None:
            try:
                await self.core.requests.cancel(record.request_id, now)
            except Refused as refused:
                if refused.state:  # a queue pass has it (or had it) since: not ours to undo
                    log.warning("request %s, whose client heard an error, is %s", record.request_id,
                                refused.state)
                    return
            await self.core.redis.zrem(self.core.keys.queue(), record.request_id)
            await self._reject_in_record(record, now, "not queued: its client was answered with an error")

        task = asyncio.create_task(take_back())
        self._taking_back.add(task)
        task.add_done_callback(self._taking_back.discard)

    async def add(self, record: RequestRecord, now: datetime) -> bool:
        """The queued request in Redis (create-only, so a rebuild never overwrites a newer
        state). Score: priority band first, then a per-tenant virtual time so tenants take
        turns (fair share), FIFO within a tenant."""
        core = self.core
        record.state = "queued"
        if not await core.requests.queue(record):
            return False
        await self.index(record, now)
        return True

    async def index(self, record: RequestRecord, now: datetime) -> None:
        """A queued request in the queue's index (and its tenant's): where a pass finds it."""
        core = self.core
        vtime = await core.redis.hget(core.keys.tenant_vtime(), record.tenant)
        start = max(now.timestamp(), float(vtime or 0))
        await core.redis.hset(core.keys.tenant_vtime(), record.tenant, start + 1.0)
        score = (9 - record.body.priority) * 1e11 + start
        pipe = core.redis.pipeline(transaction=False)
        pipe.zadd(core.keys.tenant_requests(record.tenant), {record.request_id: record.created_at.timestamp()})
        pipe.zadd(core.keys.queue(), {record.request_id: score})
        pipe.sadd(core.keys.tenant_queued(record.tenant), record.request_id)  # counted by the cap, restored ones too
        await pipe.execute()

    # --- a pass ---------------------------------------------------------------------------------
    async def run_queue(self, limit: int = 1000) -> int:
        """One pass over the queue, in order; whatever fits now is placed (backfill).
        Mostly one replica at a time (an owned lock); any replica may kick it."""
        core = self.core
        token = await self.lock.acquire()
        if token is None:
            return 0
        placed = 0
        try:
            ids = [_s(i) for i in await core.redis.zrange(core.keys.queue(), 0, limit - 1)]
            records = {r.request_id: r for r in await core.requests.get_many(ids)}
            plan = self._plan_queue([records[k] for k in records if not self._skip(records[k])])
            for request_id in ids:
                record = records.get(request_id)
                now = core.clock()
                if record is None or record.state not in ("queued", "placing"):
                    await core.redis.zrem(core.keys.queue(), request_id)  # the queue is an index: done ones leave
                    continue
                if record.deadline_at and now >= record.deadline_at:
                    await self.expire(record, now)
                    continue
                if record.tenant in self.budgets.blocked:
                    continue  # stays queued until the budget is topped up
                prefer = plan.get(request_id)
                if prefer is None and not self._may_fit(record):
                    continue  # nothing to claim for: no capacity matches now
                claim = await core.requests.claim(request_id)
                if claim is None:
                    continue  # cancelled, expired or held by another pass since it was read
                placed += await self._place_claimed(claim, prefer)
        finally:
            await self.lock.release(token)
        return placed

    def _may_fit(self, record: RequestRecord) -> bool:
        try:
            decision = self.core.world.engine.match(self.replacer.ask_of(record), limit=1)
        except BrokerError:
            return True  # the claim settles it as rejected
        if not decision.placed:
            record.reasons = list(decision.reasons)
        return decision.placed

    async def _place_claimed(self, claim: Claim, prefer: Option | None) -> int:
        """placing → placed (1), or back to queued / rejected (0)."""
        core = self.core
        record, now = claim.record, core.clock()
        states = core.requests

        replacement = record.replacing  # a failed or lost lease's replacement that waited for capacity
        kept = list(record.lease_ids) if replacement is not None else []

        async def settle(leases: list[LeaseInfo]) -> None:
            record.lease_ids = [*kept, *(lease.lease_id for lease in leases)]
            record.replacing, record.updated_at = None, now
            await states.place(claim, record)

        try:
            if replacement is None:
                await self.placement.try_place(record.request_id, record.tenant, record.body, now, prefer=prefer,
                                               settle=settle)
            else:
                leases = await self.replacer.place(record, replacement, now, settle, prefer)
        except NotPlaced as np:
            record.reasons = list(np.decision.reasons) or ["no capacity matches right now"]
            await self._settle_back(claim, record, now)
            return 0
        except Refused as refused:  # the claim was taken over (this pass outlived it): the grant was given back
            log.warning("queued request %s was claimed by another pass (%s); not placed here",
                        record.request_id, refused.state)
            return 0
        except Unavailable as exc:  # the event store or Redis did not answer: try again next pass
            log.warning("queued request %s stays queued: %s", record.request_id, exc.detail)
            record.reasons = [f"capacity was found but not granted: {exc.detail}; retried on the next pass"]
            await self._settle_back(claim, record, now)
            return 0
        except BrokerError as exc:  # e.g. a model vanished from the catalogue
            record.reasons, record.updated_at = [exc.detail], now
            try:
                await states.reject(claim, record)
            except Refused:
                return 0
            await self._left_queue(record, now)
            return 0
        if replacement is not None:
            try:
                await self.replacer.announce(replacement.lease, replacement.seq, by_of(leases), now)
            except Exception as exc:  # noqa: BLE001 - the replacement stands; only its announcement is missing
                log.error("lease %s was replaced, but lease.replaced was not recorded (%s)",
                          replacement.lease.lease_id, exc)
        await self._left_queue(record, now)
        return 1

    async def _settle_back(self, claim: Claim, record: RequestRecord, now: datetime) -> None:
        """placing → queued, with the reasons it stays; a claim lost meanwhile is the new
        claimer's business."""
        record.updated_at = now
        try:
            await self.core.requests.requeue(claim, record)
        except Refused:
            pass

    def _skip(self, record: RequestRecord) -> bool:
        """Not placed by this pass whatever the capacity (see run_queue)."""
        return (record.state != "queued" or record.tenant in self.budgets.blocked
                or bool(record.deadline_at and self.core.clock() >= record.deadline_at))

    def _plan_queue(self, records: list[RequestRecord]) -> dict[str, Option]:
        """Placements for this pass, planned jointly (``plan_queue``: who is served stays
        what the queue's order says; only where they go is planned together)."""
        asks: list[tuple[str, Ask]] = []
        for record in records[:QUEUE_PLAN_MAX]:
            try:
                asks.append((record.request_id, self.replacer.ask_of(record)))
            except BrokerError:
                continue
        plan = plan_queue(self.core.world.engine, [ask for _, ask in asks], time_budget_s=QUEUE_PLAN_BUDGET_S)
        return {asks[i][0]: placement for i, placement in plan.items()}

    async def _left_queue(self, record: RequestRecord, now: datetime) -> None:
        """After a transition out of the queue: off the index, and its event made durable
        (a rebuild after a Redis loss must not bring it back)."""
        core = self.core
        QUEUE_WAIT_SECONDS.labels(record.state).observe(max(0.0, (now - record.created_at).total_seconds()))
        await core.redis.zrem(core.keys.queue(), record.request_id)
        base = {"id": new_id("ev"), "at": now, "request_id": record.request_id, "tenant": record.tenant}
        if record.state == "placed":
            event = RequestPlaced(**base, lease_ids=tuple(record.lease_ids))
        elif record.state == "cancelled":
            event = RequestCancelled(**base)
        else:  # rejected, expired
            event = RequestRejected(**base, reasons=tuple(record.reasons))
        try:
            await core.publish_request_durably(event)
        except Exception as exc:  # noqa: BLE001 - the transition is made; the rebuild also checks the grants
            log.error("request %s is %s, but its event was not recorded (%s)", record.request_id, record.state, exc)

    # --- queued → cancelled | expired ---------------------------------------------------------
    async def cancel(self, principal: Principal, request_id: str) -> RequestView:
        if principal.role == "ops":
            raise Forbidden("ops reads requests; only their tenant cancels them")
        record = await self.views.own_record(principal, request_id)
        now = self.core.clock()
        try:
            await self.core.requests.cancel(request_id, now)
        except Refused as refused:
            raise Conflict(f"request {request_id} is {refused.state}; only a queued request can be cancelled "
                           "(release its leases instead)", state=refused.state) from None
        record.state, record.updated_at = "cancelled", now
        await self._left_queue(record, now)
        return await self.views.view(record)

    async def expire(self, record: RequestRecord, now: datetime) -> None:
        record.reasons = [*record.reasons, "deadline passed while queued"]
        try:
            await self.core.requests.expire(record, now)
        except Refused:
            return  # claimed or cancelled meanwhile
        record.state = "expired"
        await self._left_queue(record, now)
