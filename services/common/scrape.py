"""``/metrics`` with gauges computed when Prometheus scrapes.

Live state (units by region × model, queue depth, consumer lag) lives in Redis and
JetStream, not in process memory, so a replica reads it at scrape time: every replica
reports the same deployment-wide value, and nothing has to keep gauges up to date
between scrapes. A refresh that fails leaves the last values and is counted, so the
scrape itself still answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from litestar import get
from litestar.datastructures import State
from litestar.plugins.prometheus import PrometheusController
from litestar.response import Response
from prometheus_client import Counter

log = logging.getLogger(__name__)
REFRESH_FAILURES = Counter("cb_metrics_refresh_failures", "Scrape-time gauge refreshes that failed")
REFRESH_TIMEOUT_S = 5.0
Refresh = Callable[[State], Awaitable[None]]


def metrics_controller(refresh: Refresh) -> type[PrometheusController]:
    class ScrapeController(PrometheusController):
        @get(include_in_schema=False)
        async def get(self, state: State) -> Response:  # type: ignore[override]
            try:
                await asyncio.wait_for(refresh(state), REFRESH_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - a broken gauge must not break the scrape
                REFRESH_FAILURES.inc()
                log.warning("metrics refresh failed", exc_info=True)
            return await PrometheusController.get.fn(self)  # type: ignore[attr-defined]

    return ScrapeController
