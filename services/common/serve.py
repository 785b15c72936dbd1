"""Run one service under uvicorn, configured from the environment."""

from __future__ import annotations

import logging.config
import os

import uvicorn

from .http_protocol import TimedHttpToolsProtocol
from .logs import log_config
from .settings import settings_from_env


def serve(service: str, factory: str) -> None:
    settings = settings_from_env()
    config = log_config(service, settings.log_level)  # JSON lines (docs/security.md: logs and request ids)
    logging.config.dictConfig(config)
    logging.captureWarnings(True)  # warnings become JSON lines too, not raw stderr text
    port = int(os.environ.get("CB_PORT") or getattr(settings, f"{service}_port"))
    # no proxy-headers middleware: nothing reads the client address (keys, not addresses,
    # identify callers), and it costs every request a scope rewrite
    # header-read and body timeouts (uvicorn has none of its own): docs/overload.md
    uvicorn.run(factory, factory=True, host=settings.host, port=port, log_level=settings.log_level,
                access_log=False, log_config=config, lifespan="on", timeout_graceful_shutdown=5,
                workers=settings.workers, proxy_headers=False, http=TimedHttpToolsProtocol)
