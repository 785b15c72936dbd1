"""Delivering leases through the broker's HTTP API (real registry, NATS, Redis):
provisioning → ready with access details (shown to the tenant and admin, redacted to
ops, never in an event or a log line), failed (units back), the provision timeout
(swept, and a late ready refused), unhealthy → lost, who may answer, and bad input that
changes nothing."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import pytest

from services.common.delivery import REDACTED
from services.common.keys import Keys
from services.common.messages import (
    AllocEvent,
    LeaseFailed,
    LeaseGranted,
    LeaseLost,
    LeaseProvisioning,
    LeaseReady,
    LeaseReleased,
)
from services.common.nats_conn import read_stream
from services.common.subjects import ACCESS

from ..helpers import EventTap, eventually
from .broker_world import broker_world
from .conftest import with_settings

SECRET = "s3cr3t-pa55-7f1c2a"
ACCESS_BODY = {"access": {"host": "gpu-7.gz.example", "port": 2222, "user": "tenant",
                          "env": {"TOKEN": SECRET}, "note": "ssh -p 2222 tenant@gpu-7.gz.example"}}
SSH = {"kind": "ssh", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA tenant@laptop"]}
POOLS = {
    # the cheapest, but capacity only: a request without a workload lands here
    "gz-cap": {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 16, "prices": {"on_demand": "1.00"}},
    "gz-ssh": {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 16, "prices": {"on_demand": "1.50"},
               "delivery": ["ssh", "process"], "provision_timeout_s": 120},
}


def deliver(**over: object) -> dict:
    return {"units": 2, "placement": {"regions": ["cn-gz"]}, "workload": SSH, **over}


async def alloc_payloads(nc, subjects) -> list[bytes]:
    return [data async for _, data in read_stream(nc.jetstream(), subjects.stream("alloc"), subjects.events("alloc"))]


async def test_ready_shows_access_to_its_tenant_and_admin_only(settings, nc, subjects, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    async with broker_world(settings, POOLS) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        ops = await w.key("ops")
        r = await w.request("t1", deliver())
        assert r.status_code == 201, r.text
        lease = r.json()["leases"][0]
        lease_id = lease["lease_id"]
        assert (lease["pool_id"], lease["state"], lease["delivery"]) == ("gz-ssh", "provisioning", "ssh")
        assert lease["provision_deadline"] and lease["ready_at"] is None and lease["access"] is None
        first = await alloc.wait_for(lambda e: e.lease.lease_id == lease_id)
        assert isinstance(first, LeaseProvisioning) and first.seq == 1 and first.lease.delivery == "ssh"
        assert first.lease.provision_timeout_s == 120
        assert await w.free("gz-ssh") == 14

        # the provider's assignments: the workload to deliver and its deadline
        got = (await w.broker.get("/v1/assignments", headers=w.provider)).json()
        assert [(a["lease_id"], a["state"], a["workload"]) for a in got] == [(lease_id, "provisioning", SSH)]
        assert got[0]["provision_deadline"] == lease["provision_deadline"]
        # whole units on a pool that does not share: the provider picks the devices
        assert (got[0]["milli"], got[0]["devices"]) == (1000, [])
        assert (await w.broker.get("/v1/assignments?state=ready", headers=w.provider)).json() == []

        r = await w.broker.post(f"/v1/leases/{lease_id}/ready", json=ACCESS_BODY, headers=w.provider)
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "ready" and r.json()["ready_at"]
        ready = await alloc.wait_for(lambda e: isinstance(e, LeaseReady) and e.lease.lease_id == lease_id)
        assert ready.seq == 2
        assert [a["state"] for a in (await w.broker.get("/v1/assignments?state=ready",
                                                         headers=w.provider)).json()] == ["ready"]

        mine = (await w.broker.get(f"/v1/leases/{lease_id}", headers=w.tenants["t1"])).json()
        assert mine["state"] == "ready" and mine["access"] == ACCESS_BODY["access"]
        assert mine["provision_deadline"] is None and mine["ready_at"] == r.json()["ready_at"]
        view = (await w.broker.get(f"/v1/requests/{lease['request_id']}", headers=w.tenants["t1"])).json()
        assert view["leases"][0]["access"] == ACCESS_BODY["access"]
        admin = (await w.broker.get(f"/v1/leases/{lease_id}", headers=w.admin)).json()
        assert admin["access"] == ACCESS_BODY["access"]
        redacted = (await w.broker.get(f"/v1/leases/{lease_id}", headers=ops)).json()
        assert redacted["access"] == msgspec.to_builtins(REDACTED) and SECRET not in str(redacted)
        listed = (await w.broker.get("/v1/leases?tenant=t1", headers=ops)).json()
        assert SECRET not in str(listed) and listed[0]["state"] == "ready"
        assert (await w.broker.get(f"/v1/leases/{lease_id}", headers=w.tenants["t2"])).status_code == 404
        assert (await w.broker.get(f"/v1/requests/{lease['request_id']}",
                                   headers=w.tenants["t2"])).status_code == 404

        # ready twice: 409, nothing changes
        r2 = await w.broker.post(f"/v1/leases/{lease_id}/ready", json={"access": {"host": "other"}},
                                 headers=w.provider)
        assert r2.status_code == 409 and "ready" in r2.json()["detail"]
        again = (await w.broker.get(f"/v1/leases/{lease_id}", headers=w.tenants["t1"])).json()
        assert again["access"] == ACCESS_BODY["access"]

        # released: the access details are deleted
        assert (await w.broker.post(f"/v1/leases/{lease_id}/release", headers=w.tenants["t1"])).status_code == 200
        await alloc.wait_for(lambda e: isinstance(e, LeaseReleased) and e.lease.lease_id == lease_id)
        kv = await nc.jetstream().key_value(subjects.bucket(ACCESS))
        assert lease_id not in [k for k in await _keys(kv)]

        # never in an event (the whole stream) nor in a log line
        payloads = await alloc_payloads(nc, subjects)
        assert payloads and not any(SECRET.encode() in p or b"gpu-7.gz.example" in p for p in payloads)
        assert SECRET not in caplog.text


async def _keys(kv) -> list[str]:
    try:
        return await kv.keys()
    except Exception:  # noqa: BLE001 - nats-py raises when the bucket holds no key
        return []


async def test_capacity_only_requests_are_ready_at_grant(settings, nc, subjects) -> None:
    async with broker_world(settings, POOLS) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        r = await w.request("t1", {"units": 2})
        assert r.status_code == 201, r.text
        lease = r.json()["leases"][0]
        assert (lease["pool_id"], lease["state"], lease["delivery"]) == ("gz-cap", "ready", "")
        assert lease["ready_at"] == lease["granted_at"] and lease["provision_deadline"] is None
        granted = await alloc.wait_for(lambda e: e.lease.lease_id == lease["lease_id"])
        assert isinstance(granted, LeaseGranted)
        # nothing to deliver: a ready answer is refused and changes nothing
        r = await w.broker.post(f"/v1/leases/{lease['lease_id']}/ready", json=ACCESS_BODY, headers=w.provider)
        assert r.status_code == 409 and "capacity only" in r.json()["detail"]
        r = await w.broker.post(f"/v1/leases/{lease['lease_id']}/failed", json={"reason": "x"}, headers=w.provider)
        assert r.status_code == 409
        got = (await w.broker.get(f"/v1/leases/{lease['lease_id']}", headers=w.tenants["t1"])).json()
        assert got["state"] == "ready" and got["access"] is None
        assert await w.free("gz-cap") == 14


async def test_failed_gives_the_units_back(settings, nc, subjects) -> None:
    async with broker_world(settings, POOLS) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        r = await w.request("t1", deliver(on_failure="fail"))
        lease_id = r.json()["leases"][0]["lease_id"]
        assert await w.free("gz-ssh") == 14
        r = await w.broker.post(f"/v1/leases/{lease_id}/failed", json={"reason": "no ssh daemon"},
                                headers=w.provider)
        assert r.status_code == 200, r.text
        assert r.json() == {"lease_id": lease_id, "state": "failed", "reason": "no ssh daemon"}
        failed = await alloc.wait_for(lambda e: isinstance(e, LeaseFailed) and e.lease.lease_id == lease_id)
        assert failed.reason == "no ssh daemon" and failed.seq == 2 and failed.free_after == 16
        assert await w.free("gz-ssh") == 16
        assert (await w.broker.get(f"/v1/leases/{lease_id}", headers=w.tenants["t1"])).status_code == 404
        for verb, body in (("failed", {"reason": "again"}), ("ready", ACCESS_BODY)):
            assert (await w.broker.post(f"/v1/leases/{lease_id}/{verb}", json=body,
                                        headers=w.provider)).status_code == 404
        assert await w.free("gz-ssh") == 16


async def test_unhealthy_ends_a_ready_lease_as_lost(settings, nc, subjects) -> None:
    async with broker_world(settings, POOLS) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        lease_id = (await w.request("t1", deliver(on_failure="fail"))).json()["leases"][0]["lease_id"]
        # provisioning: health says nothing about a delivery not made; unhealthy is refused
        r = await w.broker.post(f"/v1/leases/{lease_id}/health", json={"healthy": False, "detail": "x"},
                                headers=w.provider)
        assert r.status_code == 409 and "failed" in r.json()["detail"]
        assert (await w.broker.post(f"/v1/leases/{lease_id}/ready", json=ACCESS_BODY,
                                    headers=w.provider)).status_code == 200
        r = await w.broker.post(f"/v1/leases/{lease_id}/health", json={"healthy": True}, headers=w.provider)
        assert r.status_code == 200 and r.json()["state"] == "ready"
        r = await w.broker.post(f"/v1/leases/{lease_id}/failed", json={"reason": "late"}, headers=w.provider)
        assert r.status_code == 409 and "ready" in r.json()["detail"]  # ready is not provisioning
        r = await w.broker.post(f"/v1/leases/{lease_id}/health",
                                json={"healthy": False, "detail": "gpu fell off the bus"}, headers=w.provider)
        assert r.status_code == 200 and r.json()["state"] == "lost"
        lost = await alloc.wait_for(lambda e: isinstance(e, LeaseLost) and e.lease.lease_id == lease_id)
        assert lost.reason == "gpu fell off the bus" and lost.seq == 3
        assert await w.free("gz-ssh") == 16
        kv = await nc.jetstream().key_value(subjects.bucket(ACCESS))
        assert lease_id not in await _keys(kv)


async def test_no_ready_by_the_deadline_fails_by_the_sweep(settings, nc, subjects) -> None:
    pools = {"gz-ssh": {**POOLS["gz-ssh"], "provision_timeout_s": 5}}
    async with broker_world(settings, pools) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        lease_id = (await w.request("t1", deliver(on_failure="fail"))).json()["leases"][0]["lease_id"]
        failed = await alloc.wait_for(lambda e: isinstance(e, LeaseFailed) and e.lease.lease_id == lease_id,
                                      timeout=15)
        assert failed.reason == "not ready within 5 s" and failed.seq == 2
        assert await w.free("gz-ssh") == 16
        r = await w.broker.post(f"/v1/leases/{lease_id}/ready", json=ACCESS_BODY, headers=w.provider)
        assert r.status_code == 404
        assert not [e for e in alloc.events if isinstance(e, LeaseReady)]


async def test_ready_after_the_deadline_is_refused_and_fails_the_lease(settings, nc, subjects, rds) -> None:
    """No sweep comes between (its interval is an hour): the late ready itself finds the
    deadline passed, answers 409 and fails the lease."""
    pools = {"gz-ssh": {**POOLS["gz-ssh"], "provision_timeout_s": 5}}
    async with broker_world(with_settings(settings, sweep_interval_s=3600.0), pools) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        lease = (await w.request("t1", deliver(on_failure="fail"))).json()["leases"][0]
        lease_id = lease["lease_id"]
        deadline = float(await rds.hget(Keys(settings.prefix).lease("cn-gz", lease_id), "deadline"))

        def past_deadline() -> bool:
            return time.time() > deadline

        await eventually(past_deadline, timeout=10, every=0.2, what="the provision deadline passed")
        assert (await w.broker.get(f"/v1/leases/{lease_id}", headers=w.tenants["t1"])).json()["state"] == \
            "provisioning"
        r = await w.broker.post(f"/v1/leases/{lease_id}/ready", json=ACCESS_BODY, headers=w.provider)
        assert r.status_code == 409 and "not ready within 5 s" in r.json()["detail"]
        failed = await alloc.wait_for(lambda e: isinstance(e, LeaseFailed) and e.lease.lease_id == lease_id)
        assert failed.reason == "not ready within 5 s"
        assert await w.free("gz-ssh") == 16
        kv = await nc.jetstream().key_value(subjects.bucket(ACCESS))
        assert lease_id not in await _keys(kv)
        assert not [e for e in alloc.events if isinstance(e, LeaseReady)]


async def test_only_the_pools_provider_or_admin_answers(settings, nc, subjects) -> None:
    async with broker_world(settings, POOLS) as w:
        zeta = await w.key("provider", "zeta")
        r = await w.registry.put("/v1/pools/zeta-gz", headers=zeta, json={
            "region": "cn-gz", "model": "huawei-ascend-910b", "units": 8, "prices": {"on_demand": "9.00"},
            "delivery": ["ssh"]})
        assert r.status_code == 201, r.text
        ops = await w.key("ops")
        lease_id = (await w.request("t1", deliver())).json()["leases"][0]["lease_id"]
        before = (await w.broker.get(f"/v1/leases/{lease_id}", headers=w.admin)).json()
        for verb, body in (("ready", ACCESS_BODY), ("failed", {"reason": "x"}),
                           ("health", {"healthy": False, "detail": "x"})):
            # another provider: as if the lease did not exist
            r = await w.broker.post(f"/v1/leases/{lease_id}/{verb}", json=body, headers=zeta)
            assert r.status_code == 404, (verb, r.text)
            for who in (w.tenants["t1"], ops):  # not a provider's answer at all
                r = await w.broker.post(f"/v1/leases/{lease_id}/{verb}", json=body, headers=who)
                assert r.status_code == 403, (verb, r.text)
        assert (await w.broker.get("/v1/assignments", headers=zeta)).json() == []
        assert (await w.broker.get("/v1/assignments?provider=acme", headers=zeta)).status_code == 404
        for who in (w.tenants["t1"], ops):
            assert (await w.broker.get("/v1/assignments", headers=who)).status_code == 403
        assert [a["lease_id"] for a in (await w.broker.get("/v1/assignments?provider=acme",
                                                            headers=w.admin)).json()] == [lease_id]
        assert (await w.broker.get("/v1/assignments", headers=w.admin)).status_code == 422  # per provider
        assert (await w.broker.get(f"/v1/leases/{lease_id}", headers=w.admin)).json() == before
        assert await w.free("gz-ssh") == 14
        # admin may answer for any provider
        r = await w.broker.post(f"/v1/leases/{lease_id}/ready", json=ACCESS_BODY, headers=w.admin)
        assert r.status_code == 200, r.text


async def test_bad_input_is_refused_and_changes_nothing(settings, nc, subjects) -> None:
    async with broker_world(settings, POOLS) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        # the request: an unknown kind, a kind no pool delivers, control characters, too large
        r = await w.request("t1", deliver(workload={"kind": "vm", "image": "x"}))
        assert r.status_code == 400 and "vm" in r.text
        r = await w.request("t1", deliver(workload={"kind": "container", "image": "nginx:1"}, queue=False))
        assert r.status_code == 422, r.text
        assert r.json()["reasons"][0] == ("no pool in allowed regions ['cn-gz'] delivers containers; "
                                          "they deliver ['process', 'ssh']")
        r = await w.broker.post("/v1/quotes", json=deliver(workload={"kind": "container", "image": "nginx:1"}),
                                headers=w.tenants["t1"])
        assert r.status_code == 200 and any("delivers containers" in x for x in r.json()["reasons"])
        r = await w.request("t1", deliver(workload={"kind": "process", "command": ["run"], "env": {"A\nB": "1"}}))
        assert r.status_code == 400 and "env" in r.text
        r = await w.request("t1", deliver(workload={"kind": "process", "command": ["run\x07"]}))
        assert r.status_code == 400
        for workload in ({"kind": "process", "command": ["run"], "env": {"NAME\n": "1"}},  # a final newline
                         {"kind": "process", "command": ["run"], "env": {"A": "1\n"}},
                         {"kind": "ssh", "public_keys": [SSH["public_keys"][0] + "\n"]}):
            r = await w.request("t1", deliver(workload=workload))
            # refused by the field's pattern (which no longer lets a final newline through) or by
            # the control-character walk behind it: either way a 400 naming the workload field
            assert r.status_code == 400 and "workload" in r.text, (workload, r.text)
            assert "control character" in r.text or "matching regex" in r.text, (workload, r.text)
        r = await w.request("t1", deliver(workload={"kind": "slurm", "script": "#!/bin/bash\n\tsrun x\n"},
                                          queue=False))
        assert r.status_code == 422, r.text  # a script's lines pass; no pool here delivers slurm jobs
        big = {f"V{i}": "x" * 8000 for i in range(20)}  # each value is within bounds, the whole is not
        r = await w.request("t1", deliver(workload={"kind": "process", "command": ["run"], "env": big}))
        assert r.status_code in (400, 413) and "bytes" in r.text
        assert await w.free("gz-ssh") == 16 and alloc.events == []

        lease_id = (await w.request("t1", deliver())).json()["leases"][0]["lease_id"]
        await alloc.wait_for(lambda e: e.lease.lease_id == lease_id)
        n_events = len(alloc.events)
        bad_ready = [  # each carries the secret in a value: a refusal never echoes it
            {"access": {"urls": [f"https://x.example/{SECRET}/" + "a" * 4000] * 8}},  # > MAX_ACCESS_BYTES
            {"access": {"env": {"BAD\x01KEY": SECRET}}},  # a control character in a key
            {"access": {"host": f"a b{SECRET}"}},  # whitespace in a host
            {"access": {"port": 70000, "note": SECRET}},
            {"access": {"note": SECRET}, "extra": 1},  # unknown field
            {"access": {"password": SECRET}},  # unknown field in access
            {"access": {"env": {"TOKEN": f"{SECRET}\n"}}},  # a control character in a value
        ]
        for body in bad_ready:
            r = await w.broker.post(f"/v1/leases/{lease_id}/ready", json=body, headers=w.provider)
            assert r.status_code in (400, 413), (body, r.status_code, r.text)
            assert SECRET not in r.text
        for body in ({"reason": ""}, {"reason": "bad\x00"}, {"reason": "bad\n"}, {}):
            r = await w.broker.post(f"/v1/leases/{lease_id}/failed", json=body, headers=w.provider)
            assert r.status_code == 400, (body, r.text)
        r = await w.broker.post(f"/v1/leases/{lease_id}/health", json={"detail": "no healthy field"},
                                headers=w.provider)
        assert r.status_code == 400
        r = await w.broker.get("/v1/assignments?state=released", headers=w.provider)
        assert r.status_code == 400
        r = await w.broker.post("/v1/leases/no-such-lease/ready", json=ACCESS_BODY, headers=w.provider)
        assert r.status_code == 404
        got = (await w.broker.get(f"/v1/leases/{lease_id}", headers=w.tenants["t1"])).json()
        assert got["state"] == "provisioning" and got["access"] is None
        assert await w.free("gz-ssh") == 14 and len(alloc.events) == n_events
        kv = await nc.jetstream().key_value(subjects.bucket(ACCESS))
        assert [k for k in await _keys(kv) if not k.startswith("workload.")] == []  # no access details stored


@pytest.mark.parametrize("ready", [False, True])
async def test_the_state_survives_a_redis_loss(settings, nc, subjects, rds, ready: bool) -> None:
    """Redis lost: a lease whose last event is lease.provisioning comes back
    provisioning (its deadline swept again), one that was ready stays ready with its
    access details (they never were in Redis)."""
    async with broker_world(settings, POOLS) as w:
        lease_id = (await w.request("t1", deliver())).json()["leases"][0]["lease_id"]
        if ready:
            assert (await w.broker.post(f"/v1/leases/{lease_id}/ready", json=ACCESS_BODY,
                                        headers=w.provider)).status_code == 200
        before = (await w.broker.get(f"/v1/leases/{lease_id}", headers=w.tenants["t1"])).json()
        await rds.delete(*[k async for k in rds.scan_iter(match=f"{settings.prefix}:*", count=10_000)])
        # the registry puts the pools back, the broker's sweep loop then the leases

        async def restored():  # noqa: ANN202
            r = await w.broker.get(f"/v1/leases/{lease_id}", headers=w.tenants["t1"])
            return r.status_code == 200 and r.json()

        after = await eventually(restored, timeout=20, what="the lease restored")
        assert await w.free("gz-ssh") == 14
        assert after == before
        assert after["state"] == ("ready" if ready else "provisioning")
        assert (after["access"] == ACCESS_BODY["access"]) is ready
        k = Keys(settings.prefix)
        assert await rds.hget(k.lease("cn-gz", lease_id), "state") == after["state"]
        due = await rds.zrange(k.lease_provisioning("cn-gz"), 0, -1)
        assert due == ([] if ready else [lease_id])
        # the request record went with Redis; its provider still learns what to deliver
        got = (await w.broker.get("/v1/assignments", headers=w.provider)).json()
        assert [(a["lease_id"], a["state"], a["workload"]) for a in got] == [(lease_id, after["state"], SSH)]
        # and the restored lease moves on as before
        if not ready:
            r = await w.broker.post(f"/v1/leases/{lease_id}/ready", json=ACCESS_BODY, headers=w.provider)
            assert r.status_code == 200, r.text


async def test_concurrent_answers_make_one_transition(settings, nc, subjects) -> None:
    """Several readies (and a failed) for one lease at once: one wins, the others get 409
    (or, after a failed won, 404), and the access details stored are the winner's."""
    async with broker_world(settings, POOLS) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        lease_id = (await w.request("t1", deliver())).json()["leases"][0]["lease_id"]
        bodies = [{"access": {"host": f"h{i}.example"}} for i in range(6)]
        calls = [w.broker.post(f"/v1/leases/{lease_id}/ready", json=b, headers=w.provider) for b in bodies]
        calls.append(w.broker.post(f"/v1/leases/{lease_id}/failed", json={"reason": "x"}, headers=w.provider))
        answers = await asyncio.gather(*calls)
        won = [i for i, r in enumerate(answers) if r.status_code == 200]
        assert len(won) == 1, [(r.status_code, r.text) for r in answers]
        assert all(r.status_code in (404, 409) for i, r in enumerate(answers) if i != won[0])
        if won[0] < len(bodies):  # a ready won
            got = (await w.broker.get(f"/v1/leases/{lease_id}", headers=w.tenants["t1"])).json()
            assert got["state"] == "ready" and got["access"] == bodies[won[0]]["access"]
            await alloc.wait_for(lambda e: isinstance(e, LeaseReady) and e.lease.lease_id == lease_id)
        else:
            await alloc.wait_for(lambda e: isinstance(e, LeaseFailed) and e.lease.lease_id == lease_id)
        endings = [e for e in alloc.events if e.lease.lease_id == lease_id and e.seq > 1]
        assert len(endings) == 1 and endings[0].seq == 2
