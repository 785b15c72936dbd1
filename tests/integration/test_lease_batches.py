"""The broker's batched lease calls against a real redis-server: many reservations in
one pipelined round trip, each all-or-nothing on its own, with per-group failures; the
scripts reloaded after Redis forgot them, without booking anything twice; confirmations
that report a lease already gone instead of bringing it back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import redis

from services.broker.leases import LeaseStore
from services.common.errors import Unavailable
from services.common.keys import Keys
from services.common.messages import LeaseInfo
from services.common.redis_conn import read_lua

A, B = "cn-gz", "cn-yrd"


def pool_op(srds: redis.Redis, k: Keys, region: str, pool_id: str, op: str, *args: object) -> list:
    script = srds.register_script(read_lua("services.registry.lua", "pool.lua"))
    return script(keys=[k.pool(region, pool_id), k.region_pools(region), k.heartbeats(region),
                        k.pool_leases(region, pool_id), k.removed_pools(region)], args=[op, 1000.0, pool_id, "", *args])


def setup_pools(srds: redis.Redis, k: Keys, pools: dict[tuple[str, str], int], ready: tuple[str, ...],
                generation: int = 1) -> None:
    for (region, pool_id), units in pools.items():
        pool_op(srds, k, region, pool_id, "upsert", units, "{}", "m", "acme", generation, generation)
    for region in ready:
        srds.set(k.leases_ready(region), "1")


def lease(lease_id: str, region: str, pool_id: str, units: int, generation: int = 1) -> LeaseInfo:
    now = datetime.now(UTC)
    return LeaseInfo(lease_id=lease_id, request_id="r", tenant="t", pool_id=pool_id, provider="acme",
                     region=region, model="m", units=units, billing="on_demand", unit_price=Decimal(1),
                     granted_at=now, expires_at=now + timedelta(hours=1), pool_generation=generation)


def free(srds: redis.Redis, k: Keys, region: str, pool_id: str) -> int:
    return int(srds.hget(k.pool(region, pool_id), "free"))


async def test_reserve_many_is_all_or_nothing_per_group(rds, srds, prefix: str) -> None:
    k = Keys(prefix)
    setup_pools(srds, k, {(A, "p1"): 4, (A, "p2"): 2, (B, "p3"): 8, ("cn-gba", "p4"): 8}, ready=(A, B))
    store = LeaseStore(rds, k)
    exp = datetime.now(UTC).timestamp() + 30
    groups = [
        (A, [lease("l1", A, "p1", 3)], exp),                              # fits
        (A, [lease("l2", A, "p1", 1), lease("l3", A, "p2", 3)], exp),    # p2 lacks a unit: none
        (B, [lease("l4", B, "p3", 8)], exp),                              # fits exactly
        ("cn-gba", [lease("l5", "cn-gba", "p4", 1)], exp),                # leases not restored yet
    ]
    results = await store.reserve_many(groups)
    assert results[0] == (True, [1])
    assert results[1] == (False, [1, 2])
    assert results[2] == (True, [0])
    assert isinstance(results[3], Unavailable)
    assert (free(srds, k, A, "p1"), free(srds, k, A, "p2"), free(srds, k, B, "p3")) == (1, 2, 0)
    assert not srds.exists(k.lease(A, "l2")) and not srds.exists(k.lease(A, "l3"))
    assert srds.hget(k.lease(A, "l1"), "pending") == "1"


async def test_scripts_forgotten_by_redis_are_loaded_again_and_run_once(rds, srds, prefix: str) -> None:
    k = Keys(prefix)
    setup_pools(srds, k, {(A, "p1"): 4}, ready=(A,))
    store = LeaseStore(rds, k)
    exp = datetime.now(UTC).timestamp() + 30
    srds.script_flush()
    results = await store.reserve_many([(A, [lease("l1", A, "p1", 1)], exp), (A, [lease("l2", A, "p1", 2)], exp)])
    assert results == [(True, [3]), (True, [1])]  # each reserved once, not twice
    srds.script_flush()
    l1 = lease("l1", A, "p1", 1)
    assert await store.confirm([l1]) == []
    assert srds.hget(k.lease(A, "l1"), "pending") is None
    assert float(srds.hget(k.lease(A, "l1"), "expires")) == l1.expires_at.timestamp()
    assert srds.zscore(k.lease_expiry(A), "l1") == l1.expires_at.timestamp()


async def test_confirm_reports_a_lease_that_is_gone_and_does_not_bring_it_back(rds, srds, prefix: str) -> None:
    k = Keys(prefix)
    setup_pools(srds, k, {(A, "p1"): 4, (B, "p3"): 4}, ready=(A, B))
    store = LeaseStore(rds, k)
    exp = datetime.now(UTC).timestamp() + 30
    la, lb = lease("la", A, "p1", 2), lease("lb", B, "p3", 2)
    assert await store.reserve_many([(A, [la], exp), (B, [lb], exp)]) == [(True, [2]), (True, [2])]
    ended = await store.end(la, "expire", exp + 1)  # its provisional expiry passed: a sweeper ended it
    assert ended is not None and ended.pending
    assert await store.confirm([la, lb]) == ["la"]
    assert not srds.exists(k.lease(A, "la")) and srds.zscore(k.lease_expiry(A), "la") is None
    assert free(srds, k, A, "p1") == 4
    assert srds.hget(k.lease(B, "lb"), "pending") is None
    assert msgspec.json.decode(srds.hget(k.lease(B, "lb"), "info"), type=LeaseInfo) == lb


async def test_a_group_naming_one_pool_twice_takes_the_sum(rds, srds, prefix: str) -> None:
    """Issue 11, reproduction 1b: two allocations of 5 on one 8-unit pool in one group
    were each checked against the 8 free, and 10 units were leased on 8."""
    k = Keys(prefix)
    setup_pools(srds, k, {(A, "p1"): 8}, ready=(A,))
    store = LeaseStore(rds, k)
    exp = datetime.now(UTC).timestamp() + 30
    ok, _ = await store.reserve(A, [lease("l1", A, "p1", 5), lease("l2", A, "p1", 5)], exp)
    assert not ok
    assert int(srds.hget(k.pool(A, "p1"), "leased")) == 0 and free(srds, k, A, "p1") == 8
    ok, after = await store.reserve(A, [lease("l3", A, "p1", 5), lease("l4", A, "p1", 3)], exp)
    assert ok and after == [3, 0] and int(srds.hget(k.pool(A, "p1"), "leased")) == 8


async def test_a_lease_never_touches_another_generation_of_its_pool(rds, srds, prefix: str) -> None:
    """Issue 11, reproduction 1: a lease of 4 on pool X outlives X's removal (its broker
    missed the event); X is registered again with 8 units. Ending the old lease took its 4
    units off the new X, and 12 units were leased on an 8-unit pool."""
    k = Keys(prefix)
    setup_pools(srds, k, {(A, "x"): 8}, ready=(A,), generation=5)
    store = LeaseStore(rds, k)
    exp = datetime.now(UTC).timestamp() + 30
    old = lease("old", A, "x", 4, generation=5)
    assert (await store.reserve(A, [old], exp))[0]
    assert pool_op(srds, k, A, "x", "remove", 5)[0] == 1  # the broker never hears of it
    pool_op(srds, k, A, "x", "upsert", 8, "{}", "m", "acme", 9, 9)  # registered again: generation 9
    assert (await store.reserve(A, [lease("new", A, "x", 8, generation=9)], exp))[0]
    ended = await store.end(old, "release", datetime.now(UTC).timestamp())
    assert ended is not None and ended.free_after == -1  # ended, but no pool of its generation touched
    assert int(srds.hget(k.pool(A, "x"), "leased")) == 8 and free(srds, k, A, "x") == 0
    ok, _ = await store.reserve(A, [lease("more", A, "x", 4, generation=9)], exp)
    assert not ok  # 12 on 8 before the fix
    # a broker whose view still holds generation 5 is refused on the new pool
    x2 = lease("stale", A, "x", 1, generation=5)
    pool_op(srds, k, A, "x", "patch", 16, "{}", 9, 10)
    assert not (await store.reserve(A, [x2], exp))[0]
    # a reservation whose pool generation went away before its confirmation is not confirmed
    granted = lease("granted", A, "x", 2, generation=9)
    assert (await store.reserve(A, [granted], exp))[0]
    assert pool_op(srds, k, A, "x", "remove", 9)[0] == 1
    pool_op(srds, k, A, "x", "upsert", 8, "{}", "m", "acme", 12, 12)
    assert await store.confirm([granted]) == ["granted"]
    # restored after a Redis loss: a lease of generation 9 takes nothing from generation 12
    srds.delete(k.lease(A, "granted"))
    assert await store.restore([(granted, 1)]) == 1
    assert int(srds.hget(k.pool(A, "x"), "leased")) == 0
