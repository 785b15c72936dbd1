"""Registry pool lifecycle through real HTTP, NATS JetStream and Redis."""

from __future__ import annotations

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from services.common.keys import Keys
from services.common.messages import CapacityEvent, PoolOffline, PoolOnline, PoolRegistered, PoolRemoved, PoolUpdated
from services.registry.app import create_app

from ..helpers import EventTap
from .conftest import MODEL, REGION, Api, with_settings


async def test_register_get_and_event(registry_api: Api, nc, subjects) -> None:
    prov = await registry_api.key("provider", "acme")
    async with EventTap(nc.jetstream(), subjects.events("capacity"), CapacityEvent) as tap:
        r = await registry_api.put_pool("acme-p1", prov)
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["provider"] == "acme" and body["free"] == 16 and body["status"] == "online"
        assert body["accelerator"]["model"] == MODEL and body["spec"]["prices"]["on_demand"] == "2.10"
        event = await tap.wait_for(lambda e: isinstance(e, PoolRegistered))
        assert event.pool_id == "acme-p1" and event.region == REGION and event.free == 16
        assert event.pool.spec.prices.on_demand == msgspec.json.decode(b'"2.10"', type=__import__("decimal").Decimal)
    # the subject carries region and provider
    msg = await nc.jetstream().get_last_msg(subjects.stream("capacity"), subjects.capacity(REGION, "acme"))
    assert b"pool.registered" in msg.data

    first = body
    r = await registry_api.put_pool("acme-p1", prov, units=24)
    # a replacement is the same generation (one registration), at a later record revision
    assert r.status_code == 200 and r.json()["capacity"] == 24 and r.json()["generation"] == first["generation"]
    assert r.json()["revision"] > first["revision"] >= first["generation"] >= 1
    r = await registry_api.client.get("/v1/pools/acme-p1", headers=prov)
    assert r.status_code == 200 and r.json()["free"] == 24
    # removed and registered again: a new, higher generation
    assert (await registry_api.client.delete("/v1/pools/acme-p1", headers=prov)).status_code == 200
    r = await registry_api.put_pool("acme-p1", prov)
    assert r.status_code == 201 and r.json()["generation"] > first["generation"]


async def test_patch_drain_undrain_remove(registry_api: Api, nc, subjects) -> None:
    prov = await registry_api.key("provider", "acme")
    assert (await registry_api.put_pool("acme-p2", prov)).status_code == 201
    async with EventTap(nc.jetstream(), subjects.events("capacity"), CapacityEvent) as tap:
        r = await registry_api.client.patch("/v1/pools/acme-p2", json={"units": 8, "prices": {"on_demand": "1.5"}},
                                            headers=prov)
        assert r.status_code == 200, r.text
        assert r.json()["capacity"] == 8 and r.json()["spec"]["prices"]["on_demand"] == "1.5"
        await tap.wait_for(lambda e: isinstance(e, PoolUpdated) and e.pool.spec.units == 8)

        r = await registry_api.client.post("/v1/pools/acme-p2/drain", headers=prov)
        assert r.status_code == 200 and r.json()["status"] == "draining" and r.json()["free"] == 0
        await tap.wait_for(lambda e: e.__class__.__name__ == "PoolDraining")
        r = await registry_api.client.delete("/v1/pools/acme-p2/drain", headers=prov)
        assert r.json()["status"] == "online" and r.json()["free"] == 8
        await tap.wait_for(lambda e: isinstance(e, PoolOnline))

        r = await registry_api.client.delete("/v1/pools/acme-p2", headers=prov)
        assert r.status_code == 200
        await tap.wait_for(lambda e: isinstance(e, PoolRemoved) and e.pool_id == "acme-p2")
    assert (await registry_api.client.get("/v1/pools/acme-p2", headers=prov)).status_code == 404
    assert (await registry_api.client.delete("/v1/pools/acme-p2", headers=prov)).status_code == 404


async def test_shrink_below_leased_reports_overcommit(registry_api: Api, settings, rds) -> None:
    prov = await registry_api.key("provider", "acme")
    assert (await registry_api.put_pool("acme-p3", prov, units=16)).status_code == 201
    # what the broker's reservation script does to a pool: 12 units leased
    key = Keys(settings.prefix).pool(REGION, "acme-p3")
    await rds.hset(key, mapping={"leased": 12})
    r = await registry_api.client.patch("/v1/pools/acme-p3", json={"units": 8}, headers=prov)
    assert r.status_code == 200
    assert r.json()["free"] == 0 and r.json()["overcommit"] == 4 and r.json()["leased"] == 12
    # a heartbeat reporting fewer healthy units also never drives free below zero
    r = await registry_api.client.patch("/v1/pools/acme-p3", json={"units": 16}, headers=prov)
    assert r.json()["free"] == 4 and r.json()["overcommit"] == 0
    r = await registry_api.client.post("/v1/pools/acme-p3/heartbeat", json={"healthy_units": 10}, headers=prov)
    assert r.status_code == 200 and r.json()["free"] == 0
    view = (await registry_api.client.get("/v1/pools/acme-p3", headers=prov)).json()
    assert view["healthy"] == 10 and view["overcommit"] == 2


