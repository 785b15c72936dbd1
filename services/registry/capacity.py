"""Capacity at a glance: units by region × accelerator model (capacity, leased, free),
summed from the live pool state inside Redis (``lua/capacity.lua``). Feeds the ops
console (``GET /v1/capacity``) and the registry's gauges, computed when Prometheus
scrapes.

Pools that share devices (docs/sharing.md) keep free milli per device
(``Keys.pool_devices``). Their ``free`` counts whole devices only; what is left over on
devices partly taken is *fragmented* free: usable by shares, never by a whole-device ask.
``capacity_shares.lua`` reads it from the per-device hashes, next to the sums above, so the
console can show whole vs fragmented free per region × model and per pool.

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
    free: int = 0  # whole devices free (on sharing pools too: devices with all 1000 milli free)
    shared_pools: int = 0  # pools that share devices
    fragmented_devices: int = 0  # devices partly taken by shares, with some milli still free
    fragmented_milli: int = 0  # the milli free on those: for shares only
    largest_slice: int = 0  # the largest free milli on one partly taken device


class Totals(msgspec.Struct, kw_only=True):
    pools: int = 0
    online: int = 0
    capacity: int = 0
    leased: int = 0
    free: int = 0
    utilisation: float = 0.0  # leased / capacity of all registered pools
    shared_pools: int = 0
    fragmented_devices: int = 0
    fragmented_milli: int = 0
    largest_slice: int = 0


class SharedPool(msgspec.Struct, kw_only=True):
    """Free capacity of one pool that shares devices: whole vs fragmented."""

    pool_id: str
    region: str
    model: str
    status: str
    devices: int  # devices in its per-device state
    whole_free: int  # devices with all 1000 milli free
    fragmented_devices: int
    fragmented_milli: int
    largest_slice: int


SHARED_LISTED = 100  # sharing pools listed, most fragmented first (the totals count them all)


class CapacitySummary(msgspec.Struct, kw_only=True):
    cells: list[Cell]
    totals: Totals
    queue_depth: int
    shared: list[SharedPool] = []  # the most fragmented sharing pools (at most SHARED_LISTED)


def totals_of(cells: list[Cell]) -> Totals:
    totals = Totals(pools=sum(c.pools for c in cells), online=sum(c.online for c in cells),
                    capacity=sum(c.capacity for c in cells), leased=sum(c.leased for c in cells),
                    free=sum(c.free for c in cells), shared_pools=sum(c.shared_pools for c in cells),
                    fragmented_devices=sum(c.fragmented_devices for c in cells),
                    fragmented_milli=sum(c.fragmented_milli for c in cells),
                    largest_slice=max((c.largest_slice for c in cells), default=0))
    totals.utilisation = round(totals.leased / totals.capacity, 6) if totals.capacity else 0.0
    return totals


CHUNK = 5000  # pools per script call: Redis is never blocked for long


def _script(store: PoolStore, package: str = "services.registry.lua", name: str = "capacity.lua"):  # noqa: ANN202
    """A redis-py Script, registered once per store."""
    attr = f"_script_{name}"
    script = getattr(store, attr, None)
    if script is None:
        script = store.redis.register_script(resources.files(package).joinpath(name).read_text())
        setattr(store, attr, script)
    return script


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def read_summary(store: PoolStore, keys: Keys) -> CapacitySummary:
    """Per region, a script sums the pools by model (the keys are passed in, all in the
    region's hash slot, so it runs unchanged on Redis Cluster)."""
    script = _script(store)
    shares = _script(store, "services.registry", "capacity_shares.lua")
    cells: dict[tuple[str, str], Cell] = {}
    shared: list[SharedPool] = []
    for region in await store.regions():
        ids = await store.pool_ids(region)
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            pool_keys = [keys.pool(region, pool_id) for pool_id in chunk]
            for raw in await script(keys=pool_keys, args=[]):
                model = _text(raw[0])
                c = cells.setdefault((region, model), Cell(region=region, model=model))
                c.pools += int(raw[1])
                c.online += int(raw[2])
                c.capacity += int(raw[3])
                c.leased += int(raw[4])
                c.free += int(raw[5])
            dev_keys = [keys.pool_devices(region, pool_id) for pool_id in chunk]
            for raw in await shares(keys=pool_keys + dev_keys, args=[]):
                index, model, status, devices, whole, frag, milli, largest = raw
                pool = SharedPool(pool_id=chunk[int(index) - 1], region=region, model=_text(model),
                                  status=_text(status), devices=int(devices), whole_free=int(whole),
                                  fragmented_devices=int(frag), fragmented_milli=int(milli), largest_slice=int(largest))
                shared.append(pool)
                c = cells.get((region, pool.model))
                if c is None:  # the pool hash went between the two reads: counted next time
                    continue
                c.shared_pools += 1
                c.fragmented_devices += pool.fragmented_devices
                c.fragmented_milli += pool.fragmented_milli
                c.largest_slice = max(c.largest_slice, pool.largest_slice)
    out = sorted(cells.values(), key=lambda c: (c.region, c.model))
    shared.sort(key=lambda p: (-p.fragmented_milli, p.region, p.pool_id))
    return CapacitySummary(cells=out, totals=totals_of(out), queue_depth=int(await store.redis.zcard(keys.queue())),
                           shared=shared[:SHARED_LISTED])


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
FRAGMENTED = Gauge("cb_capacity_fragmented_milli", "Free milli on devices partly taken by shares (usable by shares "
                   "only), by region and model", ["region", "model"])
POOLS = Gauge("cb_pools", "Registered pools by region and model, and how many are online",
              ["region", "model", "state"])


def set_gauges(summary: CapacitySummary) -> None:
    """Replace the label sets wholesale: a region or model that vanished leaves no stale series."""
    for g in (UNITS, UTILISATION, POOLS, FRAGMENTED):
        g.clear()
    for c in summary.cells:
        for state, value in (("free", c.free), ("leased", c.leased), ("capacity", c.capacity)):
            UNITS.labels(c.region, c.model, state).set(value)
        UTILISATION.labels(c.region, c.model).set(c.leased / c.capacity if c.capacity else 0.0)
        POOLS.labels(c.region, c.model, "registered").set(c.pools)
        POOLS.labels(c.region, c.model, "online").set(c.online)
        if c.shared_pools:
            FRAGMENTED.labels(c.region, c.model).set(c.fragmented_milli)
    UTILISATION_TOTAL.set(summary.totals.utilisation)
