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


def setup_pools(srds: redis.Redis, k: Keys, pools: dict[tuple[str, str], int], ready: tuple[str, ...]) -> None:
    script = srds.register_script(read_lua("services.registry.lua", "pool.lua"))
    for (region, pool_id), units in pools.items():
        script(keys=[k.pool(region, pool_id), k.region_pools(region), k.heartbeats(region)],
               args=["upsert", 1000.0, pool_id, "", units, "{}", "m", "acme"])
    for region in ready:
        srds.set(k.leases_ready(region), "1")


def lease(lease_id: str, region: str, pool_id: str, units: int) -> LeaseInfo:
    now = datetime.now(UTC)
    return LeaseInfo(lease_id=lease_id, request_id="r", tenant="t", pool_id=pool_id, provider="acme",
                     region=region, model="m", units=units, billing="on_demand", unit_price=Decimal(1),
                     granted_at=now, expires_at=now + timedelta(hours=1))


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
