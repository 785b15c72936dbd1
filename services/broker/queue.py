"""The queue of requests that could not be placed when they came: fair-share order,
passes that place whatever fits now (backfill), deadlines, cancellation."""

from __future__ import annotations

import logging
from datetime import datetime

import msgspec

from services.common.auth import Principal
from services.common.errors import BrokerError, Conflict, Forbidden, Unavailable
from services.common.ids import new_id
from services.common.messages import RequestCancelled, RequestPlaced, RequestQueued, RequestRejected

from .budgets import Budgets
from .core import Core
from .matching.batch import plan_queue
from .matching.model import Ask, Placement as Option
from .metrics import QUEUE_WAIT_SECONDS
from .placement import NotPlaced, Placement
from .records import RequestRecord, RequestView
from .views import Views

log = logging.getLogger("broker")
QUEUE_PLAN_BUDGET_S = 0.02  # a queue pass plans jointly for at most this long (it blocks the loop)
QUEUE_PLAN_MAX = 200  # requests at the head of the queue planned jointly


class RequestQueue:
    def __init__(self, core: Core, placement: Placement, budgets: Budgets, views: Views) -> None:
        self.core, self.placement, self.budgets, self.views = core, placement, budgets, views

    async def enqueue(self, record: RequestRecord, now: datetime, announce: bool = True) -> None:
        """Score: priority band first, then a per-tenant virtual time so tenants take
        turns (fair share), FIFO within a tenant."""
        core = self.core
        vtime = await core.redis.hget(core.keys.tenant_vtime(), record.tenant)
        start = max(now.timestamp(), float(vtime or 0))
        await core.redis.hset(core.keys.tenant_vtime(), record.tenant, start + 1.0)
        score = (9 - record.body.priority) * 1e11 + start
        await core.save(record)
        await core.redis.zadd(core.keys.queue(), {record.request_id: score})
        if announce:
            await core.publish_request(RequestQueued(id=new_id("ev"), at=now, request_id=record.request_id,
                                                     tenant=record.tenant, reasons=tuple(record.reasons),
                                                     body=msgspec.json.encode(record.body)))

    async def run_queue(self, limit: int = 1000) -> int:
        """One pass over the queue, in order; whatever fits now is placed (backfill).
        One replica at a time (a Redis lock); any replica may kick it."""
        core = self.core
        lock = core.keys.lock("queue")
        if not await core.redis.set(lock, "1", nx=True, px=10_000):
            return 0
        placed = 0
        try:
            ids = await core.redis.zrange(core.keys.queue(), 0, limit - 1)
            records = {r.request_id: r for r in await core.records(ids)}
            plan = self._plan_queue([records[k] for k in records if not self._skip(records[k])])
            for raw_id in ids:
                request_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                record = records.get(request_id)
                now = core.clock()
                if record is None or record.state != "queued":
                    await core.redis.zrem(core.keys.queue(), request_id)
                    continue
                if record.deadline_at and now >= record.deadline_at:
                    await self._finish_queued(record, "rejected", now,
                                              reasons=[*record.reasons, "deadline passed while queued"])
                    continue
                if record.tenant in self.budgets.blocked:
                    continue  # stays queued until the budget is topped up
                try:
                    leases, _ = await self.placement.try_place(record.request_id, record.tenant, record.body, now,
                                                               prefer=plan.get(record.request_id))
                except NotPlaced as np:
                    record.reasons = list(np.decision.reasons)
                    continue
                except Unavailable as exc:  # the event store or Redis did not answer: try again next pass
                    log.warning("queued request %s stays queued: %s", record.request_id, exc.detail)
                    record.reasons = [f"capacity was found but not granted: {exc.detail}; retried on the next pass"]
                    await core.save(record)
                    continue
                except BrokerError as exc:  # e.g. a model vanished from the catalogue
                    await self._finish_queued(record, "rejected", now, reasons=[exc.detail])
                    continue
                record.lease_ids = [lease.lease_id for lease in leases]
                await self._finish_queued(record, "placed", now)
                placed += 1
        finally:
            await core.redis.delete(lock)
        return placed

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
                asks.append((record.request_id, self.core.ask_for(record.body)))
            except BrokerError:
                continue
        plan = plan_queue(self.core.world.engine, [ask for _, ask in asks], time_budget_s=QUEUE_PLAN_BUDGET_S)
        return {asks[i][0]: placement for i, placement in plan.items()}

    async def _finish_queued(self, record: RequestRecord, state: str, now: datetime,
                             reasons: list[str] | None = None) -> None:
        core = self.core
        QUEUE_WAIT_SECONDS.labels(state).observe(max(0.0, (now - record.created_at).total_seconds()))
        record.state = state  # type: ignore[assignment]
        record.updated_at = now
        if reasons is not None:
            record.reasons = reasons
        await core.save(record)
        await core.redis.zrem(core.keys.queue(), record.request_id)
        base = {"id": new_id("ev"), "at": now, "request_id": record.request_id, "tenant": record.tenant}
        if state == "placed":
            await core.publish_request(RequestPlaced(**base, lease_ids=tuple(record.lease_ids)))
        elif state == "rejected":
            await core.publish_request(RequestRejected(**base, reasons=tuple(record.reasons)))
        else:
            await core.publish_request(RequestCancelled(**base))

    async def cancel(self, principal: Principal, request_id: str) -> RequestView:
        if principal.role == "ops":
            raise Forbidden("ops reads requests; only their tenant cancels them")
        record = await self.views.own_record(principal, request_id)
        if record.state != "queued":
            raise Conflict(f"request {request_id} is {record.state}; only a queued request can be cancelled "
                           "(release its leases instead)")
        await self._finish_queued(record, "cancelled", self.core.clock())
        return await self.views.view(record)
