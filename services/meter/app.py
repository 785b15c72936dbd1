"""The meter service: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime

from litestar import Litestar
from litestar.datastructures import State
from litestar.config.cors import CORSConfig

from services.common.clock import utcnow
from services.common.http import ops_routes, prometheus, service_app
from services.common.jetstream import Publisher
from services.common.lifecycle import forever, relax_gc, stop_tasks
from services.common.keys import Keys
from services.common.nats_conn import ensure_bucket
from services.common.settings import Settings, settings_from_env
from services.common.startup import close_connections, guard_requests, open_connections
from services.common.subjects import MeterNames, Subjects

from .api import BudgetController, InvoiceController, OpsController, StatementController, UsageController
from .budgets import Budgets
from .metrics import refresh as refresh_gauges
from .consumer import AccountStore, AllocConsumer
from .reliability import ReliabilityFeed, ReliabilityRecord
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

    def ledger_ready(state: State) -> bool:
        meter: Meter | None = getattr(state, "meter", None)
        return bool(meter and meter.ledger.ready.is_set())

    async def ledger_loaded(state: State) -> str | None:
        return None if ledger_ready(state) else "ledger: still loading"

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        nc, redis, js = await open_connections(settings, subjects, "meter")
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
        await ensure_bucket(js, subjects.bucket("keys"))
        directory = TenantDirectory(js, subjects.bucket("keys"))
        meter = Meter(js=js, names=names, subjects=subjects, settings=settings, ledger=ledger, consumer=consumer,
                      budgets=budgets, invoices_kv=invoices_kv, directory=directory, clock=clock)
        ledger.on_entries = budgets.mark
        ledger.on_closed = meter.on_closed
        await ledger.start()
        await directory.start()
        await budgets.start()
        await consumer.start()
        reliability = ReliabilityFeed(nc, js, subjects, ReliabilityRecord(redis, keys))
        await reliability.start()  # the pools' and providers' delivery record the broker ranks with
        relax_gc()  # the account cache and the aggregate are long-lived
        app.state.meter = meter
        await guard_requests(app.state, nc, redis, settings, subjects, keys)
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
            await reliability.stop()
            await budgets.stop()
            await directory.stop()
            await ledger.stop()
            await publisher.stop()
            await close_connections(nc, redis)

    return service_app(
        "meter", "Usage, invoices, provider statements, budgets.", settings=settings, metrics=metrics,
        route_handlers=[*ops_routes("meter", refresh, [ledger_loaded], ledger_ready=ledger_ready), UsageController,
                        InvoiceController, StatementController, BudgetController, OpsController],
        lifespan=lifespan,
        # the ops console (served by the registry, another origin) reads spend here; keys are bearer
        # tokens, never cookies, so allowing any origin lends a page nothing it does not already hold
        cors_config=CORSConfig(allow_origins=["*"], allow_methods=["GET"], allow_headers=["Authorization"]),
    )
