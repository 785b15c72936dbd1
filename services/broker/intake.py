"""A new request: placed now (201), queued (202), or rejected (409 with ``queue: false``,
422 when it can never be placed); and quotes, which reserve nothing."""

from __future__ import annotations

from datetime import timedelta

from services.common.auth import Principal
from services.common.errors import Conflict, Forbidden, Unavailable, Unprocessable
from services.common.ids import new_id
from services.common.messages import RequestAccepted, RequestPlaced, RequestRejected

from .budgets import Budgets
from .core import Core, tenant_of
from .domain.requests import ComputeRequest
from .placement import NotPlaced, Placement
from .preemption import Preemption
from .queue import RequestQueue
from .queue_cap import refused
from .records import QuoteView, RequestRecord, RequestView
from .views import Views


class Intake:
    def __init__(self, core: Core, placement: Placement, preemption: Preemption, queue: RequestQueue,
                 budgets: Budgets, views: Views) -> None:
        self.core, self.placement, self.preemption = core, placement, preemption
        self.queue, self.budgets, self.views = queue, budgets, views

    async def place(self, principal: Principal, body: ComputeRequest,
                    request_id: str | None = None) -> tuple[int, RequestView]:
        """``request_id``: the one an idempotency key claimed for this placement."""
        core = self.core
        tenant = tenant_of(principal)
        self.budgets.check(tenant)
        ask = core.ask_for(body)  # validate before anything happens
        now = core.clock()
        request_id = request_id or new_id("req")
        record = RequestRecord(request_id=request_id, tenant=tenant, state="placed", created_at=now,
                               updated_at=now, body=body)
        if body.workload is not None and core.access is not None:
            await core.access.put_workload(request_id, body.workload)  # its provider reads it, even after a Redis loss
        try:
            try:
                leases, option = await self.placement.try_place(request_id, tenant, body, now, record, ask=ask)
            except NotPlaced as np:
                # not placed at once: ops hear that it arrived before they hear how it goes on
                # (a request placed at once has its request.placed alone: one publish less
                # on every placement, docs/events.md)
                await core.publish_request(RequestAccepted(id=new_id("ev"), at=now, request_id=request_id,
                                                           tenant=tenant, units=body.units or 0))
                preempted = None if np.decision.never or np.contended else \
                    await self.preemption.try_preempt(request_id, tenant, body, now)
                if preempted is None:
                    raise
                leases, option = preempted
        except NotPlaced as np:
            reasons = list(np.decision.reasons) or ["no capacity matches right now"]
            record.reasons = reasons
            full = None if np.decision.never or not body.queue else \
                await core.queue_cap.refusal(tenant, request_id)
            if full is not None:  # the tenant's queue is at its cap (docs/overload.md)
                record.reasons = reasons = [*reasons, full]
            if np.decision.never or not body.queue or full is not None:
                record.state = "rejected"
                await core.save(record)
                await core.publish_request(RequestRejected(id=new_id("ev"), at=now, request_id=request_id,
                                                           tenant=tenant, reasons=tuple(reasons)))
                if full is not None:
                    raise refused(full, reasons, request_id) from None
                if np.decision.never:
                    raise Unprocessable("this request can never be placed on the registered capacity",
                                        reasons=reasons, request_id=request_id) from None
                raise Conflict("no capacity for this request right now (queue: false)", reasons=reasons,
                               request_id=request_id) from None
            record.state = "queued"
            if body.deadline_s:
                record.deadline_at = now + timedelta(seconds=body.deadline_s)
            try:
                await self.queue.queue(record, now)
                return 202, await self.views.view(record)
            except Unavailable:
                raise  # nothing was queued (or it was taken back already)
            except BaseException:  # e.g. placement_timeout_s passed: the client hears 503, not 202
                self.queue.take_back_later(record, now)
                raise
        if record.lease_ids != [lease.lease_id for lease in leases]:  # placed by preemption
            record.lease_ids = [lease.lease_id for lease in leases]
            await core.save(record)
        await core.publish_request(RequestPlaced(id=new_id("ev"), at=now, request_id=request_id, tenant=tenant,
                                                 lease_ids=tuple(record.lease_ids)))
        return 201, await self.views.view(record, leases=leases, placement=self.core.world.engine.annotate(option))

    async def quote(self, principal: Principal, body: ComputeRequest) -> QuoteView:
        if principal.role not in ("tenant", "admin", "ops"):
            raise Forbidden(f"role {principal.role} may not ask for quotes")
        engine = self.core.world.engine
        decision = engine.match(self.core.ask_for(body), limit=5)
        return QuoteView(options=[engine.annotate(o) for o in decision.options], reasons=list(decision.reasons),
                         placeable_now=decision.placed, never=decision.never)
