"""``GET /v1/events`` against a real registry process (uvicorn, real HTTP streaming),
real NATS JetStream and Redis: scoping by role, filters, resume without loss, replay
that ends, and consumers cleaned up when a watcher goes away."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import msgspec
import pytest
from nats.aio.client import Client as NATS

from services.common.messages import LeaseGranted, LeaseInfo, LeaseProvisioning
from services.common.nats_conn import connect, ensure_streams, publish_event
from services.common.settings import Settings
from services.common.subjects import Subjects
from tests.helpers import drop_streams, eventually
from tests.integration.conftest import pool_body
from tests.procs import service_process
from tests.sse import Watcher, pools_seen


class World:
    def __init__(self, url: str, settings: Settings, nc: NATS) -> None:
        self.url, self.settings, self.nc = url, settings, nc
        self.subjects = Subjects(settings.prefix)
        self.admin = {"Authorization": f"Bearer {settings.admin_key}"}
        self.http = httpx.AsyncClient(base_url=url, timeout=10)

    async def key(self, role: str, subject: str = "") -> str:
        r = await self.http.post("/v1/keys", json={"role": role, "subject": subject}, headers=self.admin)
        assert r.status_code == 201, r.text
        return r.json()["key"]

    async def pool(self, pool_id: str, key: str, region: str = "cn-yrd") -> None:
        r = await self.http.put(f"/v1/pools/{pool_id}", json=pool_body(region=region),
                                headers={"Authorization": f"Bearer {key}"})
        assert r.status_code in (200, 201), r.text

    async def lease(self, tenant: str, provider: str, pool_id: str, region: str = "cn-yrd",
                    kind: type = LeaseGranted) -> str:
        """A grant as the broker announces it (the registry only relays events)."""
        now = datetime.now(UTC)
        lease_id = f"lease_{uuid.uuid4().hex[:10]}"
        info = LeaseInfo(lease_id=lease_id, request_id="req_1", tenant=tenant, pool_id=pool_id, provider=provider,
                         region=region, model="nvidia-a100-sxm-80gb", units=2, billing="on_demand",
                         unit_price=Decimal("2.10"), granted_at=now, expires_at=now + timedelta(hours=1))
        await publish_event(self.nc.jetstream(), self.subjects.alloc(region, tenant),
                            kind(id=f"{lease_id}.1", at=now, lease=info))
        return lease_id


@pytest.fixture(scope="module")
def registry_proc(nats_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    settings = Settings(nats_url=nats_url, redis_url=redis_url, prefix=f"t{uuid.uuid4().hex[:12]}",
                        admin_key="admin-" + uuid.uuid4().hex, sweep_interval_s=0.5,
                        events_keepalive_s=1.0)  # an idle stream notices a revoked key within 1 s, not 5
    with service_process("registry", settings, tmp_path_factory.mktemp("events")) as svc:
        yield svc.url, settings
    asyncio.run(drop_streams(settings.nats_url, settings.prefix))


@pytest.fixture
async def world(registry_proc: tuple) -> AsyncIterator[World]:
    url, settings = registry_proc
    nc = await connect(settings.nats_url, "test-events")
    await ensure_streams(nc.jetstream(), Subjects(settings.prefix))
    w = World(url, settings, nc)
    yield w
    await w.http.aclose()
    await nc.drain()


def _id() -> str:
    return uuid.uuid4().hex[:8]


async def test_ops_sees_events_live_and_resumes_without_loss(world: World) -> None:
    prov = f"p{_id()}"
    pkey, ops = await world.key("provider", prov), await world.key("ops")
    auth = {"Authorization": f"Bearer {ops}"}
    async with Watcher(world.url, {"provider": prov}, auth) as w:
        assert w.status == 200
        await w.wait_for(lambda evs: any(e.event == "ready" for e in evs))
        await world.pool(f"{prov}-a", pkey)
        await w.wait_for(lambda evs: f"{prov}-a" in pools_seen(evs))
        first = w.data()[0]
        assert first["kind"] == "capacity" and first["event"]["type"] == "pool.registered"
        assert first["subject"] == world.subjects.capacity("cn-yrd", prov)
        last_id = [e for e in w.events if e.event == "message"][-1].id
        assert last_id and len(last_id.split("-")) == 4 and int(last_id.split("-")[0]) == first["seq"]
    # while nobody watches, two more pools register; a pool of another provider too
    other = f"p{_id()}"
    await world.pool(f"{prov}-b", pkey)
    await world.pool(f"{other}-x", await world.key("provider", other))
    await world.pool(f"{prov}-c", pkey)
    async with Watcher(world.url, {"provider": prov}, {**auth, "Last-Event-ID": last_id}) as w:
        seen = await w.wait_for(lambda evs: (p := pools_seen(evs)) and len(p) >= 2 and p)
        assert seen == [f"{prov}-b", f"{prov}-c"]  # nothing missed, nothing repeated, no other provider
    # ?since= with the same id gives the same, and the key may ride in the query (EventSource)
    async with Watcher(world.url, {"provider": prov, "since": last_id, "key": ops}) as w:
        assert await w.wait_for(lambda evs: len(pools_seen(evs)) >= 2 and pools_seen(evs)) == \
            [f"{prov}-b", f"{prov}-c"]


async def test_replay_ends_and_filters_by_kind_region_type(world: World) -> None:
    prov = f"p{_id()}"
    pkey, ops = await world.key("provider", prov), await world.key("ops")
    await world.pool(f"{prov}-east", pkey, region="cn-yrd")
    await world.pool(f"{prov}-west", pkey, region="cn-gz")
    await world.lease("acme", prov, f"{prov}-east")
    auth = {"Authorization": f"Bearer {ops}"}
    async with Watcher(world.url, {"since": "all", "follow": "false", "provider": prov}, auth) as w:
        await w.wait_for(lambda evs: any(e.event == "end" for e in evs))
        kinds = [(d["kind"], d["event"]["type"]) for d in w.data()]
        # streams are merged in arrival order: each stream's own order is what is promised
        assert sorted(kinds) == [("alloc", "lease.granted"), ("capacity", "pool.registered"),
                                 ("capacity", "pool.registered")]
        assert w.events[-1].event == "end" and w.events[-1].id == w.events[-2].id
    async with Watcher(world.url, {"since": "all", "follow": "false", "provider": prov, "region": "cn-gz"},
                       auth) as w:
        await w.wait_for(lambda evs: any(e.event == "end" for e in evs))
        assert pools_seen(w.events) == [f"{prov}-west"] and len(w.data()) == 1
    async with Watcher(world.url, {"since": "all", "follow": "false", "provider": prov,
                                   "type": "lease.granted"}, auth) as w:
        await w.wait_for(lambda evs: any(e.event == "end" for e in evs))
        assert [d["event"]["type"] for d in w.data()] == ["lease.granted"]
    async with Watcher(world.url, {"since": "all", "follow": "false", "kind": "request", "tenant": "nobody"},
                       auth) as w:  # nothing matches: the replay still ends
        await w.wait_for(lambda evs: any(e.event == "end" for e in evs))
        assert w.data() == []


async def test_provider_and_tenant_keys_see_only_their_own(world: World) -> None:
    mine, theirs, tenant = f"p{_id()}", f"p{_id()}", f"t{_id()}"
    mkey, tkey_other = await world.key("provider", mine), await world.key("provider", theirs)
    tkey = await world.key("tenant", tenant)
    async with Watcher(world.url, {}, {"Authorization": f"Bearer {mkey}"}) as pw, \
            Watcher(world.url, {}, {"Authorization": f"Bearer {tkey}"}) as tw:
        await pw.wait_for(lambda evs: any(e.event == "ready" for e in evs))
        await tw.wait_for(lambda evs: any(e.event == "ready" for e in evs))
        await world.pool(f"{theirs}-1", tkey_other)
        await world.pool(f"{mine}-1", mkey)
        await world.lease("someone-else", theirs, f"{theirs}-1")  # not on my pool, not my tenant
        await world.lease(tenant, mine, f"{mine}-1")
        await pw.wait_for(lambda evs: sum(1 for e in evs if e.event == "message") >= 2)
        await tw.wait_for(lambda evs: sum(1 for e in evs if e.event == "message") >= 1)
        # a marker event after everything else, so "nothing else arrived" is checked, not assumed
        await world.pool(f"{mine}-2", mkey)
        await pw.wait_for(lambda evs: f"{mine}-2" in pools_seen(evs))
        got = [(d["kind"], d["event"].get("pool_id") or d["event"]["lease"]["pool_id"]) for d in pw.data()]
        # order is promised within a stream, not across the capacity and alloc streams
        assert sorted(got) == [("alloc", f"{mine}-1"), ("capacity", f"{mine}-1"), ("capacity", f"{mine}-2")]
        assert [g for g in got if g[0] == "capacity"] == [("capacity", f"{mine}-1"), ("capacity", f"{mine}-2")]
        assert [(d["kind"], d["event"]["lease"]["tenant"]) for d in tw.data()] == [("alloc", tenant)]


async def test_a_provider_sees_its_assignments_live(world: World) -> None:
    """``lease.provisioning`` (a lease its provider must deliver) reaches the provider of
    the pool on its own event stream as it happens, and no other provider."""
    mine, theirs = f"p{_id()}", f"p{_id()}"
    mkey, okey = await world.key("provider", mine), await world.key("provider", theirs)
    await world.pool(f"{mine}-1", mkey)
    await world.pool(f"{theirs}-1", okey)
    async with Watcher(world.url, {"type": "lease.provisioning"}, {"Authorization": f"Bearer {mkey}"}) as pw:
        await pw.wait_for(lambda evs: any(e.event == "ready" for e in evs))
        other = await world.lease("t-other", theirs, f"{theirs}-1", kind=LeaseProvisioning)
        capacity_only = await world.lease("t-mine", mine, f"{mine}-1")  # lease.granted: not asked for
        assigned = await world.lease("t-mine", mine, f"{mine}-1", kind=LeaseProvisioning)
        await pw.wait_for(lambda evs: assigned in str(pw.data()))
        # the others were published first, on the same stream: had they passed, they would be here
        assert [(d["event"]["type"], d["event"]["lease"]["lease_id"]) for d in pw.data()] == \
            [("lease.provisioning", assigned)]
        assert other not in str(pw.events) and capacity_only not in str(pw.events)


async def test_since_a_time_starts_at_the_first_event_after_it(world: World) -> None:
    prov = f"p{_id()}"
    pkey, ops = await world.key("provider", prov), await world.key("ops")
    await world.pool(f"{prov}-old", pkey)
    auth = {"Authorization": f"Bearer {ops}"}
    async with Watcher(world.url, {"since": "all", "follow": "false", "provider": prov, "kind": "capacity"},
                       auth) as w:
        await w.wait_for(lambda evs: any(e.event == "end" for e in evs))
        old_seq = w.data()[-1]["seq"]
    # a time after the first pool's event and before the second's: the server says where that is
    cut = datetime.now(UTC)
    await world.pool(f"{prov}-new", pkey)
    async with Watcher(world.url, {"since": cut.isoformat(), "follow": "false", "provider": prov, "kind": "capacity"},
                       auth) as w:
        await w.wait_for(lambda evs: any(e.event == "end" for e in evs))
        assert pools_seen(w.events) == [f"{prov}-new"]
        ready = next(e for e in w.events if e.event == "ready")
        assert int(ready.id.split("-")[0]) >= old_seq  # the cursor is exact: resuming from it repeats nothing
    async with Watcher(world.url, {"since": "1h", "follow": "false", "provider": prov, "kind": "capacity"}, auth) as w:
        await w.wait_for(lambda evs: any(e.event == "end" for e in evs))
        assert pools_seen(w.events) == [f"{prov}-old", f"{prov}-new"]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    async with Watcher(world.url, {"since": future, "follow": "false", "provider": prov}, auth) as w:
        await w.wait_for(lambda evs: any(e.event == "end" for e in evs))
        assert w.data() == []


@pytest.mark.parametrize(("params", "role", "status"), [
    ({}, None, 401),
    ({"key": "cbk_0123456789abcdef_nope"}, None, 401),
    ({"kind": "weather"}, "ops", 400),
    ({"region": "cn.*"}, "ops", 400),
    ({"since": "yesterday"}, "ops", 400),
    ({"since": "1-2-3"}, "ops", 400),
    ({"since": "800000d"}, "ops", 422),  # before year 1: was a 500 (OverflowError)
    ({"since": "999999999s"}, "ops", 200),  # 31 years back: simply everything
    ({"kind": "request", "region": "cn-yrd"}, "ops", 400),
    ({"provider": "someone-else"}, "provider", 403),
    ({"kind": "billing"}, "provider", 403),
    ({"tenant": "someone-else"}, "tenant", 403),
    ({"kind": "capacity"}, "tenant", 403),
])
async def test_bad_watch_requests_get_problem_details(world: World, params: dict, role: str | None,
                                                      status: int) -> None:
    headers = {}
    if role:
        headers["Authorization"] = "Bearer " + await world.key(role, "me" if role in ("provider", "tenant") else "")
    r = await world.http.get("/v1/events", params={**params, "follow": "false"}, headers=headers)
    assert r.status_code == status, r.text
    if status == 200:
        return
    assert r.headers["content-type"].startswith("application/problem+json") and r.json()["detail"]


async def test_a_revoked_key_ends_its_stream(world: World) -> None:
    r = await world.http.post("/v1/keys", json={"role": "ops"}, headers=world.admin)
    key_id, key = r.json()["key_id"], r.json()["key"]
    async with Watcher(world.url, {"key": key}) as w:
        await w.wait_for(lambda evs: any(e.event == "ready" for e in evs))
        assert (await world.http.delete(f"/v1/keys/{key_id}", headers=world.admin)).status_code in (200, 204)
        await w.wait_for(lambda evs: any(e.event == "revoked" for e in evs), timeout=20)
        await asyncio.wait_for(w.ended.wait(), 10)
    r = await world.http.get("/v1/events", params={"key": key})
    assert r.status_code == 401


async def test_consumers_go_away_with_the_watcher(world: World) -> None:
    ops = await world.key("ops")
    js = world.nc.jetstream()
    names = [world.subjects.stream(k) for k in ("capacity", "alloc", "request", "billing")]

    async def consumers() -> int:
        return sum([(await js.stream_info(n)).state.consumer_count for n in names])

    before = await consumers()
    async with Watcher(world.url, {}, {"Authorization": f"Bearer {ops}"}) as w:
        await w.wait_for(lambda evs: any(e.event == "ready" for e in evs))
        assert await consumers() == before + 4  # one ordered consumer per stream
    async def gone() -> bool:
        return await consumers() == before

    await eventually(gone, timeout=30)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "events", *args]


async def test_cbroker_events_prints_recent_events_and_exits(world: World) -> None:
    prov = f"p{_id()}"
    pkey, ops = await world.key("provider", prov), await world.key("ops")
    await world.pool(f"{prov}-1", pkey)
    lease_id = await world.lease("acme", prov, f"{prov}-1")
    out = await asyncio.to_thread(subprocess.run, _cli("--registry-url", world.url, "--key", ops, "--provider", prov),
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout
    assert "pool.registered" in lines[0] and f"{prov}-1" in lines[0] and "16× nvidia-a100-sxm-80gb" in lines[0]
    assert "lease.granted" in lines[1] and lease_id in lines[1] and "acme" in lines[1]
    bad = await asyncio.to_thread(subprocess.run, _cli("--registry-url", world.url, "--key", ops, "--kind", "x"),
                                  capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "400" in bad.stderr and "unknown event kind" in bad.stderr


async def test_cbroker_events_follow_prints_as_it_happens(world: World) -> None:
    prov = f"p{_id()}"
    pkey, ops = await world.key("provider", prov), await world.key("ops")
    js = world.nc.jetstream()
    before = (await js.stream_info(world.subjects.stream("capacity"))).state.consumer_count
    proc = subprocess.Popen(_cli("--follow", "--json", "--registry-url", world.url, "--key", ops, "--provider", prov),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        async def consumers_up() -> bool:  # the command is watching (its consumers exist)
            info = await js.stream_info(world.subjects.stream("capacity"))
            return info.state.consumer_count > before

        await eventually(consumers_up, timeout=30)
        await world.pool(f"{prov}-live", pkey)

        async def printed() -> bool:
            return any(f"{prov}-live" in line for line in lines)

        await eventually(printed, timeout=30)
        envelope = json.loads(next(line for line in lines if f"{prov}-live" in line))
        assert envelope["kind"] == "capacity" and envelope["event"]["type"] == "pool.registered"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_opening_streams_counts_against_the_key_rate_limit(settings: Settings, nc: NATS) -> None:
    from litestar.testing import AsyncTestClient

    from services.registry.app import create_app

    limited = msgspec.structs.replace(settings, rate_limit_requests=2, rate_limit_window_s=60.0)
    async with AsyncTestClient(app=create_app(limited)) as client:
        admin = {"Authorization": f"Bearer {settings.admin_key}"}
        key = (await client.post("/v1/keys", json={"role": "ops"}, headers=admin)).json()["key"]
        statuses = [(await client.get("/v1/events", params={"follow": "false", "key": key})).status_code
                    for _ in range(3)]
        assert statuses == [200, 200, 429]
