"""The meter service: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from litestar import Litestar, get
from litestar.datastructures import State
from litestar.config.cors import CORSConfig

from services.common.auth import KeyLookup
from services.common.clock import utcnow
from services.common.http import prometheus, service_app
from services.common.jetstream import Publisher
from services.common.lifecycle import forever, relax_gc, stop_tasks
from services.common.ready import ready_route
from services.common.scrape import metrics_controller as scrape_controller
from services.common.ratelimit import RateLimiter
from services.common.keys import Keys
from services.common.nats_conn import close_quietly, connect, ensure_bucket, ensure_streams
from services.common.redis_conn import connect as redis_connect
from services.common.settings import Settings, settings_from_env
from services.common.subjects import MeterNames, Subjects

from .api import BudgetController, InvoiceController, OpsController, StatementController, UsageController
from .budgets import Budgets
from .metrics import refresh as refresh_gauges
from .consumer import AccountStore, AllocConsumer
from .ledger import Ledger, ensure_ledger
from .service import Meter, TenantDirectory

log = logging.getLogger("meter")


def create_app(settings: Settings | None = None, clock: Callable[[], datetime] | None = None) -> Litestar:
    settings = settings or settings_from_env()
    clock = clock or utcnow
    subjects, keys = Subjects(settings.prefix), Keys(settings.prefix)
    names = MeterNames.of(settings)
    metrics, _ = prometheus("meter")

    async def refresh(state: State) -> None:
        await refresh_gauges(state.meter)

    async def ledger_loaded(state: State) -> str | None:
        meter: Meter | None = getattr(state, "meter", None)
        return None if meter and meter.ledger.ready.is_set() else "ledger: still loading"

    @get("/health", tags=["ops"], summary="The process is alive", opt={"exclude_from_auth": True})
    async def health(state: State) -> dict[str, object]:
        meter: Meter | None = getattr(state, "meter", None)
        ready = bool(meter and meter.ledger.ready.is_set())
        return {"status": "ok", "service": "meter", "pid": os.getpid(), "ledger_ready": ready}

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        nc = await connect(settings.nats_url, "meter")
        redis = redis_connect(settings.redis_url, settings.redis_max_connections, settings.redis_cluster)
        js = nc.jetstream()
        await ensure_streams(js, subjects, settings.stream_replicas)
        await ensure_ledger(js, names, settings, settings.stream_replicas)
        accounts_kv = await ensure_bucket(js, names.accounts, settings.stream_replicas, direct=True)
        invoices_kv = await ensure_bucket(js, names.invoices, settings.stream_replicas, direct=True)
        budgets_kv = await ensure_bucket(js, names.budgets, settings.stream_replicas, direct=True)
        publisher = Publisher(nc)
        await publisher.start()
        ledger = Ledger(nc, js, names, publisher)
        consumer = AllocConsumer(nc, js, names, subjects, settings, ledger,
                                 AccountStore(publisher, accounts_kv, names.accounts), clock)
        budgets = Budgets(js, budgets_kv, ledger.aggregate, subjects, settings.min_bill_s, clock)
        directory = TenantDirectory(await ensure_bucket(js, subjects.bucket("keys")))
        meter = Meter(js=js, names=names, subjects=subjects, settings=settings, ledger=ledger, consumer=consumer,
                      budgets=budgets, invoices_kv=invoices_kv, directory=directory, clock=clock)
        ledger.on_entries = budgets.mark
        ledger.on_closed = meter.on_closed
        await ledger.start()
        await directory.start()
        await budgets.start()
        await consumer.start()
        relax_gc()  # the account cache and the aggregate are long-lived
        app.state.meter = meter
        app.state.update(nc=nc, redis=redis, subjects=subjects)
        app.state.key_lookup = await KeyLookup.open(nc, redis, keys, subjects.bucket("keys"), settings.admin_key,
                                                    subjects.key_revoked())
        app.state.rate_limiter = RateLimiter(redis, keys, settings.rate_limit_requests,
                                              settings.rate_limit_window_s)
        stopping = asyncio.Event()
        tasks = [
            asyncio.create_task(forever("finalize", meter.finalize_due, interval=settings.finalize_interval_s,
                                        until=stopping.is_set, logger=log)),
            asyncio.create_task(forever("budgets", budgets.evaluate_all, interval=settings.budget_interval_s,
                                        kick=budgets.kick, until=stopping.is_set, logger=log)),
        ]
        try:
            yield
        finally:
            stopping.set()
            await stop_tasks(tasks)
            await consumer.stop()
            await budgets.stop()
            await directory.stop()
            await ledger.stop()
            await publisher.stop()
            await close_quietly(nc)
            await redis.aclose()

    return service_app(
        "meter", "Usage, invoices, provider statements, budgets.",
        max_body_bytes=settings.max_body_bytes, metrics=metrics,
        max_in_flight=settings.max_in_flight,
        route_handlers=[health, ready_route("meter", [ledger_loaded]), scrape_controller(refresh), UsageController,
                        InvoiceController, StatementController, BudgetController, OpsController],
        lifespan=lifespan,
        # the ops console (served by the registry, another origin) reads spend here; keys are bearer
        # tokens, never cookies, so allowing any origin lends a page nothing it does not already hold
        cors_config=CORSConfig(allow_origins=["*"], allow_methods=["GET"], allow_headers=["Authorization"]),
    )
