"""The broker service: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import gc
import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec
from litestar import Litestar
from litestar.datastructures import State
from nats.aio.msg import Msg

from services.common.deadlines import Deadlines
from services.common.http import ops_routes, prometheus, service_app
from services.common import tracing
from services.common.keys import Keys
from services.common.messages import (
    ENDING_EVENTS,
    AllocEvent,
    BillingEvent,
    CapacityEvent,
    PoolOffline,
    PoolOnline,
    PoolRegistered,
    PoolRemoved,
    PoolUpdated,
)
from services.common.lifecycle import forever, relax_gc, stop_tasks
from services.common.settings import Settings, settings_from_env
from services.common.startup import close_connections, guard_requests, open_connections
from services.common.subjects import ACCESS, BILLING, IDEMPOTENCY, Subjects

from .access import AccessStore
from .api import AssignmentController, LeaseController, QuoteController, RequestController
from .idempotency import IDEMPOTENCY_MARGIN_S, Keyring
from .key_grants import LeaseGrants
from .leases import LeaseStore
from .metrics import refresh as refresh_gauges
from .pool_loss import PoolLossFeed
from .reliability.api import ProviderController
from .service import Broker
from .world import World

log = logging.getLogger("broker")


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or settings_from_env()
    subjects, keys = Subjects(settings.prefix), Keys(settings.prefix)
    metrics, _ = prometheus("broker", hot_paths=[r"^/v1/requests$"])

    async def refresh(state: State) -> None:
        await refresh_gauges(state.redis, keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # no echo: this replica applies its own grants and endings to its engine as it
        # makes them (reservation replies, ``free_after``); the allocation stream's copy
        # of them would only cost it a decode each. Other replicas' events still arrive.
        # A Redis command unanswered within redis_timeout_s fails (503) instead of hanging.
        nc, redis, js = await open_connections(settings, subjects, "broker", no_echo=True,
                                               redis_timeout_s=settings.redis_timeout_s)
        world = World(nc, js, redis, keys, subjects)
        await world.load()
        gc.collect()
        gc.freeze()  # the pool index is long-lived: keep it out of every later GC pass (p99)
        relax_gc()  # and what comes later (leases, records, caches) is walked rarely
        broker = Broker(nc=nc, js=js, redis=redis, keys=keys, subjects=subjects, world=world,
                        leases=LeaseStore(redis, keys))

        async def on_capacity(event: CapacityEvent) -> None:
            if isinstance(event, (PoolRegistered, PoolUpdated, PoolOnline)):
                broker.queue_kick.set()

        async def on_alloc(event: AllocEvent) -> None:
            if isinstance(event, ENDING_EVENTS):
                broker.queue_kick.set()

        world.on_capacity = on_capacity  # type: ignore[method-assign]
        world.on_alloc = on_alloc  # type: ignore[method-assign]
        await world.start()

        async def on_pool_gone(event: PoolOffline | PoolRemoved) -> None:
            """One replica (the durable consumer's) marks the leases of a vanished pool lost."""
            await broker.pool_lost(event.region, event.pool_id,
                                   "pool offline" if isinstance(event, PoolOffline) else "pool removed",
                                   generation=event.generation, lease_ids=event.lease_ids)

        pool_loss = PoolLossFeed(nc, js, subjects, on_pool_gone)
        await pool_loss.start()
        failover = broker.failover.feed(nc, js, subjects, ack_wait_s=settings.failover_ack_wait_s,
                                        replicas=settings.stream_replicas)  # one replica replaces each
        await failover.start()
        broker.budget_grace_s = settings.budget_grace_s
        broker.core.outbox.grace_s = settings.outbox_grace_s
        broker.queue_cap.cap = settings.max_queued_per_tenant
        broker.core.pending_s = settings.pending_s
        await broker.load_budgets()

        async def on_billing(msg: Msg) -> None:
            try:
                event = msgspec.json.decode(msg.data, type=BillingEvent)
            except msgspec.DecodeError:
                return
            with tracing.bound(tracing.from_headers(msg.headers)):
                await broker.on_billing(event)

        await nc.subscribe(subjects.events(BILLING), cb=on_billing)
        broker.core.access = await AccessStore.open(nc, subjects.bucket(ACCESS), settings.stream_replicas)
        await broker.sweep_and_rebuild()  # leases restored (or known absent) before the first request
        app.state.broker = broker
        app.state.placement_deadlines = Deadlines(settings.placement_timeout_s)  # the bound of every placement
        app.state.keyring = Keyring(redis, keys, await Keyring.open_bucket(nc, subjects.bucket(IDEMPOTENCY),
                                                                          settings.stream_replicas),
                                    LeaseGrants(broker), stale_s=settings.placement_timeout_s + IDEMPOTENCY_MARGIN_S)
        await guard_requests(app.state, nc, redis, settings, subjects, keys)
        tasks = [
            asyncio.create_task(forever("lease sweep", broker.sweep_and_rebuild, interval=settings.sweep_interval_s,
                                        logger=log)),
            asyncio.create_task(forever("queue", broker.run_queue, interval=1.0, kick=broker.queue_kick, logger=log)),
            # safety net; events keep it current
            asyncio.create_task(forever("world resync", world.resync, interval=300.0, logger=log)),
            asyncio.create_task(forever("reliability refresh", world.refresh_reliability,
                                        interval=settings.reliability_refresh_s, logger=log)),
        ]
        try:
            yield
        finally:
            await stop_tasks(tasks)
            await pool_loss.stop()
            await failover.stop()
            await close_connections(nc, redis)

    return service_app(
        "broker", "App-facing API: requests, quotes, leases.", settings=settings, metrics=metrics,
        route_handlers=[*ops_routes("broker", refresh), RequestController, QuoteController, LeaseController,
                        ProviderController, AssignmentController],
        lifespan=lifespan,
    )
