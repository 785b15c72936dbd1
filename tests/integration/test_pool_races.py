"""Issue 11's pool reproductions through the public HTTP API, with real NATS, JetStream,
Redis and apps: a pool removed and registered again under a live lease while the broker
was down, and two providers creating one pool id at the same moment."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
from litestar.testing import AsyncTestClient

from services.broker.app import create_app as create_broker
from services.cli.servers import free_port
from services.cli.supervisor import ServiceProcess
from services.common.keys import Keys
from services.common.messages import AllocEvent, CapacityEvent, LeaseLost, Pool, PoolOffline, PoolOnline
from services.common.settings import settings_to_env
from services.common.subjects import Subjects
from services.registry.app import create_app as create_registry

from ..helpers import EventTap, eventually
from .conftest import pool_body, with_settings

X = {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 8, "prices": {"on_demand": "1.20"}}


def _record_owner(entry) -> str:  # noqa: ANN001 - a KV entry
    return msgspec.json.decode(entry.value, type=Pool).provider


async def _key(registry: AsyncTestClient | httpx.AsyncClient, admin: dict[str, str], role: str, subject: str) -> dict[str, str]:
    r = await registry.post("/v1/keys", json={"role": role, "subject": subject}, headers=admin)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


async def test_pool_registered_again_under_a_live_lease_is_not_overbooked(settings, nc, subjects, rds) -> None:
    """A lease of 4 on 8-unit pool X; while the broker is down X is removed and registered
    again (8 units). Before: the broker never heard of the removal (core NATS), the old
    lease lived on, and releasing it gave its 4 units to the new X: 12 units leased on 8.
    Now: the broker ends the old lease (``lease.lost``) from the durable consumer when it
    comes back, and no lease ever touches a pool generation it was not granted on."""
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    async with AsyncTestClient(app=create_registry(settings)) as registry, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        provider = await _key(registry, admin, "provider", "acme")
        tenant = await _key(registry, admin, "tenant", "t1")
        assert (await registry.put("/v1/pools/x", json=X, headers=provider)).status_code == 201
        async with AsyncTestClient(app=create_broker(settings)) as broker:
            r = await broker.post("/v1/requests", json={"units": 4}, headers=tenant)
            assert r.status_code == 201, r.text
            old = r.json()["leases"][0]["lease_id"]
        # the broker is down: X is removed and registered again with the same id
        assert (await registry.delete("/v1/pools/x", headers=provider)).status_code == 200
        assert (await registry.put("/v1/pools/x", json=X, headers=provider)).status_code == 201
        async with AsyncTestClient(app=create_broker(settings)) as broker:
            r = await broker.post("/v1/requests", json={"units": 8, "queue": False}, headers=tenant)
            assert r.status_code == 201, r.text
            new = r.json()["leases"][0]["lease_id"]
            await broker.post(f"/v1/leases/{old}/release", headers=tenant)  # whatever it answers, nothing moves
            r = await broker.post("/v1/requests", json={"units": 4, "queue": False}, headers=tenant)
            assert r.status_code == 409, r.text  # 201 before the fix: 12 units leased on 8
            view = (await registry.get("/v1/pools/x", headers=admin)).json()
            assert view["leased"] == 8 and view["free"] == 0
            lost = await alloc.wait_for(lambda e: isinstance(e, LeaseLost) and e.lease.lease_id == old)
            assert "removed" in lost.reason
            live = {lease["lease_id"] for lease in (await broker.get("/v1/leases", headers=tenant)).json()}
            assert live == {new}


@contextlib.contextmanager
def registry_processes(settings, tmp_path: Path, n: int) -> Iterator[list[str]]:  # noqa: ANN001
    """``n`` registry replicas as real processes (an in-process test client serves one
    request at a time: no race could happen through it)."""
    env = {**settings_to_env(settings), "CB_LOG_LEVEL": "warning"}
    procs = [ServiceProcess("registry", free_port(), env, tmp_path / f"registry{i}.log") for i in range(n)]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_healthy(60)
        yield [proc.url for proc in procs]
    finally:
        for proc in procs:
            proc.stop()


async def test_two_providers_creating_one_pool_one_wins(settings, nc, rds, tmp_path) -> None:
    """Two providers PUT the same new pool id at the same moment, each through its own
    registry replica. Before: both got 2xx in about two of three tries, the second
    overwrote the first, and Redis and the durable record could disagree about the owner.
    Now: exactly one wins; the other is refused and changed nothing; Redis and the record
    name the same owner, also after Redis is lost and rebuilt from the record."""
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    keys = Keys(settings.prefix)
    kv = await nc.jetstream().key_value(Subjects(settings.prefix).bucket("pools"))
    tries = 20  # each try one race: before the fix both PUTs got a 2xx in most of them
    with registry_processes(settings, tmp_path, 2) as (url_one, url_two):
        async with httpx.AsyncClient(base_url=url_one, timeout=30) as one, \
                httpx.AsyncClient(base_url=url_two, timeout=30) as two:
            acme = await _key(one, admin, "provider", "acme")
            zeta = await _key(one, admin, "provider", "zeta")
            for attempt in range(tries):
                pool_id = f"race-{attempt}"
                a, z = await asyncio.gather(one.put(f"/v1/pools/{pool_id}", json=pool_body(units=16), headers=acme),
                                            two.put(f"/v1/pools/{pool_id}", json=pool_body(units=24), headers=zeta))
                codes = sorted((a.status_code, z.status_code))
                assert codes == [201, 403], (pool_id, a.text, z.text)
                winner, units = ("acme", 16) if a.status_code == 201 else ("zeta", 24)
                view = (await one.get(f"/v1/pools/{pool_id}", headers=admin)).json()
                assert (view["provider"], view["capacity"]) == (winner, units)
                assert await rds.hget(keys.pool("cn-yrd", pool_id), "provider") == winner
                assert _record_owner(await kv.get(pool_id)) == winner
            # Redis lost: the replicas rebuild it from the record, which names the owners
            stale = [k async for k in rds.scan_iter(match=f"{settings.prefix}:*", count=10_000)]
            await rds.delete(*stale)
            for attempt in range(tries):
                pool_id = f"race-{attempt}"
                owner = await eventually(lambda: rds.hget(keys.pool("cn-yrd", pool_id), "provider"),
                                         what=f"{pool_id} rebuilt")
                assert owner == _record_owner(await kv.get(pool_id))


async def test_the_same_provider_creating_twice_at_once_is_one_pool(settings, tmp_path) -> None:
    """Create-only is not create-once: the same owner's concurrent PUTs both succeed (the
    one that lost the create replaces), exactly one is 201, and the pool has one generation."""
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    with registry_processes(settings, tmp_path, 2) as (url_one, url_two):
        async with httpx.AsyncClient(base_url=url_one, timeout=30) as one, \
                httpx.AsyncClient(base_url=url_two, timeout=30) as two:
            acme = await _key(one, admin, "provider", "acme")
            for attempt in range(4):
                pool_id = f"twice-{attempt}"
                a, b = await asyncio.gather(one.put(f"/v1/pools/{pool_id}", json=pool_body(units=16), headers=acme),
                                            two.put(f"/v1/pools/{pool_id}", json=pool_body(units=16), headers=acme))
                assert sorted((a.status_code, b.status_code)) == [200, 201], (a.text, b.text)
                view = (await one.get(f"/v1/pools/{pool_id}", headers=admin)).json()
                assert view["generation"] == a.json()["generation"] == b.json()["generation"]


async def test_an_outage_while_the_broker_was_down_loses_only_the_leases_it_took(settings, nc, subjects) -> None:
    """Issue 11, item 7: a pool goes offline (and comes back) while no broker runs. Before:
    the broker heard ``pool.offline`` on core NATS only, so the lease lived on. Now the
    durable consumer delivers it when the broker is back, and it ends exactly the leases
    the outage took, not one granted after the pool came back."""
    fast = with_settings(settings, heartbeat_ttl_s=1.0, sweep_interval_s=0.1)
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    async with AsyncTestClient(app=create_registry(fast)) as registry, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc, \
            EventTap(nc.jetstream(), subjects.events("capacity"), CapacityEvent) as capacity:
        provider = await _key(registry, admin, "provider", "acme")
        tenant = await _key(registry, admin, "tenant", "t1")
        beating, paused = asyncio.Event(), asyncio.Event()
        beating.set()

        async def agent() -> None:  # the provider's agent: heartbeats while ``beating``
            while True:
                await beating.wait()
                await registry.post("/v1/pools/x/heartbeat", headers=provider)
                with contextlib.suppress(TimeoutError):  # the next beat after its interval (TTL 1 s), none once paused
                    await asyncio.wait_for(paused.wait(), 0.2)

        def pause(stop: bool) -> None:
            (beating.clear if stop else beating.set)()
            (paused.set if stop else paused.clear)()

        assert (await registry.put("/v1/pools/x", json=X, headers=provider)).status_code == 201
        task = asyncio.create_task(agent())
        try:
            async with AsyncTestClient(app=create_broker(fast)) as broker:
                r = await broker.post("/v1/requests", json={"units": 4}, headers=tenant)
                assert r.status_code == 201, r.text
                old = r.json()["leases"][0]["lease_id"]
            pause(True)  # the broker is down; the pool misses its heartbeats, then comes back
            offline = await capacity.wait_for(lambda e: isinstance(e, PoolOffline) and e.pool_id == "x")
            pause(False)
            await capacity.wait_for(lambda e: isinstance(e, PoolOnline) and e.pool_id == "x")
            async with AsyncTestClient(app=create_broker(fast)) as broker:
                lost = await alloc.wait_for(lambda e: isinstance(e, LeaseLost) and e.lease.lease_id == old)
                assert "offline" in lost.reason and offline.lease_ids == (old,)  # the outage names what it took
                r = await broker.post("/v1/requests", json={"units": 2, "queue": False}, headers=tenant)
                assert r.status_code == 201, r.text
                new = r.json()["leases"][0]["lease_id"]
                assert (await broker.get(f"/v1/leases/{new}", headers=tenant)).status_code == 200
                assert (await broker.get(f"/v1/leases/{old}", headers=tenant)).status_code == 404
                assert not any(isinstance(e, LeaseLost) and e.lease.lease_id == new for e in alloc.events)
        finally:
            task.cancel()
