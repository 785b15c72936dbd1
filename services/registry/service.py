"""The registry's use cases: each one validates with the pure domain, writes the
durable record first, then live state in Redis, then publishes what happened."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from redis.asyncio import Redis

from services.common.auth import Principal
from services.common.clock import utcnow
from services.common.ids import is_valid_id, new_id
from services.common.keys import Keys
from services.common.jetstream import follow_bucket
from services.common.messages import Accelerator, Link, Pool, PoolRemoved, PoolSpec, Region
from services.common.network import Network
from services.common.reliability import POOL, read_reliability
from services.common.subjects import link_key, region_key

from .domain import topology as topo
from .domain.errors import BadRequest, Conflict, Forbidden, NotFound
from .domain.pools import (
    BatchHeartbeat,
    PoolPatch,
    apply_patch,
    build_pool,
    check_owner,
    owner_for,
)
from .coalesce import HeartbeatCoalescer
from .events import CapacityEvents, for_status, for_upsert
from .metrics import HEARTBEAT_MISSES, HEARTBEATS, STATUS_CHANGES
from .records import Entry, PoolRecords, RecordChanged
from .store import PoolStore, Transition
from .views import PoolPage, PoolView, pool_view

log = logging.getLogger(__name__)


_OUTCOME = {0: "not_found", -1: "forbidden"}
_CAS_ATTEMPTS = 8  # compare-and-set rounds lost to concurrent writers before a 409


class SearchFilter(msgspec.Struct, frozen=True, kw_only=True):
    region: str | None = None
    vendor: str | None = None
    model: str | None = None
    stack: str | None = None
    provider: str | None = None
    status: str | None = None
    min_free: int = 0
    limit: int = 100
    cursor: str | None = None


class RegionBook:
    """The topology in force, kept in the ``regions`` bucket: one key per region, one per
    published link, never a mesh (``docs/topology.md``, "Storage and scale"). Each replica
    follows the bucket with one consumer for its lifetime and answers every read from
    that copy, so a read, anonymous or not, costs NATS nothing."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str) -> None:
        self.js, self.kv, self.bucket = js, kv, bucket
        self.network = Network()
        self.file_ids: frozenset[str] = frozenset()  # regions the topology file defines
        self._revisions: dict[str, int] = {}  # record key -> revision applied

    async def open(self, base: topo.TopologyFile) -> None:
        """Catch up with the bucket, then write what the topology file says where the
        bucket differs. The file is the source of its regions and of every published
        link: links it no longer lists are removed; regions are never removed (pools
        may be in them)."""
        await follow_bucket(self.js, self.bucket, self._record)
        self.file_ids = frozenset(r.id for r in base.regions)
        writes: list[tuple[str, Region | Link]] = [
            (region_key(r.id), r) for r in base.regions if self.network.regions.get(r.id) != r]
        wanted = {(link.src, link.dst): link for link in base.links}
        writes += [(link_key(*pair), link) for pair, link in wanted.items()
                   if self.network.published.get(pair) != link]
        await self._put(writes)
        for src, dst in [pair for pair in self.network.published if pair not in wanted]:
            await self.kv.delete(link_key(src, dst))  # the follower brings the deletion's revision
            self.network.drop_link(src, dst)

    def _record(self, key: str, value: bytes | None, revision: int) -> None:
        """A record of the bucket; an older revision than the one applied is ignored (a
        write or key read may return after the follower brought a newer one)."""
        if revision > self._revisions.get(key, 0):
            self._revisions[key] = revision
            self.network.apply(key, value)

    async def _put(self, items: Sequence[tuple[str, Region | Link]], concurrency: int = 256) -> None:
        """Write records (and apply them here at once: this replica's next read sees them)."""
        encoded = [(key, msgspec.json.encode(value)) for key, value in items]
        for i in range(0, len(encoded), concurrency):
            chunk = encoded[i:i + concurrency]
            revisions = await asyncio.gather(*(self.kv.put(key, data) for key, data in chunk))
            for (key, data), revision in zip(chunk, revisions, strict=True):
                self._record(key, data, revision)

    # --- reads (memory only; ``known`` looks in the bucket on a miss) --------------------
    def __contains__(self, region_id: object) -> bool:
        return region_id in self.network

    async def known(self, region_id: str) -> bool:
        """Known here, or just added by another replica: one key read, no consumer."""
        if region_id in self.network:
            return True
        if not is_valid_id(region_id):
            return False
        try:
            entry = await self.kv.get(region_key(region_id))
        except KeyNotFoundError:
            return False
        self._record(entry.key, entry.value, entry.revision or 0)
        return region_id in self.network

    # --- changes (admin) -------------------------------------------------------------------
    def _check(self, region: Region) -> None:
        try:
            topo.check_region(region)
        except topo.TopologyError as exc:
            raise BadRequest(str(exc)) from None
        have = self.network.regions.get(region.id)
        if region.id in self.file_ids and have is not None and have != region:
            raise Conflict(f"region {region.id!r} comes from the registry's topology file, which has "
                           f"{msgspec.json.encode(have).decode()}; change it there")

    async def add(self, region: Region) -> bool:
        """Add or change a region; False if it was there unchanged."""
        return bool(await self.add_many([region]))

    async def add_many(self, regions: Sequence[Region]) -> int:
        """Validates every region before writing any; returns how many were new or changed."""
        seen: set[str] = set()
        for region in regions:
            self._check(region)
            if region.id in seen:
                raise BadRequest(f"region {region.id!r} appears twice")
            seen.add(region.id)
        writes = [(region_key(r.id), r) for r in regions if self.network.regions.get(r.id) != r]
        await self._put(writes)
        return len(writes)


