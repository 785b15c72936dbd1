"""Capacity at a glance: units by region × accelerator model (capacity, leased, free),
read from the live pool state in Redis. Feeds the ops console (``GET /v1/capacity``)
and the registry's gauges, computed when Prometheus scrapes.

The queue depth is read here too (one ``ZCARD`` of the broker's queue key, built by the
shared key builders): the console wants one round trip for "what is there and what
waits for it".
"""

from __future__ import annotations

from collections.abc import Iterable

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


def summarise(rows: Iterable[dict[str, str]]) -> tuple[list[Cell], Totals]:
    """Pure: pool rows (the store's view fields) to cells and totals."""
    cells: dict[tuple[str, str], Cell] = {}
    for row in rows:
        cell = cells.setdefault((row["region"], row["model"]), Cell(region=row["region"], model=row["model"]))
        cell.pools += 1
        cell.online += row["status"] == "online"
        cell.capacity += int(row["capacity"])
        cell.leased += int(row["leased"])
        cell.free += int(row["free"])
    out = sorted(cells.values(), key=lambda c: (c.region, c.model))
    totals = Totals(pools=sum(c.pools for c in out), online=sum(c.online for c in out),
                    capacity=sum(c.capacity for c in out), leased=sum(c.leased for c in out),
                    free=sum(c.free for c in out))
    totals.utilisation = round(totals.leased / totals.capacity, 6) if totals.capacity else 0.0
    return out, totals


async def capacity_summary(store: PoolStore, keys: Keys) -> CapacitySummary:
    rows: list[dict[str, str]] = []
    for region in await store.regions():
        rows.extend(r for r in await store.views(region, await store.pool_ids(region)) if r is not None)
    cells, totals = summarise(rows)
    return CapacitySummary(cells=cells, totals=totals, queue_depth=int(await store.redis.zcard(keys.queue())))


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
