"""Live leases in Redis, changed only through the Lua scripts in ``lua/``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from services.common.errors import Unavailable
from services.common.keys import Keys
from services.common.messages import LeaseInfo
from services.common.redis_conn import is_cluster, read_lua

from .outbox import Notice, iso

_info = msgspec.json.Decoder(LeaseInfo)


GROUPS_PER_CALL = 256  # bounds how long one call holds Redis
REGIONS_PER_PIPELINE = 250  # per-region scans (sweep, readiness): a pipeline holds the event loop ~5 ms
PENDING_S = 30.0  # an unconfirmed reservation (its broker died before the grant was durable) ends this soon


Lookup = tuple[str, str, list]  # (key, 'h' for HSET or 'z' for ZADD, flat pairs: field, value or score, member)


def lookups_into(pipe: Pipeline, lookups: Sequence[Lookup]) -> None:
    """``lookups`` as one command each (what ``lua/record_requests.lua`` does with them)."""
    for key, kind, pairs in lookups:
        if kind == "z":
            pipe.zadd(key, dict(zip(pairs[1::2], pairs[::2], strict=True)))
        else:
            pipe.hset(key, mapping=dict(zip(pairs[::2], pairs[1::2], strict=True)))


@dataclass(frozen=True, slots=True)
class Ended:
    lease: LeaseInfo
    seq: int
    free_after: int
    pending: bool = False  # never confirmed: the grant may not be in the record, the client heard nothing
    devices_free_after: tuple[int, ...] = ()  # a pool that shares: free milli of each of lease.devices after


Devices = tuple[tuple[int, ...], tuple[int, ...]]  # a lease's devices on a sharing pool, their free milli after
NOT_SHARING = "sharing"  # a reservation refused because a share was asked of a pool that does not share


def reservation_args(lease: LeaseInfo) -> list[object]:
    """A lease's arguments to ``lua/reserve.lua``: its ``devices`` (the engine's hint, or
    the devices a lease put back holds) go as the hint; the script writes the devices
    it takes into the lease json, so the json goes with none."""
    hint = ",".join(map(str, lease.devices))
    info = msgspec.structs.replace(lease, devices=()) if lease.devices else lease
    return [lease.lease_id, lease.units, msgspec.json.encode(info), int(lease.billing == "interruptible"),
            lease.pool_generation, lease.milli, hint]


def with_devices(lease: LeaseInfo, devices: Devices | None) -> LeaseInfo:
    """The lease as reserved: naming the devices the script took (a sharing pool)."""
    return lease if devices is None else msgspec.structs.replace(lease, devices=devices[0])


@dataclass(frozen=True, slots=True)
class LiveLease:
    """A live lease with its delivery state (docs/lifecycle.md, "Lease"): the grant's
    ``LeaseInfo`` plus what the transitions wrote beside it in the lease hash."""

    info: LeaseInfo
    state: str  # "pending" (grant not confirmed yet), "provisioning" or "ready"
    deadline: float | None = None  # provisioning: failed unless ready by then (unix s)
    ready_at: float | None = None  # unix s


_LIVE_FIELDS = ("info", "state", "deadline", "ready_at", "pending")


def _live(raw: Sequence[object]) -> LiveLease | None:
    info, state, deadline, ready_at, pending = raw
    if not info:
        return None
    return LiveLease(_info.decode(info),  # type: ignore[arg-type]
                     "pending" if pending else (_s(state) if state else "ready"),
                     float(deadline) if deadline else None, float(ready_at) if ready_at else None)  # type: ignore[arg-type]


def provision_deadline(lease: LeaseInfo) -> float:
    """When a delivering lease fails unless ready (unix s); 0 for a capacity-only one."""
    if not lease.delivery:
        return 0.0
    return lease.granted_at.timestamp() + lease.provision_timeout_s


T = TypeVar("T")
Reservation = tuple[str, Sequence[LeaseInfo], float]  # region, its leases, provisional expiry
Reserved = tuple  # see LeaseStore._reserved


def by_region(leases: Iterable[LeaseInfo]) -> dict[str, list[LeaseInfo]]:
    """Leases grouped by region, regions in first-seen order: one script call per group
    (a region's keys share one hash slot), replies read back in the same order."""
    groups: dict[str, list[LeaseInfo]] = {}
    for lease in leases:
        groups.setdefault(lease.region, []).append(lease)
    return groups


def missing_leases(groups: Sequence[Sequence[LeaseInfo]], replies: Sequence[Sequence[object]]) -> list[str]:
    """Ids of the leases that ``confirm_into``'s replies (one list of 1/0 per group, in
    the order of ``groups``) say were gone."""
    return [lease.lease_id for group, reply in zip(groups, replies, strict=True)
            for lease, ok in zip(group, reply, strict=True) if not int(ok)]


def _chunks(regions: Sequence[str]) -> Iterable[Sequence[str]]:
    """Regions in slices of ``REGIONS_PER_PIPELINE``: one pipeline each, so that a scan
    of thousands of regions never holds the event loop for long (requests wait on it)."""
    return (regions[i:i + REGIONS_PER_PIPELINE] for i in range(0, len(regions), REGIONS_PER_PIPELINE))


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class LeaseStore:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        # on one Redis, the groups of many placements go in one script call; on Redis
        # Cluster one call per group (a region's keys share a slot, regions do not)
        self._per_call = 1 if is_cluster(redis) else GROUPS_PER_CALL
        self._reserve = redis.register_script(read_lua("services.broker.lua", "reserve.lua"))
        self._end = redis.register_script(read_lua("services.broker.lua", "end_lease.lua"))
        self._renew = redis.register_script(read_lua("services.broker.lua", "renew.lua"))
        self._restore = redis.register_script(read_lua("services.broker.lua", "restore.lua"))
        self._confirm = redis.register_script(read_lua("services.broker.lua", "confirm.lua"))
        self._ready = redis.register_script(read_lua("services.broker.lua", "lease_ready.lua"))

    def _reserve_call(self, groups: Sequence[Reservation], force: bool = False) -> tuple[list[str], list[object]]:
        """Keys and arguments of one ``lua/reserve.lua`` call for ``groups``."""
        k = self.keys
        keys: list[str] = []
        args: list[object] = [len(groups)]
        for region, leases, expires_at in groups:
            keys += [k.lease_expiry(region), k.leases_ready(region), k.interruptible_leases(region)]
            args += ["force" if force else "check", expires_at, len(leases)]
            for lease in leases:
                keys += [k.pool(region, lease.pool_id), k.pool_leases(region, lease.pool_id),
                         k.lease(region, lease.lease_id)]
                args += reservation_args(lease)
        return keys, args

    @staticmethod
    def _reserved(region: str, raw: list) -> Reserved:
        """``(True, free after each)`` or ``(False, [index of the lease refused, its pool's
        free units])``; with a third item when a sharing pool is involved: ``(True, ...,
        devices of each lease or None)`` or ``(False, ..., NOT_SHARING)``, or ``(False, ...,
        "", {device: free milli})`` when no device of that pool fitted."""
        if int(raw[0]) == -1:
            raise Unavailable(f"leases in region {region} are being restored after a Redis loss; retry shortly")
        if int(raw[0]) == 1:
            frees: list[int] = []
            devices: list[Devices | None] = []
            for x in raw[1:]:
                if isinstance(x, list):  # a sharing pool: {free, {devices}, {their free milli after}}
                    frees.append(int(x[0]))
                    devices.append((tuple(map(int, x[1])), tuple(map(int, x[2]))))
                else:
                    frees.append(int(x))
                    devices.append(None)
            return (True, frees, devices) if any(d is not None for d in devices) else (True, frees)
        if len(raw) > 4:  # no device fitted on a sharing pool: its devices as they are
            return False, [int(raw[1]) - 1, int(raw[2])], "", {d: int(f) for d, f in enumerate(raw[4])}
        if len(raw) > 3:
            return False, [int(raw[1]) - 1, int(raw[2])], _s(raw[3])
        return False, [int(raw[1]) - 1, int(raw[2])]

    async def reserve(self, region: str, leases: Sequence[LeaseInfo], expires_at: float,
                      force: bool = False) -> tuple[bool, list[int]]:
        """All of ``leases`` (one region) or none. Returns ``(True, free after each)`` or
        ``(False, [index of the pool that lacked units, its free units])``; ``reserve_many``
        also says which devices each lease took on a sharing pool."""
        keys, args = self._reserve_call([(region, leases, expires_at)], force)
        [raw] = await self._reserve(keys=keys, args=args)
        return self._reserved(region, raw)[:2]  # type: ignore[return-value]

    async def reserve_many(self, groups: Sequence[Reservation]) -> list[Reserved | Exception]:
        """``reserve`` for many ``(region, leases, expires_at)`` in one round trip (a few
        script calls, pipelined); each group is atomic on its own. A group refused (its
        leases being restored) or, on Redis Cluster, unreachable (its region's node down)
        is its result, not the batch's. A call that failed outright raises: it may have
        run in part, so the callers give back every lease of theirs."""
        calls = [list(range(i, min(i + self._per_call, len(groups)))) for i in range(0, len(groups), self._per_call)]
        results: list[Reserved | Exception | None] = [None] * len(groups)
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for call in calls:
                keys, args = self._reserve_call([groups[i] for i in call])
                # the raw command, not pipe.evalsha: routed by its keys' slot in a cluster pipeline
                pipe.execute_command("EVALSHA", self._reserve.sha, len(keys), *keys, *args)
            raws = await pipe.execute(raise_on_error=False)
            missing = []
            for call, raw in zip(calls, raws, strict=True):
                if isinstance(raw, NoScriptError) and attempt == 0:
                    missing.append(call)  # not run at all: safe to send again
                elif isinstance(raw, Exception):
                    if len(call) > 1:
                        raise raw
                    results[call[0]] = raw
                else:
                    for i, group_raw in zip(call, raw, strict=True):
                        try:
                            results[i] = self._reserved(groups[i][0], group_raw)
                        except Unavailable as exc:
                            results[i] = exc
            if not missing:
                break
            await self.redis.script_load(self._reserve.script)  # Redis restarted or flushed its scripts
            calls = missing
        return results  # type: ignore[return-value]

    async def restore(self, items: Sequence[tuple[LeaseInfo, int] | tuple[LeaseInfo, int, float | None]],
                      chunk: int = 500) -> int:
        """Put ``(lease, seq[, ready_at])`` back after a Redis loss (``lua/restore.lua``):
        units taken whatever is free (the lease was granted when they were), seq and
        delivery state kept (a delivering lease without ``ready_at`` comes back
        provisioning, with its deadline), lookups written. A few round trips for many
        leases: 50,000 must not take 100,000."""
        k = self.keys
        groups: dict[str, list[tuple]] = {}
        for item in items:
            groups.setdefault(item[0].region, []).append(item)
        restored = 0
        for r, group in groups.items():
            for i in range(0, len(group), chunk):
                part = group[i:i + chunk]
                keys = [k.lease_expiry(r), k.interruptible_leases(r), k.lease_provisioning(r)]
                args: list[object] = []
                for lease, seq, *rest in part:
                    ready_at = rest[0] if rest else None
                    state = "" if not lease.delivery else ("ready" if ready_at is not None else "provisioning")
                    keys += [k.pool(r, lease.pool_id), k.pool_leases(r, lease.pool_id), k.lease(r, lease.lease_id)]
                    args += [lease.lease_id, lease.units, msgspec.json.encode(lease),
                             int(lease.billing == "interruptible"), lease.expires_at.timestamp(), seq,
                             lease.pool_generation, state, provision_deadline(lease) if state == "provisioning" else 0,
                             "" if ready_at is None else ready_at, lease.milli, ",".join(map(str, lease.devices))]
                restored += int(await self._restore(keys=keys, args=args))
        pipe = self.redis.pipeline(transaction=False)  # the lookups, a few commands per chunk
        leases = [item[0] for item in items]
        for i in range(0, len(leases), 5000):
            self.index_into(pipe, leases[i:i + 5000])
        if leases:
            await pipe.execute()
        return restored

    async def index(self, leases: Sequence[LeaseInfo]) -> None:
        """Lookups by lease id and by tenant (single keys, outside the region's slot)."""
        pipe = self.redis.pipeline(transaction=False)
        self.index_into(pipe, leases)
        await pipe.execute()

    def index_into(self, pipe: Pipeline, leases: Sequence[LeaseInfo]) -> None:
        lookups_into(pipe, self.index_lookups(leases))

    def index_lookups(self, leases: Sequence[LeaseInfo]) -> list[Lookup]:
        """The lookups of ``leases`` (lease id -> region; a tenant's leases by grant time)
        as ``RequestStates.record_into`` takes them: (key, 'h' or 'z', flat pairs)."""
        if not leases:
            return []
        index: list = []
        by_tenant: dict[str, list] = {}
        for lease in leases:
            index += (lease.lease_id, lease.region)
            by_tenant.setdefault(lease.tenant, []).extend((lease.granted_at.timestamp(), lease.lease_id))
        return [(self.keys.lease_index(), "h", index),
                *((self.keys.tenant_leases(tenant), "z", pairs) for tenant, pairs in by_tenant.items())]

    def confirm_into(self, pipe: Pipeline, groups: Sequence[Sequence[LeaseInfo]]) -> int:
        """The grants are durable: the leases get their real expiry and lose the pending
        mark (``lua/confirm.lua``). ``groups``: leases of one region each. Returns how
        many replies it added to ``pipe``; ``confirmed`` reads them back."""
        k = self.keys
        calls = [groups[i:i + self._per_call] for i in range(0, len(groups), self._per_call)]
        for call in calls:
            keys: list[str] = []
            args: list[object] = [len(call)]
            for group in call:
                region = group[0].region
                keys += [k.lease_expiry(region), k.lease_provisioning(region)]
                for lease in group:
                    keys += [k.lease(region, lease.lease_id), k.pool(region, lease.pool_id)]
                args.append(len(group))
                for lease in group:
                    args += [lease.lease_id, lease.expires_at.timestamp(), provision_deadline(lease)]
            pipe.execute_command("EVALSHA", self._confirm.sha, len(keys), *keys, *args)
        return len(calls)

    @staticmethod
    def confirmed(replies: Sequence[object], n: int) -> list[list[object]]:
        """The first ``n`` pipeline replies of ``confirm_into``: one list of 1/0 per group."""
        return [group for reply in replies[:n] for group in reply]  # type: ignore[union-attr]

    async def load_scripts(self) -> None:
        """After a NOSCRIPT reply (Redis restarted or flushed its script cache)."""
        for script in (self._reserve, self._end, self._renew, self._restore, self._confirm, self._ready):
            await self.redis.script_load(script.script)

    async def run_pipeline(self, build: Callable[[Pipeline], T], also: Sequence[AsyncScript] = ()) -> tuple[T, list]:
        """Run the pipeline that ``build`` fills (its return value comes back with the
        replies). After a NOSCRIPT reply (Redis restarted or flushed its scripts) the
        scripts (these and ``also``) are loaded and the pipeline runs once more: only for
        pipelines whose every command may safely run twice."""
        for attempt in (0, 1):
            pipe = self.redis.pipeline(transaction=False)
            built = build(pipe)
            try:
                return built, await pipe.execute()
            except NoScriptError:
                if attempt:
                    raise
                await self.load_scripts()
                for script in also:
                    await self.redis.script_load(script.script)
        raise AssertionError("unreachable")

    async def confirm(self, leases: Sequence[LeaseInfo]) -> list[str]:
        """``confirm_into`` on its own; returns the ids of leases that were gone."""
        groups = list(by_region(leases).values())
        n, replies = await self.run_pipeline(lambda pipe: self.confirm_into(pipe, groups))
        return missing_leases(groups, self.confirmed(replies, n))

    async def not_ready(self, regions: Sequence[str]) -> list[str]:
        """The regions whose leases-ready marker is missing (a round trip per
        ``REGIONS_PER_PIPELINE``)."""
        out: list[str] = []
        for part in _chunks(regions):
            pipe = self.redis.pipeline(transaction=False)
            for region in part:
                pipe.exists(self.keys.leases_ready(region))
            out += [r for r, n in zip(part, await pipe.execute(), strict=True) if not n]
        return out

    async def mark_ready(self, regions: Sequence[str]) -> None:
        """This replica knows every live lease of these regions is in Redis."""
        pipe = self.redis.pipeline(transaction=False)
        for region in regions:
            pipe.set(self.keys.leases_ready(region), "1")
        await pipe.execute()

    async def end(self, lease: LeaseInfo, mode: str, now: float, notice: Notice | None = None) -> Ended | None:
        """Release / expire / preempt / lose / revoke one lease; None if it was gone (or,
        for ``expire``, renewed in the meantime). ``notice``: the event the ending owes,
        written to the outbox in the same step (every caller that announces the end
        passes it)."""
        ended = await self.end_from(lease, mode, now, notice=notice)
        return ended if isinstance(ended, Ended) else None

    async def end_from(self, lease: LeaseInfo, mode: str, now: float, state: str = "",
                       notice: Notice | None = None) -> Ended | str:
        """``end`` only from ``state`` ("provisioning" or "ready"; "" any): a ``fail``
        from provisioning, a ``timeout`` (provisioning past its deadline), a ``lost``
        from ready (unhealthy). Refused: the state the lease is in ("gone" when none)."""
        k, r = self.keys, lease.region
        keys = [k.lease_expiry(r), k.lease(r, lease.lease_id), k.pool(r, lease.pool_id),
                k.pool_leases(r, lease.pool_id), k.interruptible_leases(r), k.lease_provisioning(r)]
        args: list[object] = [lease.lease_id, mode, now, state]
        if notice is not None:
            keys.append(k.lease_outbox(r))
            args += notice.args()
        raw = await self._end(keys=keys, args=args)
        if int(raw[0]) != 1:
            return _s(raw[1]) if len(raw) > 1 else "gone"
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(k.lease_index(), lease.lease_id)
        pipe.zrem(k.tenant_leases(lease.tenant), lease.lease_id)
        await pipe.execute()
        return Ended(_info.decode(raw[1]), int(raw[2]), int(raw[3]), len(raw) > 4 and int(raw[4]) == 1,
                     tuple(map(int, raw[5])) if len(raw) > 5 else ())

    async def lease_ready(self, lease: LeaseInfo, now: float,
                          at: datetime | None = None) -> tuple[int, LeaseInfo] | str:
        """provisioning → ready (``lua/lease_ready.lua``): ``(seq, lease)``, or why not
        ("gone", "pending", "ready", "generation", "deadline"). ``at``: the time of the
        lease.ready it owes, written to the outbox in the same step."""
        k, r = self.keys, lease.region
        keys = [k.lease(r, lease.lease_id), k.pool(r, lease.pool_id), k.lease_provisioning(r)]
        args: list[object] = [lease.lease_id, now]
        if at is not None:
            keys.append(k.lease_outbox(r))
            args.append(iso(at))
        raw = await self._ready(keys=keys, args=args)
        if int(raw[0]) != 1:
            return _s(raw[1])
        return int(raw[1]), _info.decode(raw[2])

    async def renew(self, lease: LeaseInfo, now: float, at: datetime | None = None) -> int | None:
        """``at``: the time of the lease.renewed it owes, written to the outbox with it."""
        k, r = self.keys, lease.region
        keys = [k.lease_expiry(r), k.lease(r, lease.lease_id)]
        args: list[object] = [lease.lease_id, now, lease.expires_at.timestamp(), msgspec.json.encode(lease)]
        if at is not None:
            keys.append(k.lease_outbox(r))
            args.append(iso(at))
        raw = await self._renew(keys=keys, args=args)
        return int(raw[1]) if int(raw[0]) == 1 else None

    async def get(self, lease_id: str) -> LeaseInfo | None:
        region = await self.redis.hget(self.keys.lease_index(), lease_id)
        if region is None:
            return None
        raw = await self.redis.hget(self.keys.lease(_s(region), lease_id), "info")
        return _info.decode(raw) if raw else None

    async def live(self, lease_id: str) -> LiveLease | None:
        """The lease with its delivery state, or None."""
        region = await self.redis.hget(self.keys.lease_index(), lease_id)
        if region is None:
            return None
        return _live(await self.redis.hmget(self.keys.lease(_s(region), lease_id), _LIVE_FIELDS))

    async def lives(self, leases: Sequence[LeaseInfo]) -> list[LiveLease]:
        """The delivery state of each of ``leases`` still live (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for lease in leases:
            pipe.hmget(self.keys.lease(lease.region, lease.lease_id), _LIVE_FIELDS)
        return [live for live in map(_live, await pipe.execute()) if live is not None]

    async def on_pools(self, pools: Sequence[tuple[str, str]], limit: int = 1000) -> list[LiveLease]:
        """The live leases of ``(region, pool id)`` pools (up to ``limit``), with their
        states: a provider's assignments."""
        pipe = self.redis.pipeline(transaction=False)
        for region, pool_id in pools:
            pipe.smembers(self.keys.pool_leases(region, pool_id))
        pipe2 = self.redis.pipeline(transaction=False)
        n = 0
        for (region, _), ids in zip(pools, await pipe.execute(), strict=True):
            for lease_id in sorted(map(_s, ids)):
                if n >= limit:
                    break
                pipe2.hmget(self.keys.lease(region, lease_id), _LIVE_FIELDS)
                n += 1
        return [live for live in map(_live, await pipe2.execute()) if live is not None] if n else []

    async def provisioning_due(self, regions: Sequence[str], now: float, limit: int = 500) -> list[LeaseInfo]:
        """Leases past their provision deadline (up to ``limit`` a region): the timeout
        sweep's candidates (its script re-checks each)."""
        out: list[LeaseInfo] = []
        for region, ids, found in await self._due(self.keys.lease_provisioning, regions, now, limit):
            out += found
            gone = set(ids) - {lease.lease_id for lease in found}
            if gone:  # ended by a path that did not know the index (cleared here)
                await self.redis.zrem(self.keys.lease_provisioning(region), *gone)
        return out

    async def of_tenant(self, tenant: str, limit: int = 1000) -> list[LeaseInfo]:
        ids = [_s(i) for i in await self.redis.zrange(self.keys.tenant_leases(tenant), 0, limit - 1)]
        return [lease for lease in [await self.get(i) for i in ids] if lease is not None]

    async def expired_in(self, regions: Sequence[str], now: float, limit: int = 500) -> list[LeaseInfo]:
        """Expired leases (up to ``limit`` a region) of many regions."""
        return [lease for _, _, found in await self._due(self.keys.lease_expiry, regions, now, limit)
                for lease in found]

    async def _due(self, index: Callable[[str], str], regions: Sequence[str], now: float,
                   limit: int) -> list[tuple[str, list[str], list[LeaseInfo]]]:
        """Per region with some: the ids scored up to ``now`` in its ``index`` sorted set
        (up to ``limit``) and the leases of those still live. A round trip per
        ``REGIONS_PER_PIPELINE`` regions (a sweep over thousands of regions must not be
        thousands of round trips), plus one per region that has some."""
        out = []
        for part in _chunks(regions):
            pipe = self.redis.pipeline(transaction=False)
            for region in part:
                pipe.zrangebyscore(index(region), "-inf", now, start=0, num=limit)
            for region, ids in zip(part, await pipe.execute(), strict=True):
                if ids:
                    out.append((region, [_s(i) for i in ids], await self._infos(region, ids)))
        return out

    async def interruptible(self, region: str) -> list[LeaseInfo]:
        return await self._infos(region, await self.redis.smembers(self.keys.interruptible_leases(region)))

    async def on_pool(self, region: str, pool_id: str) -> list[LeaseInfo]:
        return await self._infos(region, await self.redis.smembers(self.keys.pool_leases(region, pool_id)))

    async def of_region(self, region: str, lease_ids: Iterable[str]) -> list[LeaseInfo]:
        """The leases of ``lease_ids`` still live in ``region``."""
        return await self._infos(region, lease_ids)

    async def _infos(self, region: str, ids: Iterable[object]) -> list[LeaseInfo]:
        pipe = self.redis.pipeline(transaction=False)
        for lease_id in ids:
            pipe.hget(self.keys.lease(region, _s(lease_id)), "info")
        return [_info.decode(raw) for raw in await pipe.execute() if raw]