async def test_liveness_offline_then_online(settings, nc, subjects) -> None:
    fast = with_settings(settings, heartbeat_ttl_s=0.5, sweep_interval_s=0.1)
    async with AsyncTestClient(app=create_app(fast)) as client:
        api = Api(client, fast.admin_key or "")
        prov = await api.key("provider", "acme")
        async with EventTap(nc.jetstream(), subjects.events("capacity"), CapacityEvent) as tap:
            assert (await api.put_pool("acme-live", prov)).status_code == 201
            offline = await tap.wait_for(lambda e: isinstance(e, PoolOffline) and e.pool_id == "acme-live")
            assert offline.provider == "acme"
            view = (await client.get("/v1/pools/acme-live", headers=prov)).json()
            assert view["status"] == "offline" and view["free"] == 0
            r = await client.post("/v1/pools/acme-live/heartbeat", headers=prov)
            assert r.status_code == 200 and r.json()["status"] == "online"
            await tap.wait_for(lambda e: isinstance(e, PoolOnline) and e.pool_id == "acme-live")
            # exactly one offline event, however many sweeps ran
            assert sum(isinstance(e, PoolOffline) for e in tap.events) == 1


async def test_batch_heartbeat(registry_api: Api) -> None:
    prov = await registry_api.key("provider", "acme")
    other = await registry_api.key("provider", "zeta")
    for i in range(3):
        assert (await registry_api.put_pool(f"acme-b{i}", prov)).status_code == 201
    assert (await registry_api.put_pool("zeta-b0", other)).status_code == 201
    r = await registry_api.client.post("/v1/heartbeats", headers=prov, json={
        "pools": ["acme-b0", "acme-b1", "acme-b2", "zeta-b0", "nope"], "healthy_units": {"acme-b1": 4}})
    assert r.status_code == 200, r.text
    assert r.json()["pools"] == {"acme-b0": "online", "acme-b1": "online", "acme-b2": "online",
                                 "zeta-b0": "forbidden", "nope": "not_found"}
    assert (await registry_api.client.get("/v1/pools/acme-b1", headers=prov)).json()["free"] == 4


