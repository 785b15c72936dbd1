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
