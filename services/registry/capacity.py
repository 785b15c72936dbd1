"""Capacity at a glance: units by region × accelerator model (capacity, leased, free),
summed from the live pool state inside Redis (``lua/capacity.lua``). Feeds the ops
console (``GET /v1/capacity``) and the registry's gauges, computed when Prometheus
scrapes.

The queue depth is read here too (one ``ZCARD`` of the broker's queue key, built by the
shared key builders): the console wants one round trip for "what is there and what
waits for it".
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources

import msgspec
from prometheus_client import Gauge

from services.common.keys import Keys

from .store import PoolStore


class Cell(msgspec.Struct, kw_only=True):
    region: str
    model: str
    pools: int = 0
    online: int = 0  # pools online (offline and draining pools offer nothing)
    capacity: int = 0
    leased: int = 0
    free: int = 0


class Totals(msgspec.Struct, kw_only=True):
    pools: int = 0
    online: int = 0
    capacity: int = 0
    leased: int = 0
    free: int = 0
    utilisation: float = 0.0  # leased / capacity of all registered pools


class CapacitySummary(msgspec.Struct, kw_only=True):
    cells: list[Cell]
    totals: Totals
    queue_depth: int


def totals_of(cells: list[Cell]) -> Totals:
    totals = Totals(pools=sum(c.pools for c in cells), online=sum(c.online for c in cells),
                    capacity=sum(c.capacity for c in cells), leased=sum(c.leased for c in cells),
                    free=sum(c.free for c in cells))
    totals.utilisation = round(totals.leased / totals.capacity, 6) if totals.capacity else 0.0
    return totals


CHUNK = 5000  # pools per script call: Redis is never blocked for long


def _script(store: PoolStore):  # noqa: ANN202 - a redis-py Script
    script = getattr(store, "_capacity_script", None)
    if script is None:
        script = store.redis.register_script(
            resources.files("services.registry.lua").joinpath("capacity.lua").read_text())
        store._capacity_script = script  # type: ignore[attr-defined]
    return script


async def read_summary(store: PoolStore, keys: Keys) -> CapacitySummary:
    """Per region, a script sums the pools by model (the keys are passed in, all in the
    region's hash slot, so it runs unchanged on Redis Cluster)."""
    script = _script(store)
    cells: dict[tuple[str, str], Cell] = {}
    for region in await store.regions():
        ids = await store.pool_ids(region)
        for start in range(0, len(ids), CHUNK):
            pool_keys = [keys.pool(region, pool_id) for pool_id in ids[start:start + CHUNK]]
            for raw in await script(keys=pool_keys, args=[]):
                model = raw[0].decode() if isinstance(raw[0], bytes) else raw[0]
                c = cells.setdefault((region, model), Cell(region=region, model=model))
                c.pools += int(raw[1])
                c.online += int(raw[2])
                c.capacity += int(raw[3])
                c.leased += int(raw[4])
                c.free += int(raw[5])
    out = sorted(cells.values(), key=lambda c: (c.region, c.model))
    return CapacitySummary(cells=out, totals=totals_of(out), queue_depth=int(await store.redis.zcard(keys.queue())))


class SummaryCache:
    """Callers that ask at the same time share one read of every pool (consoles re-read
    after each burst of events, Prometheus scrapes): a read that *started after* a
    caller asked reflects everything that happened before it asked, so the caller may
    take it — nobody gets a summary older than its own question."""

    def __init__(self, store: PoolStore, keys: Keys) -> None:
        self.store, self.keys = store, keys
        self._started = float("-inf")
        self._value: CapacitySummary | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> CapacitySummary:
        asked = time.monotonic()
        async with self._lock:
            if self._value is None or self._started < asked:
                self._started = time.monotonic()
                self._value = await read_summary(self.store, self.keys)
            return self._value


# --- gauges (set on scrape) -----------------------------------------------------------------
UNITS = Gauge("cb_capacity_units", "Accelerator units by region, model and state (free, leased, capacity)",
              ["region", "model", "state"])
UTILISATION = Gauge("cb_capacity_utilisation", "Leased / capacity, by region and model", ["region", "model"])
UTILISATION_TOTAL = Gauge("cb_capacity_utilisation_total", "Leased / capacity over every registered pool")
POOLS = Gauge("cb_pools", "Registered pools by region and model, and how many are online",
              ["region", "model", "state"])


def set_gauges(summary: CapacitySummary) -> None:
    """Replace the label sets wholesale: a region or model that vanished leaves no stale series."""
    for g in (UNITS, UTILISATION, POOLS):
        g.clear()
    for c in summary.cells:
        for state, value in (("free", c.free), ("leased", c.leased), ("capacity", c.capacity)):
            UNITS.labels(c.region, c.model, state).set(value)
        UTILISATION.labels(c.region, c.model).set(c.leased / c.capacity if c.capacity else 0.0)
        POOLS.labels(c.region, c.model, "registered").set(c.pools)
        POOLS.labels(c.region, c.model, "online").set(c.online)
    UTILISATION_TOTAL.set(summary.totals.utilisation)
