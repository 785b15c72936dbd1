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
    with service_processes([(name, settings)], log_dir) as [svc]:
        yield svc


@contextlib.contextmanager
def service_processes(specs: list[tuple[str, Settings]], log_dir: Path) -> Iterator[list[ServiceProcess]]:
    """Several services started at once, then waited for: their start-ups (mostly imports)
    overlap instead of queueing. A broker that is up before its registry keeps asking."""
    procs: list[ServiceProcess] = []
    try:
        for i, (name, settings) in enumerate(specs):
            log = f"{name}.log" if [n for n, _ in specs].count(name) == 1 else f"{name}-{i}.log"
            procs.append(ServiceProcess(name, free_port(), settings_to_env(settings), log_dir / log))
            procs[-1].start()
        for svc in procs:
            svc.wait_healthy()
        yield procs
    finally:
        for svc in reversed(procs):
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
