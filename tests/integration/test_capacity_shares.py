"""The capacity view of pools that share devices (issue 14, docs/sharing.md), through the
registry's real HTTP API on real Redis: whole free (devices with all 1000 milli free) vs
fragmented free (milli left on devices partly taken), per region × model and per pool,
read from the per-device hashes (written here by hand, as the reservation scripts would)."""

from __future__ import annotations

import redis.asyncio as aioredis

from services.common.keys import Keys
from services.common.settings import Settings

from .conftest import MODEL, REGION, Api

ASCEND = "huawei-ascend-910b"


async def put(api: Api, provider: dict[str, str], pool_id: str, **over: object) -> None:
    r = await api.put_pool(pool_id, provider, **over)
    assert r.status_code in (200, 201), r.text


async def test_capacity_shows_whole_and_fragmented_free(settings: Settings, registry_api: Api) -> None:
    api = registry_api
    provider, ops = await api.key("provider", "acme"), await api.key("ops")
    await put(api, provider, "s-mem", units=8, sharing={"mode": "time_slice", "min_milli": 100})
    await put(api, provider, "w-1", units=16)  # whole devices only: no per-device state
    await put(api, provider, "s-gz", region="cn-gz", model=ASCEND, units=4, units_per_node=4,
              sharing={"mode": "memory", "min_milli": 250})
    keys = Keys(settings.prefix)
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        # s-mem: devices 2 and 4 partly taken (250 and 600 free), device 3 taken whole
        # (device 9, past the capacity of 8: the pool shrank under a lease still on it, offers nothing)
        taken = {0: 1000, 1: 1000, 2: 250, 3: 0, 4: 600, 5: 1000, 6: 1000, 7: 1000, 9: 500}
        await redis.hset(keys.pool_devices(REGION, "s-mem"), mapping=taken)
        await redis.hset(keys.pool(REGION, "s-mem"), mapping={"free": 5, "leased": 3})
        await redis.hset(keys.pool_devices("cn-gz", "s-gz"), mapping=dict.fromkeys(range(4), 1000))
    finally:
        await redis.aclose()

    r = await api.client.get("/v1/capacity", headers=ops)
    assert r.status_code == 200, r.text
    summary = r.json()
    cells = {(c["region"], c["model"]): c for c in summary["cells"]}
    yrd = cells[(REGION, MODEL)]
    assert (yrd["pools"], yrd["capacity"], yrd["free"], yrd["leased"]) == (2, 24, 21, 3)
    assert (yrd["shared_pools"], yrd["fragmented_devices"], yrd["fragmented_milli"], yrd["largest_slice"]) == \
        (1, 2, 850, 600)
    gz = cells[("cn-gz", ASCEND)]
    assert (gz["free"], gz["shared_pools"], gz["fragmented_devices"], gz["fragmented_milli"]) == (4, 1, 0, 0)
    t = summary["totals"]
    assert (t["free"], t["shared_pools"], t["fragmented_devices"], t["fragmented_milli"], t["largest_slice"]) == \
        (25, 2, 2, 850, 600)
    # per pool, the most fragmented first; pools that do not share are not listed
    assert [(p["pool_id"], p["region"], p["devices"], p["whole_free"], p["fragmented_devices"],
             p["fragmented_milli"], p["largest_slice"]) for p in summary["shared"]] == [
        ("s-mem", REGION, 8, 5, 2, 850, 600), ("s-gz", "cn-gz", 4, 4, 0, 0, 0)]
    assert summary["shared"][0]["model"] == MODEL and summary["shared"][0]["status"] == "online"

    # the scrape-time gauge says the same
    metrics = (await api.client.get("/metrics")).text
    assert f'cb_capacity_fragmented_milli{{model="{MODEL}",region="{REGION}"}} 850.0' in metrics
