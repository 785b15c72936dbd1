"""Run a service as a real process (uvicorn, real HTTP) for tests and benchmarks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from services.cli.servers import free_port
from services.cli.supervisor import ServiceProcess
from services.common.settings import Settings, settings_to_env


@contextlib.contextmanager
def service_process(name: str, settings: Settings, log_dir: Path) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(name, free_port(), settings_to_env(settings), log_dir / f"{name}.log")
    svc.start()
    try:
        svc.wait_healthy()
        yield svc
    finally:
        svc.stop()


@contextlib.contextmanager
def module_settings(nats_url: str, redis_url: str, **over: object) -> Iterator[Settings]:
    """Settings with a prefix of their own and its streams, for services a whole module
    shares (started once, not per test); the streams are dropped afterwards."""
    import asyncio
    import uuid

    from services.common.nats_conn import connect, ensure_streams
    from services.common.subjects import Subjects

    from .helpers import drop_streams

    settings = Settings(nats_url=nats_url, redis_url=redis_url, prefix=f"t{uuid.uuid4().hex[:12]}",
                        admin_key="admin-" + uuid.uuid4().hex, **over)

    async def streams() -> None:
        nc = await connect(nats_url, "test-module")
        await ensure_streams(nc.jetstream(), Subjects(settings.prefix))
        await nc.drain()

    asyncio.run(streams())
    try:
        yield settings
    finally:
        asyncio.run(drop_streams(nats_url, settings.prefix))
