"""``heartbeats.lua`` (many pools of a region in one call, through ``PoolStore.heartbeat_many``)
does exactly what ``pool.lua``'s heartbeat does one pool at a time, on a real redis-server:
the same replies in the same order and the same pool hashes and heartbeat zset after,
whatever the pools' states (offline, draining, reported unhealthy, overcommitted, another
provider's, missing) and whatever the batch (unknown pools, a pool named twice, several
regions, batches longer than one call)."""

from __future__ import annotations

import asyncio
import uuid

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.keys import Keys
from services.common.redis_conn import connect, read_lua
from services.registry import store as store_module
from services.registry.store import HEALTHY_UNSAID, PoolStore, _transition

REGIONS = ("cn-yrd", "eu-west")
POOLS = [f"p{i}" for i in range(6)]

pool_states = st.fixed_dictionaries({
    "capacity": st.integers(1, 64), "provider": st.sampled_from(["acme", "zeta"]), "draining": st.booleans(),
    "offline": st.booleans(), "healthy": st.one_of(st.none(), st.integers(0, 80)), "leased": st.integers(0, 80),
})
worlds = st.dictionaries(st.tuples(st.sampled_from(REGIONS), st.sampled_from(POOLS)), pool_states, max_size=8)
beats = st.lists(st.tuples(st.sampled_from(REGIONS), st.sampled_from(POOLS + ["missing"]),
                           st.one_of(st.none(), st.integers(0, 80)), st.sampled_from(["", "acme", "zeta"])),
                 max_size=24)


def _keys_of(k: Keys, region: str, pool_id: str) -> list[str]:
    return [k.pool(region, pool_id), k.region_pools(region), k.heartbeats(region), k.pool_leases(region, pool_id),
            k.removed_pools(region)]


def _build(client: redis.Redis, script, k: Keys, world: dict) -> None:  # noqa: ANN001
    for (region, pool_id), s in world.items():
        keys = _keys_of(k, region, pool_id)
        script(keys=keys, args=["upsert", 1000.0, pool_id, "", s["capacity"], "{}", "m", s["provider"], 1, 1])
        if s["healthy"] is not None:
            script(keys=keys, args=["heartbeat", 1001.0, pool_id, "", s["healthy"]])
        if s["draining"]:
            script(keys=keys, args=["drain", 1002.0, pool_id, ""])
        client.hset(k.pool(region, pool_id), "leased", s["leased"])  # as the broker's scripts write it
        if s["offline"]:
            script(keys=keys, args=["expire", 1003.0, pool_id, "", 2000.0])


def _state(client: redis.Redis, k: Keys) -> tuple:
    pools = {(r, p): client.hgetall(k.pool(r, p)) for r in REGIONS for p in [*POOLS, "missing"]}
    zsets = {r: client.zrange(k.heartbeats(r), 0, -1, withscores=True) for r in REGIONS}
    return pools, zsets


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(world=worlds, batch=beats, per_call=st.integers(1, 10))
def test_one_call_per_region_does_what_one_call_per_pool_does(redis_url: str, world: dict, batch: list,
                                                                 per_call: int) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    script = client.register_script(read_lua("services.registry.lua", "pool.lua"))
    one, many = Keys(f"hb1{uuid.uuid4().hex[:8]}"), Keys(f"hbn{uuid.uuid4().hex[:8]}")
    _build(client, script, one, world)
    _build(client, script, many, world)
    assert _state(client, one) == _state(client, many)
    now = 5000.0
    expected = [_transition(script(keys=_keys_of(one, region, pool_id),
                                   args=["heartbeat", now, pool_id, provider,
                                         HEALTHY_UNSAID if healthy is None else healthy]))
                for region, pool_id, healthy, provider in batch]

    async def batched() -> list:
        rds = connect(redis_url, 4)
        try:
            return await PoolStore(rds, many).heartbeat_many(batch, now)
        finally:
            await rds.aclose()

    was = store_module.HEARTBEATS_PER_CALL
    store_module.HEARTBEATS_PER_CALL = per_call  # several calls per region, in order
    try:
        got = asyncio.run(batched())
    finally:
        store_module.HEARTBEATS_PER_CALL = was
    try:
        assert got == expected
        assert _state(client, one) == _state(client, many)
    finally:
        for k in (one, many):
            for region in REGIONS:
                client.delete(k.heartbeats(region), k.region_pools(region), k.removed_pools(region),
                              *(k.pool(region, p) for p in [*POOLS, "missing"]))
        client.close()
