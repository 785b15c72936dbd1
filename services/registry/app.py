"""The registry service: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from litestar import Litestar
from litestar.datastructures import State

from services.common.http import ops_routes, prometheus, service_app
from services.common.keys import Keys
from services.common.lifecycle import forever, relax_gc, stop_tasks
from services.common.nats_conn import ensure_bucket
from services.common.settings import Settings, settings_from_env
from services.common.startup import close_connections, guard_requests, open_connections
from services.common.subjects import Subjects

from .api.capacity import capacity
from .api.reliability import reliability
from .api.catalogue import CatalogueController
from .api.events import events
from .api.keys import KeyController
from .api.pools import HeartbeatController, PoolController
from .capacity import SummaryCache, set_gauges
from .console import console_router
from .domain.catalogue import load_catalogue
from .domain.topology import default_records, load_records
from .events import CapacityEvents
from .records import PoolRecords
from .rpc import serve_rpc
from .service import Registry, RegionBook
from .store import PoolStore

log = logging.getLogger("registry")


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or settings_from_env()
    subjects, keys = Subjects(settings.prefix), Keys(settings.prefix)
    metrics, _ = prometheus("registry", hot_paths=[r"^/v1/pools/[^/]+/heartbeat$", r"^/v1/heartbeats",
                                                   r"^/v1/events", r"^/console"])

    async def refresh_gauges(state: State) -> None:
        set_gauges(await state.capacity.get())

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        nc, redis, js = await open_connections(settings, subjects, "registry")
        base = load_records(settings.topology_file) if settings.topology_file else default_records()
        bucket = subjects.bucket("regions")
        regions = RegionBook(js, await ensure_bucket(js, bucket), bucket)
        await regions.open(base)
        registry = Registry(
            redis=redis, keys=keys, store=PoolStore(redis, keys),
            records=PoolRecords(await ensure_bucket(js, subjects.bucket("pools"))),
            events=CapacityEvents(js, subjects), catalogue=load_catalogue(), regions=regions,
            heartbeat_ttl_s=settings.heartbeat_ttl_s,
        )
        app.state.registry = registry
        app.state.update(js=js, events_idle_s=settings.events_keepalive_s, capacity=SummaryCache(registry.store, keys))
        await guard_requests(app.state, nc, redis, settings, subjects, keys)
        await registry.rebuild_if_lost()
        await serve_rpc(nc, subjects, registry)
        async def sweep() -> None:
            await registry.rebuild_if_lost()
            await registry.sweep()

        sweeper = asyncio.create_task(forever("liveness sweep", sweep, interval=settings.sweep_interval_s,
                                              logger=log))
        relax_gc()  # pool records, views and caches are long-lived (lifecycle.relax_gc)
        try:
            yield
        finally:
            await stop_tasks([sweeper])
            await close_connections(nc, redis)

    return service_app(
        "registry", "Provider-facing API: pools, heartbeats, catalogue, topology.",
        settings=settings, metrics=metrics,
        route_handlers=[*ops_routes("registry", refresh_gauges), PoolController, HeartbeatController,
                        CatalogueController, KeyController, capacity, reliability, events,
                        console_router(settings)],
        lifespan=lifespan,
    )
