"""The broker's view of the world, fed into its matching engine.

* catalogue: asked of the registry over NATS request/reply;
* topology: the registry's ``regions`` bucket (one key per region and per published
  link), read at start and then followed key by key with one consumer; links nobody
  published are derived from the regions' coordinates here (``services.common.network``);
* pools: the registry's durable record (its key-value bucket) at start, then capacity
  events (registered, updated, online, offline, draining, removed);
* free units: Redis at start, then each reservation's own result and the ``free_after``
  that every allocation event carries, so every replica follows every other's leases;
* free milli per device of sharing pools (docs/sharing.md): all 1000 when a pool is first
  seen, the per-device hash in Redis when it is (re)read (start, registration, online),
  then each allocation event's ``devices_free_after`` (absolute values: idempotent);
* pool scores: the reliability record in Redis, re-read every few seconds when its
  version moved (``refresh_reliability``); the engine ranks with the copy.

The view may lag by an event; the reservation script is the authority (it re-checks
free units atomically), so a stale view costs a retry, never an overbooking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Iterable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import InvalidKeyError, KeyNotFoundError
from redis.asyncio import Redis

from services.common.jetstream import bucket_entries, follow_bucket
from services.common.keys import Keys
from services.common.messages import (
    Accelerator,
    AllocEvent,
    CapacityEvent,
    Pool,
    PoolDraining,
    PoolOffline,
    PoolOnline,
    PoolRegistered,
    PoolRemoved,
    PoolUpdated,
)
from services.common import tracing
from services.common.nats_conn import ensure_bucket
from services.common.reliability import read_scores
from services.common.network import Network
from services.common.subjects import ALLOC, CAPACITY, Subjects, region_key

from .matching.engine import Engine
from .matching.model import Allocation, PoolState

log = logging.getLogger("broker.world")
# what ``hold``/``settle`` take: (pool, units), (pool, units, milli, device indices), or
# the engine's allocations themselves
Held = tuple[str, int] | tuple[str, int, int, tuple[int, ...]] | Allocation


def _held(a: Held) -> tuple:
    return (a.pool_id, a.units, a.milli, a.devices) if isinstance(a, Allocation) else a


def _is_share(a: tuple) -> bool:
    return len(a) > 2 and a[2] < 1000 and bool(a[3])

_pool = msgspec.json.Decoder(Pool)
_capacity = msgspec.json.Decoder(CapacityEvent)
_alloc = msgspec.json.Decoder(AllocEvent)


def pool_state(pool: Pool, country: str, free: int) -> PoolState:
    """The engine's view of a pool. Strings that repeat across pools are interned (100k
    pools share a few dozen regions, models and vendors)."""
    a, s = pool.accelerator, pool.spec
    i = sys.intern
    return PoolState(
        pool_id=pool.pool_id, provider=i(pool.provider), region=i(s.region), country=i(country), zone=i(s.zone),
        model=i(s.model), vendor=i(a.vendor), stack=i(a.stack), frameworks=tuple(map(i, a.frameworks)),
        memory_gib=a.memory_gib, interconnect=i(s.interconnect or a.interconnect), host_arch=i(s.host_arch),
        bf16_tflops=a.bf16_tflops,
        fp16_tflops=a.fp16_tflops, fp8_tflops=a.fp8_tflops, units_per_node=s.units_per_node, capacity=s.units,
        free=free, currency=s.prices.currency, on_demand=s.prices.on_demand, reserved_month=s.prices.reserved_month,
        reserved_year=s.prices.reserved_year, interruptible=s.prices.interruptible, egress_gbps=s.egress_gbps,
        listed=s.availability == "listed", delivery=frozenset(map(i, s.delivery)),
        provision_timeout_s=s.provision_timeout_s, sharing=s.sharing.mode, min_milli=s.sharing.min_milli,
        max_milli=s.sharing.max_milli,
    )


class World:
    def __init__(self, nc: NATS, js: JetStreamContext, redis: Redis, keys: Keys, subjects: Subjects) -> None:
        self.nc, self.js, self.redis, self.keys, self.subjects = nc, js, redis, keys, subjects
        self.catalogue: dict[str, Accelerator] = {}
        self.topology = Network()  # followed from the regions bucket (follow_topology)
        self.countries = self.topology.countries  # region id -> country, kept by the network
        self._revisions: dict[str, int] = {}  # topology record key -> revision applied
        self.pools: dict[str, PoolState] = {}  # every registered pool, online or not
        self.generations: dict[str, int] = {}  # pool -> the generation (registration) this view holds
        self.engine = Engine(self.topology)
        self.inflight: dict[str, int] = {}  # pool -> units this replica is reserving right now
        self.inflight_milli: dict[tuple[str, int], int] = {}  # (pool, device) -> milli of shares being reserved
        self._scores_version: tuple | None = None  # (version, since) of the reliability record the engine holds

    # --- free units: Redis is the truth; units being reserved here are held back ------------
    def observe_free(self, pool_id: str, free: int) -> None:
        """Redis said ``free``; the engine sees that less what this replica's in-flight
        reservations are about to take, so concurrent requests do not pile onto the
        same units."""
        self.engine.set_free(pool_id, max(0, free - self.inflight.get(pool_id, 0)))

    def observe_devices(self, pool_id: str, free: dict[int, int]) -> None:
        """Redis said these devices of a sharing pool have ``free`` milli; the engine sees
        that less the shares this replica is reserving on them."""
        held = self.inflight_milli
        self.engine.set_devices(pool_id, {d: max(0, f - held.get((pool_id, d), 0)) for d, f in free.items()}
                                if held else free)

    def hold(self, allocations: Iterable[Held]) -> bool:
        """Hold units for a reservation about to be tried; False (and nothing held) if a
        concurrent request took them since the match. An allocation is (pool, units), or
        (pool, units, milli, devices): a share (milli < 1000) holds its milli on its hinted
        device instead of a unit (the script may still pick another device)."""
        allocations = [_held(a) for a in allocations]
        whole = [(a[0], a[1]) for a in allocations if not _is_share(a)]
        shares = [a for a in allocations if _is_share(a)]
        states = [(self.engine.get(pool_id), units) for pool_id, units in whole]
        if any(state is None or state.free < units for state, units in states):
            return False
        if any(self.engine.device_free(a[0], a[3][0]) < a[2] for a in shares):  # type: ignore[misc]
            return False
        for (pool_id, units), (state, _) in zip(whole, states, strict=True):
            self.inflight[pool_id] = self.inflight.get(pool_id, 0) + units
            self.engine.set_free(pool_id, state.free - units)  # type: ignore[union-attr]
        for pool_id, _, milli, devices in shares:  # type: ignore[misc]
            key = (pool_id, devices[0])
            self.inflight_milli[key] = self.inflight_milli.get(key, 0) + milli
            self.engine.set_devices(pool_id, {devices[0]: self.engine.device_free(pool_id, devices[0]) - milli})
        return True

    def settle(self, allocations: Iterable[Held], truth: dict[str, int],
               devices: dict[str, dict[int, int]] | None = None) -> None:
        """The reservation is over: take what Redis said for the pools it touched (free
        units in ``truth``; free milli per device in ``devices``), give the held units and
        milli back to the others."""
        for a in map(_held, allocations):
            if _is_share(a):
                pool_id, _, milli, hint = a  # type: ignore[misc]
                key = (pool_id, hint[0])
                left = self.inflight_milli.get(key, 0) - milli
                if left > 0:
                    self.inflight_milli[key] = left
                else:
                    self.inflight_milli.pop(key, None)
                # the hold is given back first: the script may have taken another device than
                # the hint (or none), and Redis's numbers below say what it did take
                self.engine.set_devices(pool_id, {hint[0]: min(1000, self.engine.device_free(pool_id, hint[0])
                                                               + milli)})
                if devices and pool_id in devices:
                    self.observe_devices(pool_id, devices[pool_id])
                if pool_id in truth:
                    self.observe_free(pool_id, truth[pool_id])
                continue
            pool_id, units = a[0], a[1]
            left = self.inflight.get(pool_id, 0) - units
            if left > 0:
                self.inflight[pool_id] = left
            else:
                self.inflight.pop(pool_id, None)
            if pool_id in truth:
                self.observe_free(pool_id, truth[pool_id])
            elif (state := self.engine.get(pool_id)) is not None:
                self.engine.set_free(pool_id, state.free + units)
            if devices and pool_id in devices:
                self.observe_devices(pool_id, devices[pool_id])

    async def _rpc(self, verb: str, timeout: float = 30.0) -> bytes:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                return (await self.nc.request(self.subjects.rpc("registry", verb), b"", timeout=2)).data
            except Exception as exc:  # registry not up yet: ask again until the deadline
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"registry did not answer {verb}: {exc}") from exc
                await asyncio.sleep(0.2)

    async def follow_topology(self) -> None:
        """Read the regions bucket and keep following it; returns once caught up."""
        self._topology_kv = await ensure_bucket(self.js, self.subjects.bucket("regions"))
        await follow_bucket(self.js, self.subjects.bucket("regions"), self._topology_changed)

    def _topology_changed(self, key: str, value: bytes | None, revision: int) -> None:
        """A record of the bucket; an older revision than the one applied is ignored
        (a key read may answer after the follower brought a newer one)."""
        if revision <= self._revisions.get(key, 0):
            return
        self._revisions[key] = revision
        if self.topology.apply(key, value):
            self.engine.set_topology(self.topology)  # cached latency and transfer filters are stale

    async def _learn_region(self, region_id: str) -> None:
        """A pool names a region this replica has not seen yet (the registry wrote it just
        before): one key read, no consumer."""
        try:
            entry = await self._topology_kv.get(region_key(region_id))
        except (KeyNotFoundError, InvalidKeyError):
            return
        self._topology_changed(entry.key, entry.value, entry.revision or 0)

    async def load(self) -> None:
        self.catalogue = {a.model: a for a in msgspec.json.decode(await self._rpc("catalogue"),
                                                                  type=list[Accelerator])}
        await self.follow_topology()
        await self.resync()
        await self.refresh_reliability()

    async def refresh_reliability(self) -> None:
        """Hand the engine the pools' scores if any changed since the last refresh (the
        version is read first: a change while the scores are read is caught next time)."""
        version = tuple(await self.redis.mget(self.keys.reliability_version(), self.keys.reliability_since()))
        if version[0] is None or version == self._scores_version:  # (a rebuilt record counts its versions anew)
            return
        self.engine.set_reliability(await read_scores(self.redis, self.keys))
        self._scores_version = version

    def provider_pools(self, provider: str) -> list[str]:
        """Ids of the provider's registered pools, online or not."""
        return [pool_id for pool_id, state in self.pools.items() if state.provider == provider]

    async def resync(self) -> None:
        """Read every pool from the registry's record and its live numbers from Redis."""
        kv = await ensure_bucket(self.js, self.subjects.bucket("pools"))
        pools: dict[str, PoolState] = {}
        generations: dict[str, int] = {}
        async with contextlib.aclosing(bucket_entries(kv)) as entries:
            async for value, revision in entries:
                pool = _pool.decode(value)
                pools[pool.pool_id] = pool_state(pool, self.countries.get(pool.spec.region, ""), 0)
                generations[pool.pool_id] = pool.generation or revision  # 0: this entry's create
        live = await self._live(list(pools.values()))
        self.pools, self.generations = pools, generations
        for state, (status, free, devices) in zip(pools.values(), live, strict=True):
            self._apply(state, status, free, devices)
        for pool_id in [p for p in self._engine_ids() if p not in pools]:
            self.engine.remove(pool_id)

    def _engine_ids(self) -> list[str]:
        return [p for p in self.pools if self.engine.get(p) is not None]

    async def _live(self, states: list[PoolState]) -> list[tuple[str | None, int, dict[int, int]]]:
        """(status, free, free milli per device) of each pool; the devices only of sharing
        pools (an empty hash: none taken yet, or not written yet: all 1000)."""
        pipe = self.redis.pipeline(transaction=False)
        for state in states:
            pipe.hmget(self.keys.pool(state.region, state.pool_id), "status", "free")
            if state.sharing != "none":
                pipe.hgetall(self.keys.pool_devices(state.region, state.pool_id))
        replies = iter(await pipe.execute())
        out = []
        for state in states:
            status, free = next(replies)
            devices = _devices(next(replies)) if state.sharing != "none" else {}
            out.append((status.decode() if isinstance(status, bytes) else status, int(free or 0), devices))
        return out

    def _apply(self, state: PoolState, status: str | None, free: int, devices: dict[int, int]) -> None:
        if status == "online":
            if state.region not in self.countries:
                log.warning("pool %s is in region %s, unknown to this broker's topology", state.pool_id,
                            state.region)
            state.free = max(0, free - self.inflight.get(state.pool_id, 0))
            self.engine.upsert(state)  # the engine keeps its own copy
            if devices:
                self.observe_devices(state.pool_id, devices)
        else:
            self.engine.remove(state.pool_id)

    async def start(self) -> None:
        await self.nc.subscribe(self.subjects.events(CAPACITY), cb=self._on_capacity)
        await self.nc.subscribe(self.subjects.events(ALLOC), cb=self._on_alloc)

    async def _on_capacity(self, msg: Msg) -> None:
        with tracing.bound(tracing.from_headers(msg.headers)):  # logs name the request that caused it
            await self._capacity(msg)

    async def _capacity(self, msg: Msg) -> None:
        try:
            event = _capacity.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("undecodable capacity event on %s", msg.subject)
            return
        log.debug("capacity event %s for pool %s", type(event).__name__, event.pool_id,
                  extra={"subject": msg.subject})
        if self._stale(event):
            log.debug("capacity event %s of an older generation of pool %s ignored", type(event).__name__,
                      event.pool_id)
        elif isinstance(event, (PoolRegistered, PoolUpdated)):
            self.generations[event.pool_id] = event.pool.generation
            if event.region not in self.countries:
                await self._learn_region(event.region)
            state = pool_state(event.pool, self.countries.get(event.region, ""), 0)
            self.pools[event.pool_id] = state
            [(status, free, devices)] = await self._live([state])
            self._apply(state, status, free, devices)
        elif isinstance(event, PoolOnline) and event.pool_id in self.pools:
            state = self.pools[event.pool_id]
            devices = (await self._live([state]))[0][2] if state.sharing != "none" else {}
            self._apply(state, "online", event.free, devices)
        elif isinstance(event, (PoolOffline, PoolDraining)):
            self.engine.remove(event.pool_id)
        elif isinstance(event, PoolRemoved):
            self.engine.remove(event.pool_id)
            self.pools.pop(event.pool_id, None)
            self.generations.pop(event.pool_id, None)
        await self.on_capacity(event)

    def _stale(self, event: CapacityEvent) -> bool:
        """An event about an older generation than the one this view holds (events of
        different registry replicas may arrive out of order): it says nothing about now."""
        held = self.generations.get(event.pool_id, 0)
        if isinstance(event, (PoolRegistered, PoolUpdated)):
            return 0 < event.pool.generation < held
        if isinstance(event, (PoolOffline, PoolRemoved)):
            return 0 < event.generation < held
        return False

    async def on_capacity(self, event: CapacityEvent) -> None:
        """Hook for the broker: capacity appeared or vanished."""

    async def _on_alloc(self, msg: Msg) -> None:
        with tracing.bound(tracing.from_headers(msg.headers)):
            await self._alloc(msg)

    async def _alloc(self, msg: Msg) -> None:
        try:
            event = _alloc.decode(msg.data)
        except msgspec.DecodeError:
            return
        if event.free_after >= 0:
            self.observe_free(event.lease.pool_id, event.free_after)
        lease = event.lease
        if event.devices_free_after and len(event.devices_free_after) == len(lease.devices):
            self.observe_devices(lease.pool_id, dict(zip(lease.devices, event.devices_free_after, strict=True)))
        await self.on_alloc(event)

    async def on_alloc(self, event: AllocEvent) -> None:
        """Hook for the broker: a lease changed (a release may unblock the queue)."""


def _devices(raw: dict) -> dict[int, int]:
    """The per-device hash as Redis answers it (bytes or str) -> device index -> free milli;
    fields that are not numbers are skipped (the script is the authority, not this view)."""
    out: dict[int, int] = {}
    for k, v in (raw or {}).items():
        try:
            out[int(k)] = int(v)
        except (TypeError, ValueError):
            continue
    return out
