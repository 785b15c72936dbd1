"""Invariants 1, 2 and 4 of docs/design.md with real processes: two broker processes behind
200 concurrent clients never overbook; a flushed Redis is rebuilt with every lease a
client was told about; an unrenewed lease's units come back."""

from __future__ import annotations

import asyncio
import random

import httpx
import msgspec

from services.common.keys import Keys
from services.common.messages import AllocEvent, LeaseGranted

from ..helpers import EventTap, eventually
from ..procs import service_process, service_processes
from .conftest import pool_body

POOLS = {f"p{i}": {"region": r, "model": m, "units": u, "prices": {"on_demand": p}}
         for i, (r, m, u, p) in enumerate([
             ("cn-gz", "huawei-ascend-910b", 16, "1.20"), ("cn-gz", "huawei-ascend-910b", 8, "1.20"),
             ("cn-yrd", "nvidia-a100-sxm-80gb", 16, "2.10"), ("us-east", "nvidia-h100-sxm-80gb", 8, "3.00"),
             ("eu-central", "amd-mi300x", 24, "2.50"), ("cn-nmg", "huawei-ascend-910b", 12, "1.00")])}
CAPACITY = {p: v["units"] for p, v in POOLS.items()}


async def _setup(registry_url: str, admin: dict) -> tuple[dict, dict]:
    async with httpx.AsyncClient(base_url=registry_url, headers=admin) as c:
        prov = {"Authorization": "Bearer " + (await c.post("/v1/keys", json={"role": "provider",
                                                                              "subject": "acme"})).json()["key"]}
        tenants = {}
        for t in ("t1", "t2", "t3", "t4"):
            tenants[t] = {"Authorization": "Bearer " + (await c.post("/v1/keys", json={
                "role": "tenant", "subject": t})).json()["key"]}
        for pool_id, over in POOLS.items():
            r = await c.put(f"/v1/pools/{pool_id}", json=pool_body(**over), headers=prov)
            assert r.status_code == 201, r.text
    return prov, tenants


async def _leased(redis_url: str, keys: Keys) -> dict[str, int]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        out = {}
        for pool_id, over in POOLS.items():
            out[pool_id] = int(await client.hget(keys.pool(over["region"], pool_id), "leased") or 0)
        return out
    finally:
        await client.aclose()


async def test_two_brokers_200_clients_never_overbook(settings, nc, subjects, tmp_path) -> None:
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    with service_process("registry", settings, tmp_path) as registry:
        _, tenants = await _setup(registry.url, admin)
        # all 200 clients at once, none shed (docs/overload.md): the point is contention
        crowded = msgspec.structs.replace(settings, max_in_flight=200)
        with service_processes([("broker", crowded), ("broker", crowded)], tmp_path) as (b1, b2):
            urls = [b1.url, b2.url]
            rng = random.Random(7)
            granted: list[dict] = []
            statuses: dict[int, int] = {}
            async with EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as tap:
                async def client(i: int) -> None:
                    tenant = f"t{1 + i % 4}"
                    async with httpx.AsyncClient(base_url=urls[i % 2], headers=tenants[tenant], timeout=30) as c:
                        for _ in range(3):
                            body = {"units": rng.choice([1, 2, 4, 8]), "queue": False}
                            if rng.random() < 0.3:
                                body["shape"] = {"kind": "split", "max_pools": 3, "max_regions": 2}
                            r = await c.post("/v1/requests", json=body)
                            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                            assert r.status_code in (201, 409), r.text
                            if r.status_code == 201:
                                granted.extend(r.json()["leases"])
                            if granted and rng.random() < 0.3:  # some clients give units back
                                lease = granted.pop(rng.randrange(len(granted)))
                                owner = tenants[lease["tenant"]]
                                await c.post(f"/v1/leases/{lease['lease_id']}/release", headers=owner)

                await asyncio.gather(*(client(i) for i in range(200)))
                assert statuses.get(201, 0) > 20 and statuses.get(409, 0) > 0, statuses
                leased = await _leased(settings.redis_url, Keys(settings.prefix))
                for pool_id, units in leased.items():
                    assert 0 <= units <= CAPACITY[pool_id], (pool_id, units)
                # every unit held in Redis is held by a lease a client was told about
                held: dict[str, int] = {}
                for lease in granted:
                    held[lease["pool_id"]] = held.get(lease["pool_id"], 0) + lease["units"]
                assert {p: held.get(p, 0) for p in POOLS} == leased
                grants = {e.lease.lease_id for e in tap.events if isinstance(e, LeaseGranted)}
                assert {lease["lease_id"] for lease in granted} <= grants


async def test_flushed_redis_is_rebuilt_with_every_lease(settings, nc, rds, tmp_path) -> None:
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    fast = msgspec.structs.replace(settings, sweep_interval_s=0.2)
    with service_processes([("registry", fast), ("broker", fast)], tmp_path) as (registry, broker):
        _, tenants = await _setup(registry.url, admin)
        leases = []
        async with httpx.AsyncClient(base_url=broker.url, headers=tenants["t1"], timeout=30) as c:
            for units in (8, 4, 2, 8, 16):
                r = await c.post("/v1/requests", json={"units": units, "queue": False})
                assert r.status_code == 201, r.text
                leases += r.json()["leases"]
            before = await _leased(settings.redis_url, Keys(settings.prefix))
            assert sum(before.values()) == 38
            keys = [k async for k in rds.scan_iter(match=f"{settings.prefix}:*", count=10_000)]
            await rds.delete(*keys)  # Redis lost everything of this deployment

            async def rebuilt() -> bool:
                return await _leased(settings.redis_url, Keys(settings.prefix)) == before

            await eventually(rebuilt, timeout=15)
            for lease in leases:
                r = await c.get(f"/v1/leases/{lease['lease_id']}")
                assert r.status_code == 200 and r.json()["units"] == lease["units"]
            # and placing works again, on top of the restored leases, without overbooking
            async def places() -> bool:
                r = await c.post("/v1/requests", json={"units": 1, "queue": False})
                return r.status_code == 201
            await eventually(places, timeout=15)
            after = await _leased(settings.redis_url, Keys(settings.prefix))
            assert all(after[p] <= CAPACITY[p] for p in POOLS)
