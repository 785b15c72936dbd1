"""The broker's use cases behind one facade (``Broker``), as the HTTP layer and the
app's background tasks call them. Each concern is its own module over the state
machines of ``docs/lifecycle.md``:

* ``intake``: a new request (placed, queued or rejected) and quotes;
* ``placement``: reserve → durable grant → confirm, all or nothing;
* ``preemption``: room made by ending interruptible leases;
* ``queue``: fair-share passes over queued requests, cancellation;
* ``leasing``: a tenant's renew and release;
* ``deliveries``: the provider's side: assignments, ready, failed, health;
* ``recovery``: sweeps, pool loss, rebuild after a Redis loss;
* ``failover``: a failed or lost lease replaced on another pool (``replacement``);
* ``budgets``: tenants out of budget;
* ``views``: what a caller may read.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from redis.asyncio import Redis

from services.common.auth import Principal
from services.common.keys import Keys
from services.common.messages import BillingEvent, LeaseInfo
from services.common.subjects import Subjects

from .budgets import Budgets
from .core import Core, tenant_of, utcnow
from .domain.requests import ComputeRequest
from .deliveries import Deliveries
from .failover import Failover
from .intake import Intake
from .leases import Ended, LeaseStore
from .leasing import Leasing
from .placement import NotPlaced, Placement
from .preemption import Preemption
from .queue import RequestQueue
from .records import LeaseView, QuoteView, RequestRecord, RequestView
from .recovery import Recovery
from .replacement import Replacer
from .views import Views
from .world import World

__all__ = ["Broker", "NotPlaced", "utcnow"]


class Broker:
    def __init__(self, *, nc: NATS, js: JetStreamContext, redis: Redis, keys: Keys, subjects: Subjects,
                 world: World, leases: LeaseStore, clock: Callable[[], datetime] = utcnow) -> None:
        self.core = Core(nc=nc, js=js, redis=redis, keys=keys, subjects=subjects, world=world, leases=leases,
                         clock=clock)
        self.budgets = Budgets(self.core)
        self.views = Views(self.core)
        self.placement = Placement(self.core)
        self.preemption = Preemption(self.core, self.placement)
        replacer = Replacer(self.core, self.placement)
        self.queue = RequestQueue(self.core, self.placement, self.budgets, self.views, replacer)
        self.failover = Failover(self.core, replacer, self.queue)
        self.intake = Intake(self.core, self.placement, self.preemption, self.queue, self.budgets, self.views)
        self.leasing = Leasing(self.core, self.views)
        self.recovery = Recovery(self.core, self.queue, self.budgets)
        self.deliveries = Deliveries(self.core)

    # what callers reach through the broker
    @property
    def redis(self) -> Redis:
        return self.core.redis

    @property
    def keys(self) -> Keys:
        return self.core.keys

    @property
    def world(self) -> World:
        return self.core.world

    @property
    def leases(self) -> LeaseStore:
        return self.core.leases

    @property
    def queue_cap(self):  # noqa: ANN201 - TenantQueueCap
        return self.core.queue_cap

    @property
    def queue_kick(self):  # noqa: ANN201 - asyncio.Event
        return self.core.queue_kick

    @property
    def budget_grace_s(self) -> float:
        return self.budgets.grace_s

    @budget_grace_s.setter
    def budget_grace_s(self, value: float) -> None:
        self.budgets.grace_s = value

    @property
    def blocked(self) -> dict[str, float]:
        return self.budgets.blocked

    tenant_of = staticmethod(tenant_of)

    # requests
    # what an idempotency key's recovery (``key_grants``) does with what it finds
    async def announce_end(self, kind: type, ended: Ended, now: datetime, **extra: object) -> None:
        await self.core.announce_end(kind, ended, now, **extra)

    async def save(self, record: RequestRecord) -> None:
        await self.core.save(record)

    async def view(self, record: RequestRecord, leases: list[LeaseInfo] | None = None) -> RequestView:
        return await self.views.view(record, leases=leases)

    async def place(self, principal: Principal, body: ComputeRequest,
                    request_id: str | None = None) -> tuple[int, RequestView]:
        return await self.intake.place(principal, body, request_id)

    async def quote(self, principal: Principal, body: ComputeRequest) -> QuoteView:
        return await self.intake.quote(principal, body)

    async def cancel(self, principal: Principal, request_id: str) -> RequestView:
        return await self.queue.cancel(principal, request_id)

    async def get_request(self, principal: Principal, request_id: str) -> RequestView:
        return await self.views.get_request(principal, request_id)

    async def record(self, request_id: str) -> RequestRecord | None:
        return await self.core.record(request_id)

    async def run_queue(self, limit: int = 1000) -> int:
        return await self.queue.run_queue(limit)

    # leases
    async def own_lease(self, principal: Principal, lease_id: str) -> LeaseInfo:
        return await self.views.own_lease(principal, lease_id)

    async def list_leases(self, principal: Principal, tenant: str | None) -> list[LeaseInfo]:
        return await self.views.list_leases(principal, tenant)

    async def lease_views(self, principal: Principal, leases: list[LeaseInfo]) -> list[LeaseView]:
        return await self.views.lease_views(principal, leases)

    async def renew(self, principal: Principal, lease_id: str) -> LeaseInfo:
        return await self.leasing.renew(principal, lease_id)

    async def release(self, principal: Principal, lease_id: str) -> LeaseInfo:
        return await self.leasing.release(principal, lease_id)

    # budgets
    async def load_budgets(self) -> None:
        await self.budgets.load()

    async def on_billing(self, event: BillingEvent) -> None:
        await self.budgets.on_billing(event)

    async def revoke_over_budget(self) -> int:
        return await self.budgets.revoke_over_budget()

    # recovery
    async def sweep_and_rebuild(self) -> None:
        await self.recovery.sweep_and_rebuild()

    async def sweep(self) -> int:
        return await self.recovery.sweep()

    async def rebuild_if_lost(self) -> int:
        return await self.recovery.rebuild_if_lost()

    async def pool_lost(self, region: str, pool_id: str, reason: str, generation: int = 0,
                        lease_ids: tuple[str, ...] = ()) -> int:
        return await self.recovery.pool_lost(region, pool_id, reason, generation, lease_ids)
