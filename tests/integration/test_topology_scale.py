"""The topology at scale (issue 15, item 2) and reads that cost nothing (issue 16, item 5).

The registry keeps the topology in its ``regions`` bucket, one key per region, and every
service follows it; nothing sends the topology as one message (which passed NATS's 1 MB
limit at about 88 regions), and no read opens a consumer (anonymous ``GET /v1/regions``
once opened one each, living 5 minutes)."""

from __future__ import annotations

import asyncio
import time

import msgspec
from litestar.testing import AsyncTestClient

from services.broker.app import create_app as create_broker
from services.common.settings import Settings
from services.common.subjects import Subjects
from services.registry.app import create_app as create_registry

from ..helpers import eventually
from .conftest import pool_body

COUNTRIES = ("US", "DE", "BR", "IN", "JP", "AU", "ZA", "CA", "FR", "SG")


def grid_regions(n: int) -> list[dict]:
    """``n`` regions on a grid over the inhabited latitudes, 100 to a row (~3.6° apart)."""
    return [{"id": f"g{i:05d}", "name": f"grid {i}", "country": COUNTRIES[(i // 100) % len(COUNTRIES)],
             "lat": round(-60 + (i // 100) * (125 / max(1, (n - 1) // 100)), 3),
             "lon": round(-179 + (i % 100) * 3.58, 3)} for i in range(n)]


def admin(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.admin_key}"}


async def key(client: AsyncTestClient, settings: Settings, role: str, subject: str) -> dict[str, str]:
    r = await client.post("/v1/keys", json={"role": role, "subject": subject}, headers=admin(settings))
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


async def consumers(nc, settings: Settings) -> int:
    info = await nc.jetstream().stream_info(f"KV_{Subjects(settings.prefix).bucket('regions')}")
    return info.state.consumer_count


async def place_near_users(settings: Settings, registry: AsyncTestClient, users: str, near: str,
                           far: str) -> None:
    """Two pools, the far one cheaper; a broker started now must place an ask with a
    latency bound on the near one."""
    prov = await key(registry, settings, "provider", "acme")
    for pool_id, region, price in (("acme-near", near, "3.00"), ("acme-far", far, "1.00")):
        body = pool_body(region=region, prices={"currency": "USD", "on_demand": price})
        r = await registry.put(f"/v1/pools/{pool_id}", json=body, headers=prov)
        assert r.status_code == 201, r.text
    tenant = await key(registry, settings, "tenant", "t1")
    t0 = time.perf_counter()
    async with AsyncTestClient(app=create_broker(settings)) as broker:
        started = time.perf_counter() - t0
        ask = {"units": 8, "placement": {"users_region": users, "max_latency_ms": 25}}
        r = await broker.post("/v1/quotes", json=ask, headers=tenant)
        assert r.status_code == 200, r.text
        pools = {a["pool_id"] for o in r.json()["options"] for a in o["allocations"]}
        assert pools == {"acme-near"}, r.json()
        r = await broker.post("/v1/requests", json=ask, headers=tenant)
        assert r.status_code == 201, r.text
        assert [lease["pool_id"] for lease in r.json()["leases"]] == ["acme-near"]
        # without the bound the cheaper, far pool wins: the bound is what decided
        r = await broker.post("/v1/quotes", json={"units": 8}, headers=tenant)
        assert r.json()["options"][0]["allocations"][0]["pool_id"] == "acme-far", r.text
    assert started < 20, f"broker took {started:.1f}s to start"


async def test_broker_starts_after_regions_were_added_one_by_one(settings: Settings, nc) -> None:
    """The reproduction of the issue: about 110 regions added at run time made the
    topology one NATS message over 1 MB, and a broker starting then never got it
    ("registry did not answer topology")."""
    regions = grid_regions(150)
    async with AsyncTestClient(app=create_registry(settings)) as registry:
        for region in regions:
            r = await registry.put(f"/v1/regions/{region['id']}", json=region, headers=admin(settings))
            assert r.status_code == 200, r.text
        # g00051 is ~200 km from g00050 (~5 ms RTT); g00149 is on another continent
        await place_near_users(settings, registry, users="g00050", near="g00051", far="g00149")


async def test_five_thousand_region_world(settings: Settings, nc) -> None:
    """5,000 regions: a registry and a broker start on them, and a placement bounded by
    latency succeeds."""
    regions = grid_regions(5000)
    async with AsyncTestClient(app=create_registry(settings)) as first:
        r = await first.post("/v1/regions/bulk", json=regions, headers=admin(settings), timeout=60)
        assert r.status_code == 200, r.text
        assert r.json() == {"written": 5000, "unchanged": 0}
    t0 = time.perf_counter()
    async with AsyncTestClient(app=create_registry(settings)) as registry:  # a registry (re)starting on them
        assert time.perf_counter() - t0 < 15
        listed = (await registry.get("/v1/regions")).json()
        assert {r["id"] for r in regions} <= {r["id"] for r in listed}
        r = await registry.get("/v1/network", params={"src": "g02550"})
        assert r.status_code == 200 and len(r.json()) == len(listed)
        r = await registry.get("/v1/network")  # the whole mesh would be 25 million links
        assert r.status_code == 400 and "src=" in r.text
        await place_near_users(settings, registry, users="g02550", near="g02551", far="g00000")


async def test_anonymous_reads_cost_no_consumer(settings: Settings, nc) -> None:
    """A flood of anonymous topology reads leaves the bucket's consumers as they were,
    and a region added at run time stays: in this registry, in one started afterwards,
    and in a broker started afterwards."""
    region = {"id": "zz-runtime", "name": "added at run time", "country": "NO", "lat": 59.9, "lon": 10.7}
    async with AsyncTestClient(app=create_registry(settings)) as registry:
        r = await registry.put("/v1/regions/zz-runtime", json=region, headers=admin(settings))
        assert r.status_code == 200, r.text
        before = await consumers(nc, settings)
        for _ in range(30):
            got = await asyncio.gather(*(registry.get("/v1/regions") for _ in range(50)),
                                       registry.get("/v1/network", params={"src": "zz-runtime"}))
            assert all(r.status_code == 200 for r in got)
        assert await consumers(nc, settings) == before
        assert "zz-runtime" in {r["id"] for r in (await registry.get("/v1/regions")).json()}
    async with AsyncTestClient(app=create_registry(settings)) as registry:
        assert "zz-runtime" in {r["id"] for r in (await registry.get("/v1/regions")).json()}
        await place_near_users(settings, registry, users="zz-runtime", near="zz-runtime", far="au-east")


async def test_region_changes_are_checked(settings: Settings, nc) -> None:
    """Bad input changes nothing; the file's regions are changed in the file."""
    good = {"id": "zz-a", "name": "a", "country": "NO", "lat": 59.9, "lon": 10.7}
    async with AsyncTestClient(app=create_registry(settings)) as registry:
        h = admin(settings)
        bad = [good, {**good, "id": "zz-b", "lat": 123}]
        r = await registry.post("/v1/regions/bulk", json=bad, headers=h)
        assert r.status_code == 400, r.text
        r = await registry.post("/v1/regions/bulk", json=[good, good], headers=h)
        assert r.status_code == 400 and "twice" in r.text
        assert "zz-a" not in {x["id"] for x in (await registry.get("/v1/regions")).json()}
        moved = {"id": "us-east", "name": "US East", "country": "US", "lat": 10.0, "lon": -77.49}
        r = await registry.put("/v1/regions/us-east", json=moved, headers=h)
        assert r.status_code == 409 and "topology file" in r.text
        assert (await registry.post("/v1/regions/bulk", json=[good], headers=h)).json() == {
            "written": 1, "unchanged": 0}
        assert (await registry.post("/v1/regions/bulk", json=[good], headers=h)).json() == {
            "written": 0, "unchanged": 1}
        tenant = await key(registry, settings, "tenant", "t1")
        r = await registry.post("/v1/regions/bulk", json=[good], headers=tenant)
        assert r.status_code == 403


async def test_the_file_is_the_source_of_published_links(settings: Settings, nc, tmp_path) -> None:
    """A link dropped from the topology file is gone after the next start (derived
    again); a region dropped from it stays (pools may be in it)."""
    import json

    north = {"id": "dc-north", "name": "North", "country": "NO", "lat": 59.9, "lon": 10.7}
    south = {"id": "dc-south", "name": "South", "country": "ZA", "lat": -33.9, "lon": 18.4}
    link = {"src": "dc-north", "dst": "dc-south", "latency_ms": 190, "bandwidth_gbps": 5, "egress_per_gb": "0.12"}
    path = tmp_path / "topology.json"
    one = {"src": "dc-north", "dst": "dc-south"}
    path.write_text(json.dumps({"regions": [north, south], "links": [link]}))
    file_settings = msgspec.structs.replace(settings, topology_file=str(path))
    async with AsyncTestClient(app=create_registry(file_settings)) as registry:
        assert (await registry.get("/v1/network", params=one)).json()[0]["latency_ms"] == 190
    path.write_text(json.dumps({"regions": [north]}))
    async with AsyncTestClient(app=create_registry(file_settings)) as registry:
        got = (await registry.get("/v1/network", params=one)).json()[0]
        assert got["derived"] is True and got["latency_ms"] != 190
        assert {r["id"] for r in (await registry.get("/v1/regions")).json()} >= {"dc-north", "dc-south"}


async def test_a_region_added_while_the_broker_runs(settings: Settings, nc) -> None:
    """The broker follows the bucket: a region added after it started is placeable at
    once, latency bound included."""
    region = {"id": "zz-late", "name": "added late", "country": "NO", "lat": 59.9, "lon": 10.7}
    async with AsyncTestClient(app=create_registry(settings)) as registry:
        prov = await key(registry, settings, "provider", "acme")
        tenant = await key(registry, settings, "tenant", "t1")
        async with AsyncTestClient(app=create_broker(settings)) as broker:
            assert (await registry.put("/v1/regions/zz-late", json=region, headers=admin(settings))).status_code == 200
            r = await registry.put("/v1/pools/acme-late", json=pool_body(region="zz-late"), headers=prov)
            assert r.status_code == 201, r.text
            ask = {"units": 8, "placement": {"users_region": "zz-late", "max_latency_ms": 5}}

            async def placed() -> bool:
                r = await broker.post("/v1/quotes", json=ask, headers=tenant)
                return r.status_code == 200 and bool(r.json()["options"])

            await eventually(placed, what="the broker places in a region added after it started")