async def test_search_filters_and_pages(registry_api: Api) -> None:
    prov = await registry_api.key("provider", "acme")
    for i in range(7):
        region = "cn-yrd" if i % 2 else "us-east"
        assert (await registry_api.put_pool(f"acme-s{i}", prov, region=region, units=8 + i)).status_code == 201
    await registry_api.client.post("/v1/pools/acme-s3/drain", headers=prov)
    get = registry_api.client.get
    r = (await get("/v1/pools", params={"region": "cn-yrd"}, headers=prov)).json()
    assert r["total"] == 3 and {p["pool_id"] for p in r["items"]} == {"acme-s1", "acme-s3", "acme-s5"}
    r = (await get("/v1/pools", params={"status": "online", "min_free": 12}, headers=prov)).json()
    assert {p["pool_id"] for p in r["items"]} == {"acme-s4", "acme-s5", "acme-s6"}
    r = (await get("/v1/pools", params={"vendor": "nvidia", "stack": "cuda"}, headers=prov)).json()
    assert r["total"] == 7
    assert (await get("/v1/pools", params={"vendor": "amd"}, headers=prov)).json()["total"] == 0
    seen, cursor = [], None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = (await get("/v1/pools", params=params, headers=prov)).json()
        seen += [p["pool_id"] for p in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(f"acme-s{i}" for i in range(7))


async def test_rebuild_after_redis_loss(registry_api: Api, settings, rds) -> None:
    prov = await registry_api.key("provider", "acme")
    assert (await registry_api.put_pool("acme-r1", prov, units=32)).status_code == 201
    keys = [k async for k in rds.scan_iter(match=f"{settings.prefix}:*", count=10_000)]
    assert keys
    await rds.delete(*keys)  # this test's whole slice of Redis is gone
    # the API key still works (refilled from the durable bucket) ...
    async def back() -> bool:
        r = await registry_api.client.get("/v1/pools/acme-r1", headers=prov)
        return r.status_code == 200 and r.json()["capacity"] == 32

    from ..helpers import eventually
    await eventually(back)


async def test_event_dedup_by_id(nc, subjects) -> None:
    from datetime import UTC, datetime

    from services.common.nats_conn import publish_event

    js = nc.jetstream()
    event = PoolOffline(id="ev-fixed-1", at=datetime.now(UTC), pool_id="p", provider="acme", region=REGION)
    first = await publish_event(js, subjects.capacity(REGION, "acme"), event)
    second = await publish_event(js, subjects.capacity(REGION, "acme"), event)
    assert first == second
    info = await js.stream_info(subjects.stream("capacity"))
    assert info.state.messages == 1


@pytest.mark.parametrize("model_region", [("nvidia-a100-sxm-80gb", "us-east"), ("huawei-ascend-910b", "cn-gz")])
async def test_catalogue_and_topology_endpoints(registry_api: Api, model_region) -> None:
    get = registry_api.client.get
    accs = (await get("/v1/accelerators")).json()
    assert len(accs) >= 24 and len({a["vendor"] for a in accs}) >= 7
    model, region = model_region
    assert (await get(f"/v1/accelerators/{model}")).status_code == 200
    regions = (await get("/v1/regions")).json()
    assert region in {r["id"] for r in regions}
    links = (await get("/v1/network", params={"src": region})).json()
    assert len(links) == len(regions) and all(link["src"] == region for link in links)
    assert (await get("/v1/network", params={"src": "atlantis"})).status_code == 400


async def test_metrics_and_health(registry_api: Api) -> None:
    prov = await registry_api.key("provider", "acme")
    await registry_api.put_pool("acme-m1", prov)
    await registry_api.client.post("/v1/pools/acme-m1/heartbeat", headers=prov)
    r = await registry_api.client.get("/metrics")
    assert r.status_code == 200
    assert 'cb_requests_total{app_name="registry"' in r.text
    assert "acme-m1" not in r.text  # grouped by route template, ids never become labels
    assert 'cb_registry_heartbeats_total{outcome="ok"}' in r.text
    health = (await registry_api.client.get("/health")).json()
    assert health["status"] == "ok" and health["service"] == "registry"


async def test_replica_with_stale_region_cache(settings, nc) -> None:
    """One replica caches where a pool lives; another removes it and it is registered
    again in another region. The first replica must follow, not answer 404."""
    async with AsyncTestClient(app=create_app(settings)) as one, AsyncTestClient(app=create_app(settings)) as two:
        api1, api2 = Api(one, settings.admin_key or ""), Api(two, settings.admin_key or "")
        prov = await api1.key("provider", "acme")
        assert (await api1.put_pool("acme-mv", prov, region="cn-yrd")).status_code == 201
        assert (await one.post("/v1/pools/acme-mv/heartbeat", headers=prov)).status_code == 200  # cached
        assert (await two.delete("/v1/pools/acme-mv", headers=prov)).status_code == 200
        assert (await api2.put_pool("acme-mv", prov, region="us-east")).status_code == 201
        assert (await one.get("/v1/pools/acme-mv", headers=prov)).json()["region"] == "us-east"
        r = await one.post("/v1/pools/acme-mv/heartbeat", headers=prov)
        assert r.status_code == 200, r.text
        assert (await one.get("/v1/pools/acme-mv", headers=prov)).json()["region"] == "us-east"


async def test_operator_topology_file(settings, nc, tmp_path) -> None:
    import json

    topo = {"regions": [
        {"id": "dc-north", "name": "North DC", "country": "NO", "lat": 59.9, "lon": 10.7, "kind": "cloud"},
        {"id": "dc-south", "name": "South DC", "country": "ZA", "lat": -33.9, "lon": 18.4, "kind": "cloud"}],
        "links": [{"src": "dc-north", "dst": "dc-south", "latency_ms": 190, "bandwidth_gbps": 5,
                   "egress_per_gb": "0.12", "derived": False}]}
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(topo))
    async with AsyncTestClient(app=create_app(with_settings(settings, topology_file=str(path)))) as client:
        regions = (await client.get("/v1/regions")).json()
        assert {r["id"] for r in regions} == {"dc-north", "dc-south"}
        links = (await client.get("/v1/network", params={"src": "dc-north", "dst": "dc-south"})).json()
        assert links == [{"src": "dc-north", "dst": "dc-south", "latency_ms": 190.0, "bandwidth_gbps": 5.0,
                          "egress_per_gb": "0.12", "currency": "USD", "derived": False}]
        back = (await client.get("/v1/network", params={"src": "dc-south", "dst": "dc-north"})).json()[0]
        assert back["derived"] is True  # the other direction comes from the distance model
        api = Api(client, settings.admin_key or "")
        prov = await api.key("provider", "acme")
        assert (await api.put_pool("acme-n1", prov, region="dc-north")).status_code == 201
        assert (await api.put_pool("acme-n2", prov, region="cn-yrd")).status_code == 422
