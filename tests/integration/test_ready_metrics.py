"""``/ready`` and the domain metrics of every service, read from ``/metrics`` before and
after real actions (real NATS, Redis and HTTP stack; apps in-process)."""

from __future__ import annotations

import re

import msgspec
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from services.cli.servers import start_nats, start_redis
from services.common.subjects import Subjects
from services.registry.app import create_app as create_registry
from tests.helpers import eventually

from .broker_world import broker_world
from .conftest import MODEL, REGION
from .test_meter_support import granted, lease, meter_world


async def scrape(client: AsyncTestClient) -> dict[tuple[str, tuple], float]:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_ready_on_every_service(settings, nc) -> None:
    async with broker_world(settings) as w:
        for client, service in ((w.registry, "registry"), (w.broker, "broker")):
            r = await client.get("/ready")  # no key needed: probes are anonymous
            assert r.status_code == 200 and r.json() == {"status": "ready", "service": service, "reasons": []}
    async with meter_world(settings, nc) as m:
        await eventually(lambda: _ready(m.client))
        assert (await m.client.get("/ready")).json()["service"] == "meter"
        # a missing stream is a reason, named
        await nc.jetstream().delete_stream(Subjects(settings.prefix).stream("billing"))
        r = await m.client.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "not ready"
        assert any(f"{settings.prefix.upper()}_BILLING" in reason for reason in r.json()["reasons"]), r.json()


async def _ready(client: AsyncTestClient) -> bool:
    return (await client.get("/ready")).status_code == 200


async def test_ready_is_503_when_redis_goes_away(settings, nc, tmp_path) -> None:
    redis = start_redis(tmp_path / "redis")
    own = msgspec.structs.replace(settings, redis_url=redis.url)
    try:
        async with AsyncTestClient(app=create_registry(own)) as client:
            assert (await client.get("/ready")).status_code == 200
            redis.stop()
            r = await client.get("/ready")
            assert r.status_code == 503, r.text
            assert [x for x in r.json()["reasons"] if x.startswith("redis:")], r.json()
            assert (await client.get("/health")).status_code == 200  # alive, just not ready
    finally:
        redis.stop()


async def test_ready_is_503_and_events_unavailable_when_nats_goes_away(settings, tmp_path) -> None:
    nats = start_nats(tmp_path / "nats")
    own = msgspec.structs.replace(settings, nats_url=nats.url)
    try:
        async with AsyncTestClient(app=create_registry(own)) as client:
            assert (await client.get("/ready")).status_code == 200
            ops = await client.post("/v1/keys", json={"role": "ops"}, headers={"Authorization": f"Bearer {own.admin_key}"})
            key = {"Authorization": f"Bearer {ops.json()['key']}"}
            nats.stop()

            async def not_ready() -> bool:
                r = await client.get("/ready")
                return r.status_code == 503 and any(x.startswith("nats:") for x in r.json()["reasons"])

            await eventually(not_ready, timeout=20)
            r = await client.get("/v1/events", params={"follow": "false"}, headers=key)
            assert r.status_code == 503 and "unreachable" in r.json()["detail"], r.text
    finally:
        nats.stop()


async def test_broker_and_registry_metrics_follow_placements_and_the_queue(settings) -> None:
    async with broker_world(settings, {"m-a": {"units": 8}}) as w:
        reg0, brk0 = await scrape(w.registry), await scrape(w.broker)
        cell = dict(region=REGION, model=MODEL)
        assert value(reg0, "cb_capacity_units", **cell, state="free") == 8
        assert value(reg0, "cb_capacity_units", **cell, state="leased") == 0
        assert value(brk0, "cb_broker_leases", state="live") == 0

        r = await w.request("t1", {"units": 6})
        assert r.status_code == 201, r.text
        reg1, brk1 = await scrape(w.registry), await scrape(w.broker)
        assert value(reg1, "cb_capacity_units", **cell, state="leased") == 6
        assert value(reg1, "cb_capacity_units", **cell, state="free") == 2
        assert value(reg1, "cb_capacity_utilisation", **cell) == 0.75
        summary = (await w.registry.get("/v1/capacity", headers=w.tenants["t1"])).json()
        assert summary["cells"] == [{**cell, "pools": 1, "online": 1, "capacity": 8, "leased": 6, "free": 2,
                                     "shared_pools": 0, "fragmented_devices": 0, "fragmented_milli": 0,
                                     "largest_slice": 0}]
        assert summary["shared"] == []  # no pool shares its devices
        assert summary["totals"]["utilisation"] == 0.75 and summary["queue_depth"] == 0
        assert (await w.registry.get("/v1/capacity")).status_code == 401
        assert value(brk1, "cb_broker_leases", state="live") == 1
        placed = "cb_broker_placement_seconds_count"
        assert value(brk1, placed) == value(brk0, placed) + 1

        # a request that must wait: queue depth 1; capacity appears: placed from the queue, the wait observed
        r = await w.request("t2", {"units": 4})
        assert r.status_code == 202, r.text
        assert value(await scrape(w.broker), "cb_broker_queue_depth") == 1
        waited = "cb_broker_queue_wait_seconds_count"
        before = value(await scrape(w.broker), waited, outcome="placed")
        await w.pool("m-b", units=8)

        async def drained() -> bool:
            s = await scrape(w.broker)
            return value(s, "cb_broker_queue_depth") == 0 and value(s, waited, outcome="placed") == before + 1

        await eventually(drained, timeout=20)
        assert value(await scrape(w.broker), "cb_broker_leases", state="live") == 2
        reg2 = await scrape(w.registry)
        assert value(reg2, "cb_capacity_units", **cell, state="capacity") == 16
        assert value(reg2, "cb_pools", **cell, state="online") == 2


async def test_heartbeat_misses_are_counted(settings) -> None:
    fast = msgspec.structs.replace(settings, heartbeat_ttl_s=0.5, sweep_interval_s=0.1)
    async with broker_world(fast) as w:
        before = value(await scrape(w.registry), "cb_registry_heartbeat_misses_total")
        await w.pool("m-hb", units=8)

        async def missed() -> bool:
            s = await scrape(w.registry)
            return value(s, "cb_registry_heartbeat_misses_total") >= before + 1 and \
                value(s, "cb_pools", region=REGION, model=MODEL, state="online") == 0

        await eventually(missed, timeout=20)


async def test_meter_lag_and_dead_letters(settings, nc) -> None:
    async with meter_world(settings, nc) as m:
        await m.settled()
        s0 = await scrape(m.client)
        assert value(s0, "cb_meter_dead_letters") == 0 and value(s0, "cb_meter_lag_events") == 0
        await m.js.publish(m.subjects.alloc("cn-yrd", "t1"), b'{"type": "lease.granted", "oops": ',
                           headers={"Nats-Msg-Id": "junk-metrics"})
        await m.publish(granted(lease()))
        await m.settled()

        async def dead() -> bool:
            return value(await scrape(m.client), "cb_meter_dead_letters") == 1

        await eventually(dead, timeout=20)
        assert value(await scrape(m.client), "cb_meter_lag_events") == 0
        assert re.search(r"cb_meter_events_total\{outcome=\"dead\"\}", (await m.client.get("/metrics")).text)
        # the consumer stops (as if the meter were stuck): what is published is lag
        await m.client.app.state.meter.consumer.stop()
        await m.publish(*(granted(lease(lease_id=f"lease_lag{i}")) for i in range(3)))

        async def lagging() -> bool:
            return value(await scrape(m.client), "cb_meter_lag_events") == 3

        await eventually(lagging, timeout=20)
