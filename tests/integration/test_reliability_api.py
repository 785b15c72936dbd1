"""Reliability through the public API: the meter's consumer reads real allocation
events, the endpoint shows them, quotes rank and prune with them, the registry's pool
views show them."""

from __future__ import annotations

import pytest

from ..helpers import eventually
from .broker_world import broker_world
from .conftest import with_settings
from .test_reliability import delivered, failed, publish

PRICES = {"on_demand": "2.00"}
SSH_POOL = {"delivery": ["ssh"]}
POOLS = {"shaky": {"prices": PRICES, **SSH_POOL}, "steady": {"prices": PRICES, **SSH_POOL},
         "fresh": {"prices": {"on_demand": "2.05"}, **SSH_POOL}}
SSH = {"kind": "ssh", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKx tenant@laptop"]}


async def test_record_ranks_prunes_and_shows(settings, nc, subjects) -> None:
    settings = with_settings(settings, reliability_refresh_s=0.1)
    async with broker_world(settings, POOLS, meter=True) as w:
        tenant = w.tenants["t1"]
        # before any record: every pool scores the prior, and equal prices tie as before
        r = await w.broker.post("/v1/quotes", json={"units": 1, "workload": SSH}, headers=tenant)
        assert r.status_code == 200, r.text
        assert {o["allocations"][0]["reliability"] for o in r.json()["options"]} == {0.9}

        events = []
        for i in range(6):
            events += delivered(f"s{i}", 20 + i, pool="steady")
        events += delivered("k0", 50, pool="shaky") + failed("k1", pool="shaky") + failed("k2", pool="shaky")
        await publish(nc, subjects, events)

        async def recorded():
            r = await w.broker.get("/v1/providers/acme/reliability", headers=tenant)
            assert r.status_code == 200, r.text
            body = r.json()
            return body if body["provider"]["deliveries"] == 7 and body["provider"]["failures"] == 2 else None
        body = await eventually(recorded, what="the meter's consumer recorded the events")
        pools = {p["subject"]: p for p in body["pools"]}
        assert set(pools) == {"shaky", "steady", "fresh"}  # fresh: registered, no record yet
        assert pools["steady"]["score"] == pytest.approx(15 / 16, abs=1e-6)
        assert pools["shaky"]["score"] == pytest.approx(10 / 13, abs=1e-6)
        assert pools["fresh"]["score"] == 0.9 and pools["fresh"]["deliveries"] == 0
        assert pools["steady"]["ready_p50_s"] == 22.0 and pools["steady"]["ready_p95_s"] == 25.0

        async def ranked():
            r = await w.broker.post("/v1/quotes", json={"units": 1, "workload": SSH}, headers=tenant)
            order = [o["allocations"][0]["pool_id"] for o in r.json()["options"]]
            return r.json() if order == ["steady", "fresh", "shaky"] else None
        quote = await eventually(ranked, what="the engine ranked by the record")
        steady = quote["options"][0]
        assert steady["allocations"][0]["reliability"] == pytest.approx(0.9375)
        assert steady["total_cost"] == "2.00" and float(steady["expected_cost"]) == pytest.approx(2 * (1 + 0.0625))

        # capacity only: by price, as before (shaky and steady tie on price; fresh is dearer)
        r = await w.broker.post("/v1/quotes", json={"units": 1}, headers=tenant)
        assert [o["allocations"][0]["pool_id"] for o in r.json()["options"]][-1] == "fresh"

        r = await w.broker.post("/v1/quotes", json={"units": 1, "min_reliability": 0.92}, headers=tenant)
        assert [o["allocations"][0]["pool_id"] for o in r.json()["options"]] == ["steady"]
        r = await w.request("t1", {"units": 1, "min_reliability": 0.99})
        assert r.status_code == 422, r.text
        assert "scored below min_reliability 0.99 (best: 0.938" in r.text

        # the registry's pool views carry the same record
        r = await w.registry.get("/v1/pools/steady", headers=w.admin)
        assert r.status_code == 200, r.text
        assert r.json()["reliability"]["deliveries"] == 6
        r = await w.registry.get("/v1/pools", headers=w.admin)
        assert {p["pool_id"]: p["reliability"]["score"] for p in r.json()["items"]} == {
            "shaky": pytest.approx(10 / 13, abs=1e-6), "steady": pytest.approx(0.9375), "fresh": 0.9}


async def test_endpoint_refuses_what_it_cannot_answer(settings, nc) -> None:
    async with broker_world(settings, {"p1": {}}) as w:
        ops = await w.key("ops")
        for headers in (w.tenants["t2"], w.provider, ops, w.admin):  # public to every role
            r = await w.broker.get("/v1/providers/acme/reliability", headers=headers)
            assert r.status_code == 200, r.text
            assert r.json()["provider"]["score"] == 0.9 and [p["subject"] for p in r.json()["pools"]] == ["p1"]
        r = await w.broker.get("/v1/providers/acme/reliability")
        assert r.status_code == 401
        r = await w.broker.get("/v1/providers/nobody/reliability", headers=w.admin)
        assert r.status_code == 404 and "no provider nobody" in r.text
        r = await w.broker.get("/v1/providers/Bad%7Bid%7D/reliability", headers=w.admin)
        assert r.status_code == 400 and "not an id" in r.text
        r = await w.broker.post("/v1/quotes", json={"units": 1, "min_reliability": 1.5}, headers=w.tenants["t1"])
        assert r.status_code == 400 and "min_reliability" in r.text


async def test_what_the_provider_answers_is_what_it_is_scored_on(settings, nc) -> None:
    """The broker's own events (a provider answering ready, failed, unhealthy), not
    published by the test: the record follows them."""
    settings = with_settings(settings, reliability_refresh_s=0.1)
    async with broker_world(settings, {"gz-ssh": {"prices": PRICES, **SSH_POOL}}, meter=True) as w:
        leases = []
        for _ in range(3):
            r = await w.request("t1", {"units": 1, "workload": SSH, "on_failure": "fail"})
            assert r.status_code == 201, r.text
            leases.append(r.json()["leases"][0]["lease_id"])
        delivered, failed, lost = leases
        for lease_id, answer, body in ((delivered, "ready", {"access": {"host": "h.example"}}),
                                       (failed, "failed", {"reason": "image pull failed"}),
                                       (lost, "ready", {"access": {"host": "h.example"}}),
                                       (lost, "health", {"healthy": False, "detail": "node down"})):
            r = await w.broker.post(f"/v1/leases/{lease_id}/{answer}", json=body, headers=w.provider)
            assert r.status_code == 200, r.text

        async def recorded():
            r = await w.broker.get("/v1/providers/acme/reliability", headers=w.tenants["t2"])
            rel = r.json()["provider"]
            return rel if (rel["deliveries"], rel["failures"], rel["losses"]) == (2, 1, 1) else None
        rel = await eventually(recorded, what="the provider's answers recorded")
        assert rel["score"] == pytest.approx(11 / 14, abs=1e-6)
        assert rel["ready_p50_s"] is not None and 0 <= rel["ready_p95_s"] < 30
        assert rel["lease_hours"] > 0 and rel["losses_per_1000h"] > 0


async def test_preemption_keeps_to_min_reliability(settings, nc, subjects) -> None:
    """Preemption weighs a placement on a trial engine; it must prune as the world does."""
    settings = with_settings(settings, reliability_refresh_s=0.1)
    pools = {"shaky": {"units": 4, "units_per_node": 4, "prices": {"on_demand": "1.00", "interruptible": "0.40"}},
             "steady": {"units": 4, "units_per_node": 4, "prices": {"on_demand": "2.00", "interruptible": "0.80"}}}
    async with broker_world(settings, pools, meter=True) as w:
        await publish(nc, subjects, failed("k1", pool="shaky") + failed("k2", pool="shaky"))  # 9/12 = 0.75

        async def scored():
            r = await w.broker.post("/v1/quotes", json={"units": 1}, headers=w.tenants["t1"])
            return {a["pool_id"]: a["reliability"] for o in r.json()["options"] for a in o["allocations"]} == {
                "shaky": 0.75, "steady": 0.9}
        await eventually(scored, what="the broker's engine has the scores")
        held = {}
        for _ in pools:
            r = await w.request("t1", {"units": 4, "billing": "interruptible", "priority": 1})
            assert r.status_code == 201, r.text
            held[r.json()["leases"][0]["pool_id"]] = r.json()["leases"][0]["lease_id"]
        r = await w.request("t2", {"units": 4, "min_reliability": 0.8, "queue": False})
        assert r.status_code == 201, r.text
        assert r.json()["leases"][0]["pool_id"] == "steady"  # not the cheaper shaky, scored 0.75
        alive = {x["lease_id"] for x in (await w.broker.get("/v1/leases", headers=w.tenants["t1"])).json()}
        assert alive == {held["shaky"]}
