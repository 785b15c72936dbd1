"""The registry service: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from litestar import Litestar, get
from litestar.datastructures import State
from litestar.di import Provide

from services.common.auth import KeyLookup
from services.common.http import prometheus, service_app
from services.common.ratelimit import RateLimiter
from services.common.keys import Keys
from services.common.lifecycle import forever, relax_gc, stop_tasks
from services.common.ready import ready_route
from services.common.scrape import metrics_controller as scrape_controller
from services.common.nats_conn import close_quietly, connect, ensure_bucket, ensure_streams
from services.common.redis_conn import connect as redis_connect
from services.common.settings import Settings, settings_from_env
from services.common.subjects import Subjects

from .api.capacity import capacity
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


def _registry(state: State) -> Registry:
    return state.registry


@get("/health", tags=["ops"], summary="The process is alive")
async def health() -> dict[str, object]:
    return {"status": "ok", "service": "registry", "pid": os.getpid()}


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or settings_from_env()
    subjects, keys = Subjects(settings.prefix), Keys(settings.prefix)
    metrics, _ = prometheus("registry", hot_paths=[r"^/v1/pools/[^/]+/heartbeat$", r"^/v1/heartbeats",
                                                   r"^/v1/events", r"^/console"])

    async def refresh_gauges(state: State) -> None:
        set_gauges(await state.capacity.get())

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        nc = await connect(settings.nats_url, "registry")
        redis = redis_connect(settings.redis_url, settings.redis_max_connections, settings.redis_cluster)
        js = nc.jetstream()
        await ensure_streams(js, subjects, settings.stream_replicas)
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
        app.state.update(nc=nc, redis=redis, js=js, subjects=subjects, events_idle_s=5.0,
                         capacity=SummaryCache(registry.store, keys))
        app.state.key_lookup = await KeyLookup.open(nc, redis, keys, subjects.bucket("keys"), settings.admin_key,
                                                    subjects.key_revoked())
        app.state.rate_limiter = RateLimiter(redis, keys, settings.rate_limit_requests,
                                              settings.rate_limit_window_s)
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
            await close_quietly(nc)
            await redis.aclose()

    return service_app(
        "registry", "Provider-facing API: pools, heartbeats, catalogue, topology.",
        max_body_bytes=settings.max_body_bytes, metrics=metrics,
        max_in_flight=settings.max_in_flight,
        route_handlers=[health, ready_route("registry"), scrape_controller(refresh_gauges), PoolController,
                        HeartbeatController, CatalogueController, KeyController, capacity, events,
                        console_router(settings)],
        lifespan=lifespan,
        dependencies={
            "registry": Provide(_registry, sync_to_thread=False),
        },
    )
