"""Invariants 5 and 6 for the registry: bad input gets a 4xx with a reason and changes
nothing; nobody acts outside their role."""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from services.common.messages import CapacityEvent
from services.registry.app import create_app

from ..helpers import EventTap
from .conftest import Api, pool_body, with_settings

BAD_BODIES = {
    "unknown model": pool_body(model="nvidia-h9000"),
    "unknown region": pool_body(region="atlantis"),
    "zero units": pool_body(units=0),
    "negative units": pool_body(units=-8),
    "absurd units": pool_body(units=10**9),
    "zero price": pool_body(prices={"on_demand": "0"}),
    "negative price": pool_body(prices={"on_demand": "-1"}),
    "float-ish junk price": pool_body(prices={"on_demand": "abc"}),
    "too many decimals": pool_body(prices={"on_demand": "1.1234567"}),
    "bad currency": pool_body(prices={"on_demand": "1", "currency": "dollars"}),
    "unknown field": pool_body(colour="blue"),
    "unknown price field": pool_body(prices={"on_demand": "1", "discount": "2"}),
    "wrong type": pool_body(units="sixteen"),
    "missing prices": {k: v for k, v in pool_body().items() if k != "prices"},
    "per-node above units": pool_body(units=4, units_per_node=8),
    "bad host arch": pool_body(host_arch="sparc"),
    "malformed region id": pool_body(region="CN YRD!"),
    "not an object": [1, 2, 3],
}


async def _world(api: Api, headers) -> tuple[int, int]:
    page = (await api.client.get("/v1/pools", headers=headers)).json()
    return page["total"], sum(p["capacity"] for p in page["items"])


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
async def test_bad_pool_bodies_are_4xx_and_change_nothing(registry_api: Api, nc, subjects, case: str) -> None:
    prov = await registry_api.key("provider", "acme")
    assert (await registry_api.put_pool("acme-ok", prov)).status_code == 201
    before = await _world(registry_api, prov)
    async with EventTap(nc.jetstream(), subjects.events("capacity"), CapacityEvent) as tap:
        await tap.wait_for(lambda e: e.pool_id == "acme-ok")
        n_events = len(tap.events)
        for pool_id in ("acme-new", "acme-ok"):  # neither a new pool nor a replacement
            r = await registry_api.client.put(f"/v1/pools/{pool_id}", json=BAD_BODIES[case], headers=prov)
            assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
            problem = r.json()
            assert problem["status"] == r.status_code and problem["detail"], problem
            assert r.headers["content-type"].startswith("application/problem+json")
        assert await _world(registry_api, prov) == before
        assert len(tap.events) == n_events


@pytest.mark.parametrize("pool_id", ["UPPER", "has.dot", "a" * 64, "-leading", "sp ace", "x*"])
async def test_malformed_pool_ids(registry_api: Api, pool_id: str) -> None:
    prov = await registry_api.key("provider", "acme")
    r = await registry_api.client.put(f"/v1/pools/{pool_id}", json=pool_body(), headers=prov)
    assert r.status_code == 400 and "malformed pool id" in r.json()["detail"]


async def test_bad_patch_and_heartbeat(registry_api: Api) -> None:
    prov = await registry_api.key("provider", "acme")
    await registry_api.put_pool("acme-x", prov)
    c = registry_api.client
    for body in ({}, {"units": 0}, {"region": "us-east"}, {"prices": {"on_demand": "-2"}}, {"units": "x"}):
        r = await c.patch("/v1/pools/acme-x", json=body, headers=prov)
        assert 400 <= r.status_code < 500, (body, r.text)
    for body in ({"healthy_units": -1}, {"bogus": 1}):
        r = await c.post("/v1/pools/acme-x/heartbeat", json=body, headers=prov)
        assert 400 <= r.status_code < 500, (body, r.text)
    r = await c.post("/v1/heartbeats", json={"pools": []}, headers=prov)
    assert r.status_code == 400
    r = await c.post("/v1/heartbeats", json={"pools": ["acme-x"], "healthy_units": {"zzz": 1}}, headers=prov)
    assert r.status_code == 400
    view = (await c.get("/v1/pools/acme-x", headers=prov)).json()
    assert view["capacity"] == 16 and view["generation"] == 1 and view["healthy"] is None
    # moving a pool between regions is refused: its leases live in the old region
    r = await registry_api.put_pool("acme-x", prov, region="us-east")
    assert r.status_code == 409


async def test_oversized_body(settings, nc) -> None:
    small = with_settings(settings, max_body_bytes=2048)
    async with AsyncTestClient(app=create_app(small)) as client:
        api = Api(client, small.admin_key or "")
        prov = await api.key("provider", "acme")
        body = pool_body(zone="z" * 4000)
        r = await client.put("/v1/pools/acme-big", json=body, headers=prov)
        assert r.status_code == 413
        assert (await client.get("/v1/pools/acme-big", headers=prov)).status_code == 404


