"""Live pool state in Redis, changed only through ``lua/pool.lua`` (and, for heartbeats,
``lua/heartbeats.lua``: the same step for many pools of a region in one call)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from services.common.keys import Keys
from services.common.redis_conn import read_lua

HEALTHY_UNSAID = -2
HEARTBEATS_PER_CALL = 8  # pools per heartbeats.lua call: ~130 us of Redis a call on this machine, about what the other transition scripts hold it (bench/script_latency.py)
VIEW_FIELDS = ("provider", "model", "capacity", "healthy", "leased", "free", "overcommit", "status",
               "last_hb", "record", "generation", "rev")


@dataclass(frozen=True, slots=True)
class Transition:
    """What one script call did: ``code`` 2 created, 1 ok, 0 not found, -1 not owner,
    -2 another generation of the pool is there, 3 stale (a newer record is in Redis)."""

    code: int
    prev: str
    status: str
    free: int
    overcommit: int
    leased: int
    capacity: int
    generation: int = 0
    lost: tuple[str, ...] = ()  # the leases an outage or a removal took with it
    replaced: int = 0  # created over this older generation, whose removal Redis had missed

    @property
    def changed(self) -> bool:
        return self.prev != self.status


class PoolStore:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._script = redis.register_script(read_lua("services.registry.lua", "pool.lua"))
        self._heartbeats = redis.register_script(read_lua("services.registry.lua", "heartbeats.lua"))

    def _keys(self, region: str, pool_id: str) -> list[str]:
        k = self.keys
        return [k.pool(region, pool_id), k.region_pools(region), k.heartbeats(region),
                k.pool_leases(region, pool_id), k.removed_pools(region)]

    async def _run(self, op: str, region: str, pool_id: str, now: float, provider: str, *args: object,
                   client: Redis | None = None) -> Transition:
        raw = await self._script(keys=self._keys(region, pool_id), args=[op, now, pool_id, provider, *args],
                                 client=client)
        return _transition(raw)

    async def upsert(self, region: str, pool_id: str, now: float, owner: str, capacity: int, record: bytes,
                     model: str, generation: int, revision: int) -> Transition:
        """Follow the durable record at ``revision`` (of pool ``generation``)."""
        await self.redis.hsetnx(self.keys.pool_index(), pool_id, region)
        await self.redis.sadd(self.keys.regions(), region)
        return await self._run("upsert", region, pool_id, now, "", capacity, record, model, owner, generation,
                               revision)

    async def upsert_many(self, items: Sequence[tuple[str, str, str, int, bytes, str, int, int]], now: float,
                          index_only: Mapping[str, bool] | None = None) -> None:
        """Many ``(region, pool_id, owner, capacity, record, model, generation, revision)`` registrations in one
        pipelined round trip: refilling a lost Redis with 10,000 pools must not take
        30,000 round trips. Regions with ``index_only[region]`` true kept their pools
        (only the global lookups are written again for them)."""
        pipe = self.redis.pipeline(transaction=False)
        sha = self._script.sha
        for region, pool_id, owner, capacity, record, model, generation, revision in items:
            pipe.hsetnx(self.keys.pool_index(), pool_id, region)
            pipe.sadd(self.keys.regions(), region)
            if index_only and index_only.get(region):
                continue
            pipe.execute_command("EVALSHA", sha, 5, *self._keys(region, pool_id), "upsert", now, pool_id, "",
                                 capacity, record, model, owner, generation,
                                 revision)  # raw: a cluster pipeline routes it by slot
        try:
            await pipe.execute()
        except NoScriptError:  # Redis restarted or flushed its script cache
            await self._script.registered_client.script_load(self._script.script)
            await self.upsert_many(items, now, index_only)

    async def heartbeat(self, region: str, pool_id: str, now: float, provider: str,
                        healthy: int | None) -> Transition:
        return await self._run("heartbeat", region, pool_id, now, provider,
                               HEALTHY_UNSAID if healthy is None else healthy)

    async def heartbeat_many(self, items: Sequence[tuple[str, str, int | None, str]], now: float) -> list[Transition]:
        """One pipelined round trip for many ``(region, pool_id, healthy, acting provider)``:
        a ``lua/heartbeats.lua`` call per region and ``HEARTBEATS_PER_CALL`` pools (what
        ``lua/pool.lua``'s heartbeat does, for each in order), not one call per pool."""
        by_region: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_region.setdefault(item[0], []).append(i)
        calls = [(region, positions[j:j + HEARTBEATS_PER_CALL]) for region, positions in by_region.items()
                 for j in range(0, len(positions), HEARTBEATS_PER_CALL)]
        pipe = self.redis.pipeline(transaction=False)
        k = self.keys
        for region, positions in calls:
            keys = [k.heartbeats(region)]
            args: list[object] = [now]
            for i in positions:
                _, pool_id, healthy, provider = items[i]
                keys.append(k.pool(region, pool_id))
                args += (pool_id, provider, HEALTHY_UNSAID if healthy is None else healthy)
            # execute_command, not pipe.evalsha: redis-py refuses the latter in a cluster
            # pipeline, while the raw command is routed by its keys' slot like any other
            pipe.execute_command("EVALSHA", self._heartbeats.sha, len(keys), *keys, *args)
        try:
            raws = await pipe.execute()
        except NoScriptError:  # Redis restarted or flushed its script cache
            await self._heartbeats.registered_client.script_load(self._heartbeats.script)
            return await self.heartbeat_many(items, now)
        out: list[Transition | None] = [None] * len(items)
        for (_, positions), raw in zip(calls, raws, strict=True):
            for i, one in zip(positions, raw, strict=True):
                out[i] = _transition(one)
        return out  # type: ignore[return-value]

    async def patch(self, region: str, pool_id: str, now: float, provider: str, capacity: int,
                    record: bytes, generation: int, revision: int) -> Transition:
        return await self._run("patch", region, pool_id, now, provider, capacity, record, generation, revision)

    async def drain(self, region: str, pool_id: str, now: float, provider: str, on: bool = True) -> Transition:
        return await self._run("drain" if on else "undrain", region, pool_id, now, provider)

    async def remove(self, region: str, pool_id: str, now: float, provider: str, generation: int = 0) -> Transition:
        """Remove ``generation`` of the pool (0: whichever is there)."""
        t = await self._run("remove", region, pool_id, now, provider, generation)
        if t.code == 1:
            await self.redis.hdel(self.keys.pool_index(), pool_id)
        return t

    async def expire(self, region: str, pool_id: str, now: float, cutoff: float) -> Transition:
        return await self._run("expire", region, pool_id, now, "", cutoff)

    async def stale(self, region: str, cutoff: float, limit: int = 1000) -> list[str]:
        ids = await self.redis.zrangebyscore(self.keys.heartbeats(region), "-inf", f"({cutoff}",
                                             start=0, num=limit)
        return [i.decode() if isinstance(i, bytes) else i for i in ids]

    async def region_of(self, pool_id: str) -> str | None:
        value = await self.redis.hget(self.keys.pool_index(), pool_id)
        return value.decode() if isinstance(value, bytes) else value

    async def regions_of(self, pool_ids: Sequence[str]) -> list[str | None]:
        if not pool_ids:
            return []
        values = await self.redis.hmget(self.keys.pool_index(), list(pool_ids))
        return [v.decode() if isinstance(v, bytes) else v for v in values]

    async def owners(self, pairs: Sequence[tuple[str, str]]) -> list[str | None]:
        """Provider of each ``(region, pool_id)``, one pipelined round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for region, pool_id in pairs:
            pipe.hget(self.keys.pool(region, pool_id), "provider")
        return [v.decode() if isinstance(v, bytes) else v for v in await pipe.execute()]

    async def regions(self) -> list[str]:
        return sorted(r.decode() if isinstance(r, bytes) else r for r in await self.redis.smembers(self.keys.regions()))

    async def pool_ids(self, region: str) -> list[str]:
        ids = await self.redis.smembers(self.keys.region_pools(region))
        return [i.decode() if isinstance(i, bytes) else i for i in ids]

    async def views(self, region: str, pool_ids: Iterable[str]) -> list[dict[str, str] | None]:
        pipe = self.redis.pipeline(transaction=False)
        ids = list(pool_ids)
        for pool_id in ids:
            pipe.hmget(self.keys.pool(region, pool_id), VIEW_FIELDS)
        out: list[dict[str, str] | None] = []
        for pool_id, values in zip(ids, await pipe.execute(), strict=True):
            if values[0] is None:
                out.append(None)
                continue
            row = {f: (v.decode() if isinstance(v, bytes) else v) for f, v in zip(VIEW_FIELDS, values, strict=True)}
            row["pool_id"] = pool_id
            row["region"] = region
            out.append(row)
        return out


def _transition(raw: list) -> Transition:
    def s(v: object) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    return Transition(int(raw[0]), s(raw[1]), s(raw[2]), int(raw[3]), int(raw[4]), int(raw[5]), int(raw[6]),
                      int(raw[7]), tuple(sorted(s(i) for i in raw[8])), int(raw[9]))
