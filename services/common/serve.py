"""Run one service under uvicorn, configured from the environment."""

from __future__ import annotations

import logging
import os

import uvicorn

from .settings import settings_from_env


def serve(service: str, factory: str) -> None:
    settings = settings_from_env()
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
    port = int(os.environ.get("CB_PORT") or getattr(settings, f"{service}_port"))
    uvicorn.run(factory, factory=True, host=settings.host, port=port, log_level=settings.log_level,
                access_log=False, lifespan="on", timeout_graceful_shutdown=5, workers=settings.workers)