class Registry:
    def __init__(self, *, redis: Redis, keys: Keys, store: PoolStore, records: PoolRecords,
                 events: CapacityEvents, catalogue: Mapping[str, Accelerator], regions: RegionBook,
                 heartbeat_ttl_s: float, clock: Callable[[], datetime] = utcnow) -> None:
        self.redis, self.keys, self.store, self.records, self.events = redis, keys, store, records, events
        self.catalogue, self.regions = catalogue, regions
        self.ttl = heartbeat_ttl_s
        self.clock = clock
        self._region_cache: dict[str, str] = {}
        self._heartbeats = HeartbeatCoalescer(store)

    # --- helpers ----------------------------------------------------------------------
    @staticmethod
    def _check_id(pool_id: str) -> None:
        if not is_valid_id(pool_id):
            raise BadRequest(f"malformed pool id {pool_id!r}: use 1-63 of a-z 0-9 _ - starting with a-z or 0-9")

    async def _region(self, pool_id: str) -> str:
        self._check_id(pool_id)
        region = self._region_cache.get(pool_id) or await self.store.region_of(pool_id)
        if region is None:
            raise NotFound(f"no pool {pool_id}")
        self._region_cache[pool_id] = region
        return region

    @staticmethod
    def _acting(principal: Principal) -> str:
        """The provider id a Lua script must check ownership against ('' = admin)."""
        if principal.role == "admin":
            return ""
        if principal.role != "provider":
            raise Forbidden(f"role {principal.role} may not change pools")
        return principal.subject

    @staticmethod
    def _checked(t: Transition, pool_id: str) -> Transition:
        if t.code == 0:
            raise NotFound(f"no pool {pool_id}")
        if t.code == -1:
            raise Forbidden("this pool belongs to another provider")
        if t.code == -2:
            raise Conflict(f"pool {pool_id} was removed and registered again meanwhile; retry")
        return t

    async def _publish_status(self, pool_id: str, provider: str, region: str, t: Transition,
                              now: datetime) -> None:
        event = for_status(pool_id, provider, region, t, now)
        if event is not None:
            STATUS_CHANGES.labels(t.status).inc()
            await self.events.publish(event)

    async def view(self, pool_id: str) -> PoolView:
        for _ in range(2):  # a second look when a cached region went stale
            region = await self._region(pool_id)
            [row] = await self.store.views(region, [pool_id])
            if row is not None:
                [view] = await self._with_reliability([pool_view(row)])
                return view
            self._region_cache.pop(pool_id, None)
        raise NotFound(f"no pool {pool_id}")

    # --- provider use cases ------------------------------------------------------------
    async def register(self, principal: Principal, pool_id: str, spec: PoolSpec) -> tuple[PoolView, bool]:
        """Create-only for a new pool, compare-and-set for an existing one, in the durable
        record first: the owner is checked against the revision the write replaces, so of
        two providers creating one pool id exactly one wins; the other reads the winner's
        record and is refused. Redis then follows the record (stale writes change nothing)."""
        self._check_id(pool_id)
        now = self.clock()
        owner = owner_for(principal, spec.provider)
        await self.regions.known(spec.region)  # refresh if another replica added it; build_pool checks
        for _ in range(_CAS_ATTEMPTS):
            current = await self.records.entry(pool_id)
            pool = build_pool(pool_id, spec, owner, self.catalogue, self.regions, now,
                              current.pool if current else None)
            try:
                entry = await (self.records.create(pool) if current is None
                               else self.records.update(pool, current.revision))
            except RecordChanged:
                continue  # another writer got there first: read again, decide again
            break
        else:
            raise Conflict(f"pool {pool_id} is being changed concurrently; retry")
        t = await self._follow(entry, now)
        self._region_cache[pool_id] = pool.spec.region
        created = current is None
        if t.code != 3:  # a newer record reached Redis first and announced itself
            if t.replaced:
                await self._publish_replaced(entry.pool, t, now)
            await self.events.publish(for_upsert(entry.pool, t, now, created))
            if not created and t.changed and t.status == "online":
                await self._publish_status(pool_id, owner, pool.spec.region, t, now)
        return await self.view(pool_id), created

    async def _follow(self, entry: Entry, now: datetime) -> Transition:
        """Redis takes the record ``entry`` (live state follows the durable record)."""
        pool = entry.pool
        t = await self.store.upsert(pool.spec.region, pool.pool_id, now.timestamp(), pool.provider, pool.spec.units,
                                    msgspec.json.encode(pool), pool.spec.model, pool.generation, entry.revision)
        if t.code == -1:  # a hash of this generation with another owner: only a record could say that
            raise Conflict(f"pool {pool.pool_id}: live state disagrees with the record about its owner")
        return t

    async def _publish_replaced(self, pool: Pool, t: Transition, now: datetime) -> None:
        """Redis still held an older generation (its removal never reached Redis): that
        generation is gone, and its leases with it."""
        await self.events.publish(PoolRemoved(id=new_id("ev"), at=now, pool_id=pool.pool_id, provider=pool.provider,
                                              region=pool.spec.region, generation=t.replaced, lease_ids=t.lost))

    async def register_many(self, principal: Principal, items: Sequence[tuple[str, PoolSpec]],
                            concurrency: int = 64) -> list[tuple[str, bool]]:
        """Bulk registration for imports: validates everything first, so a bad row
        changes nothing; then writes with bounded concurrency."""
        now = self.clock()
        seen: set[str] = set()
        for pool_id, spec in items:
            self._check_id(pool_id)
            if pool_id in seen:
                raise BadRequest(f"pool id {pool_id} appears twice")
            seen.add(pool_id)
            await self.regions.known(spec.region)
            build_pool(pool_id, spec, owner_for(principal, spec.provider), self.catalogue, self.regions, now, None)
        # pools that exist already: same owner and same region, or nothing is written
        ids = [p for p, _ in items]
        regions = await self.store.regions_of(ids)
        existing = [(r, p, s) for r, (p, s) in zip(regions, items, strict=True) if r]
        owners = await self.store.owners([(r, p) for r, p, _ in existing])
        for (region, pool_id, spec), owner in zip(existing, owners, strict=True):
            if owner is not None and owner != owner_for(principal, spec.provider):
                raise Forbidden(f"pool {pool_id} belongs to another provider")
            if region != spec.region:
                raise Conflict(f"pool {pool_id} is in region {region}; it cannot move to {spec.region}")
        sem = asyncio.Semaphore(concurrency)

        async def one(pool_id: str, spec: PoolSpec) -> tuple[str, bool]:
            async with sem:
                _, created = await self.register(principal, pool_id, spec)
                return pool_id, created

        return list(await asyncio.gather(*(one(p, s) for p, s in items)))

    async def patch(self, principal: Principal, pool_id: str, patch: PoolPatch) -> PoolView:
        self._check_id(pool_id)
        acting = self._acting(principal)
        now = self.clock()
        for _ in range(_CAS_ATTEMPTS):
            current = await self.records.entry(pool_id)
            if current is None:
                raise NotFound(f"no pool {pool_id}")
            check_owner(principal, current.pool.provider)
            pool = apply_patch(current.pool, patch, now)
            try:
                entry = await self.records.update(pool, current.revision)
            except RecordChanged:
                continue
            break
        else:
            raise Conflict(f"pool {pool_id} is being changed concurrently; retry")
        t = self._checked(await self.store.patch(pool.spec.region, pool_id, now.timestamp(), acting, pool.spec.units,
                                                 msgspec.json.encode(pool), pool.generation, entry.revision), pool_id)
        if t.code != 3:
            await self.events.publish(for_upsert(pool, t, now, False))
        return await self.view(pool_id)

    async def heartbeat(self, principal: Principal, pool_id: str, healthy: int | None) -> Transition:
        acting = self._acting(principal)
        cached = pool_id in self._region_cache
        region = await self._region(pool_id)
        now = self.clock()
        t = await self._heartbeats.heartbeat((region, pool_id, healthy, acting), now.timestamp())
        if t.code == 0 and cached:
            # another replica removed the pool (and may have registered it elsewhere)
            self._region_cache.pop(pool_id, None)
            region = await self._region(pool_id)
            t = await self._heartbeats.heartbeat((region, pool_id, healthy, acting), now.timestamp())
        HEARTBEATS.labels(_OUTCOME.get(t.code, "ok")).inc()
        self._checked(t, pool_id)
        if t.changed:
            provider = principal.subject if acting else (await self.view(pool_id)).provider
            await self._publish_status(pool_id, provider, region, t, now)
        return t

    async def heartbeat_many(self, principal: Principal, body: BatchHeartbeat) -> dict[str, str]:
        """Returns each pool's status; unknown or foreign pools are reported, not fatal."""
        acting = self._acting(principal)
        for pool_id in body.pools:
            self._check_id(pool_id)
        unknown = set(body.healthy_units) - set(body.pools)
        if unknown:
            raise BadRequest(f"healthy_units names pools not in 'pools': {sorted(unknown)[:5]}")
        regions = await self.store.regions_of(body.pools)
        items = [(r, p, body.healthy_units.get(p), acting) for p, r in zip(body.pools, regions, strict=True) if r]
        now = self.clock()
        results = await self.store.heartbeat_many(items, now.timestamp())
        out = {p: "not_found" for p, r in zip(body.pools, regions, strict=True) if not r}
        HEARTBEATS.labels("not_found").inc(len(body.pools) - len(items))
        for (region, pool_id, _, _), t in zip(items, results, strict=True):
            HEARTBEATS.labels(_OUTCOME.get(t.code, "ok")).inc()
            out[pool_id] = {0: "not_found", -1: "forbidden"}.get(t.code, t.status)
            if t.code == 1 and t.changed:
                provider = principal.subject if acting else (await self.view(pool_id)).provider
                await self._publish_status(pool_id, provider, region, t, now)
        return out

    async def drain(self, principal: Principal, pool_id: str, on: bool = True) -> PoolView:
        acting = self._acting(principal)
        region = await self._region(pool_id)
        now = self.clock()
        t = self._checked(await self.store.drain(region, pool_id, now.timestamp(), acting, on), pool_id)
        view = await self.view(pool_id)
        await self._publish_status(pool_id, view.provider, region, t, now)
        return view

    async def remove(self, principal: Principal, pool_id: str) -> Transition:
        """The record goes first (compare-and-set on the revision whose owner was
        checked), then Redis, only the generation the record held: a pool registered
        again meanwhile is another generation and stays."""
        acting = self._acting(principal)
        region = await self._region(pool_id)
        for _ in range(_CAS_ATTEMPTS):
            current = await self.records.entry(pool_id)
            if current is None:
                break  # no record (a removal that stopped before Redis): Redis alone, by its owner
            check_owner(principal, current.pool.provider)
            try:
                await self.records.delete(pool_id, current.revision)
            except RecordChanged:
                continue
            break
        else:
            raise Conflict(f"pool {pool_id} is being changed concurrently; retry")
        now = self.clock()
        t = self._checked(await self.store.remove(region, pool_id, now.timestamp(), acting,
                                                  current.pool.generation if current else 0), pool_id)
        self._region_cache.pop(pool_id, None)
        provider = current.pool.provider if current else principal.subject
        await self._publish_status(pool_id, provider, region, t, now)
        return t

    # --- search ----------------------------------------------------------------------
    async def search(self, f: SearchFilter) -> PoolPage:
        if f.region is not None and not await self.regions.known(f.region):
            raise BadRequest(f"unknown region {f.region!r}")
        regions = [f.region] if f.region else await self.store.regions()
        rows: list[PoolView] = []
        for region in regions:
            ids = sorted(await self.store.pool_ids(region))
            for row in await self.store.views(region, ids):
                if row is None:
                    continue
                if f.status and row["status"] != f.status:
                    continue
                if f.provider and row["provider"] != f.provider:
                    continue
                if f.model and row["model"] != f.model:
                    continue
                if int(row["free"]) < f.min_free:
                    continue
                view = pool_view(row)
                if f.vendor and view.vendor != f.vendor:
                    continue
                if f.stack and view.stack != f.stack:
                    continue
                rows.append(view)
        rows.sort(key=lambda v: v.pool_id)
        start = 0
        if f.cursor:
            start = next((i for i, v in enumerate(rows) if v.pool_id > f.cursor), len(rows))
        page = await self._with_reliability(rows[start:start + f.limit])
        more = start + f.limit < len(rows)
        return PoolPage(items=page, total=len(rows), next_cursor=page[-1].pool_id if more and page else None)

    async def _with_reliability(self, views: list[PoolView]) -> list[PoolView]:
        """The pools' reliability records (the broker's, read through common's keys)."""
        records = await read_reliability(self.redis, self.keys, POOL, [v.pool_id for v in views],
                                         int(time.time() * 1000))
        return [msgspec.structs.replace(v, reliability=r) for v, r in zip(views, records, strict=True)]

    # --- background ------------------------------------------------------------------
    async def sweep(self) -> int:
        """Take pools that missed their heartbeat offline. Safe in every replica at
        once: the script re-checks the heartbeat time, so each pool goes offline once."""
        now = self.clock()
        cutoff = now.timestamp() - self.ttl
        n = 0
        for region in await self.store.regions():
            for pool_id in await self.store.stale(region, cutoff):
                t = await self.store.expire(region, pool_id, now.timestamp(), cutoff)
                if t.code == 1 and t.changed:
                    [row] = await self.store.views(region, [pool_id])
                    provider = row["provider"] if row else ""
                    await self._publish_status(pool_id, provider, region, t, now)
                    HEARTBEAT_MISSES.inc()
                    n += 1
        return n

    async def rebuild_if_lost(self) -> int:
        """Refill Redis from the durable record when it was lost or flushed. Pools
        come back alive with a fresh TTL: their providers' heartbeats decide next."""
        marker = self.keys.rebuilt_marker("registry")
        if await self.redis.exists(marker):
            return 0
        now = self.clock()
        n = 0
        batch: list[tuple[str, str, str, int, bytes, str, int, int]] = []
        intact: dict[str, bool] = {}  # a Redis Cluster master lost alone: the other regions keep their pools
        async for entry in self.records.entries():
            pool = entry.pool
            region = pool.spec.region
            if region not in intact:
                intact[region] = bool(await self.redis.exists(self.keys.region_pools(region)))
            batch.append((region, pool.pool_id, pool.provider, pool.spec.units, msgspec.json.encode(pool),
                          pool.spec.model, pool.generation, entry.revision))
            n += 1
            if len(batch) >= 1000:
                await self.store.upsert_many(batch, now.timestamp(), index_only=intact)
                batch = []
        if batch:
            await self.store.upsert_many(batch, now.timestamp(), index_only=intact)
        await self.redis.set(marker, now.isoformat())
        self._region_cache.clear()
        if n:
            log.warning("rebuilt %d pools in Redis from the durable record", n)
        return n