async def test_auth_and_ownership(registry_api: Api) -> None:
    c = registry_api.client
    acme = await registry_api.key("provider", "acme")
    zeta = await registry_api.key("provider", "zeta")
    tenant = await registry_api.key("tenant", "t1")
    ops = await registry_api.key("ops")
    assert (await registry_api.put_pool("acme-own", acme)).status_code == 201

    assert (await c.get("/v1/pools")).status_code == 401
    assert (await c.get("/v1/pools", headers={"Authorization": "Bearer nope"})).status_code == 401
    assert (await c.get("/v1/pools", headers={"Authorization": "Basic abc"})).status_code == 401
    # another provider can neither change nor remove it, nor register under acme's name
    assert (await c.patch("/v1/pools/acme-own", json={"units": 1}, headers=zeta)).status_code == 403
    assert (await c.post("/v1/pools/acme-own/heartbeat", headers=zeta)).status_code == 403
    assert (await c.post("/v1/pools/acme-own/drain", headers=zeta)).status_code == 403
    assert (await c.delete("/v1/pools/acme-own", headers=zeta)).status_code == 403
    assert (await registry_api.put_pool("acme-own", zeta)).status_code == 403
    assert (await registry_api.put_pool("zeta-1", zeta, provider="acme")).status_code == 403
    # tenants and ops read, never write
    assert (await c.get("/v1/pools/acme-own", headers=tenant)).status_code == 200
    assert (await registry_api.put_pool("t-pool", tenant)).status_code == 403
    assert (await c.delete("/v1/pools/acme-own", headers=ops)).status_code == 403
    # only admin issues keys
    for who in (acme, tenant, ops):
        assert (await c.post("/v1/keys", json={"role": "admin"}, headers=who)).status_code == 403
    # admin registers on behalf of a provider, and must say which
    assert (await registry_api.put_pool("acme-adm", registry_api.admin)).status_code == 422
    r = await registry_api.put_pool("acme-adm", registry_api.admin, provider="acme")
    assert r.status_code == 201 and r.json()["provider"] == "acme"
    assert (await c.patch("/v1/pools/acme-own", json={"units": 8}, headers=registry_api.admin)).status_code == 200
    view = (await c.get("/v1/pools/acme-own", headers=acme)).json()
    assert view["capacity"] == 8 and view["provider"] == "acme"


async def test_key_issue_validation_and_revocation(registry_api: Api) -> None:
    c, admin = registry_api.client, registry_api.admin
    for body in ({"role": "provider"}, {"role": "tenant", "subject": "Bad Id"}, {"role": "ops", "subject": "x"},
                 {"role": "root"}, {"role": "admin", "extra": 1}):
        r = await c.post("/v1/keys", json=body, headers=admin)
        assert r.status_code in (400, 422), (body, r.text)
    r = await c.post("/v1/keys", json={"role": "provider", "subject": "acme"}, headers=admin)
    key, key_id = r.json()["key"], r.json()["key_id"]
    h = {"Authorization": f"Bearer {key}"}
    assert (await c.get("/v1/pools", headers=h)).status_code == 200
    assert (await c.delete(f"/v1/keys/{key_id}", headers=admin)).status_code == 200
    assert (await c.get("/v1/pools", headers=h)).status_code == 401
    assert (await c.delete(f"/v1/keys/{key_id}", headers=admin)).status_code == 404


async def test_bulk_is_all_or_nothing(registry_api: Api) -> None:
    c = registry_api.client
    acme = await registry_api.key("provider", "acme")
    zeta = await registry_api.key("provider", "zeta")
    assert (await registry_api.put_pool("zeta-taken", zeta)).status_code == 201
    good = [{"pool_id": f"acme-k{i}", **pool_body()} for i in range(5)]
    for bad_item, status in (({"pool_id": "zeta-taken", **pool_body()}, 403),
                             ({"pool_id": "acme-k9", **pool_body(model="nope")}, 422),
                             ({"pool_id": "acme-k0", **pool_body()}, 400),  # duplicate id in the batch
                             ({"pool_id": "BAD ID", **pool_body()}, 400)):
        r = await c.post("/v1/pools/bulk", json=[*good, bad_item], headers=acme)
        assert r.status_code == status, (bad_item["pool_id"], r.text)
        assert (await c.get("/v1/pools", params={"provider": "acme"}, headers=acme)).json()["total"] == 0
    r = await c.post("/v1/pools/bulk", json=good, headers=acme)
    assert r.status_code == 201 and r.json() == {"created": 5, "updated": 0}
    view = (await c.get("/v1/pools/zeta-taken", headers=zeta)).json()
    assert view["provider"] == "zeta" and view["generation"] == 1


async def test_revocation_reaches_every_replica_at_once(settings, nc) -> None:
    async with AsyncTestClient(app=create_app(settings)) as one, AsyncTestClient(app=create_app(settings)) as two:
        admin = {"Authorization": f"Bearer {settings.admin_key}"}
        r = await one.post("/v1/keys", json={"role": "tenant", "subject": "t1"}, headers=admin)
        h = {"Authorization": f"Bearer {r.json()['key']}"}
        # both replicas have the key cached now
        assert (await one.get("/v1/pools", headers=h)).status_code == 200
        assert (await two.get("/v1/pools", headers=h)).status_code == 200
        assert (await one.delete(f"/v1/keys/{r.json()['key_id']}", headers=admin)).status_code == 200

        from ..helpers import eventually

        async def refused() -> bool:
            return (await two.get("/v1/pools", headers=h)).status_code == 401

        await eventually(refused, timeout=1.0)  # well inside the 5 s cache TTL
