"""``POST /v1/leases/{id}/complete``: a delivered workload that ended by itself ends its
lease as released by the provider, with the exit code; the units come back. Only the
pool's provider (or admin) answers, only for a ready lease; bad input changes nothing."""

from __future__ import annotations

from services.common.messages import AllocEvent, LeaseReleased

from ..helpers import EventTap
from .broker_world import broker_world

POOLS = {"gz-proc": {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 8, "prices": {"on_demand": "1.50"},
                     "delivery": ["process"]}}
BODY = {"units": 2, "placement": {"regions": ["cn-gz"]}, "workload": {"kind": "process", "command": ["true"]}}


async def test_complete_releases_a_ready_lease_with_its_exit_code(settings, nc, subjects) -> None:
    async with broker_world(settings, POOLS) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        r = await w.request("t1", BODY)
        assert r.status_code == 201, r.text
        lease_id = r.json()["leases"][0]["lease_id"]
        path = f"/v1/leases/{lease_id}/complete"

        # provisioning: not yet; the provider answers failed for work that never ran
        r = await w.broker.post(path, json={"exit_code": 0}, headers=w.provider)
        assert r.status_code == 409 and "answer failed" in r.json()["detail"], r.text
        assert (await w.broker.post(f"/v1/leases/{lease_id}/ready", json={"access": {}},
                                    headers=w.provider)).status_code == 200
        assert await w.free("gz-proc") == 6

        # who may not, and bad bodies: refused, nothing changes
        zeta = await w.key("provider", "zeta")
        assert (await w.broker.post(path, json={}, headers=zeta)).status_code == 404
        assert (await w.broker.post(path, json={}, headers=w.tenants["t1"])).status_code == 403
        for bad in ({"exit_code": 256}, {"exit_code": -1}, {"exit_code": [0]}, {"code": 0}):
            r = await w.broker.post(path, json=bad, headers=w.provider)
            assert r.status_code == 400, (bad, r.text)
        assert (await w.broker.get(f"/v1/leases/{lease_id}", headers=w.tenants["t1"])).json()["state"] == "ready"

        r = await w.broker.post(path, json={"exit_code": 3}, headers=w.provider)
        assert r.status_code == 200 and r.json() == {"lease_id": lease_id, "state": "released", "exit_code": 3}
        ended = await alloc.wait_for(lambda e: isinstance(e, LeaseReleased) and e.lease.lease_id == lease_id)
        assert (ended.by, ended.exit_code) == ("provider", 3)
        assert await w.free("gz-proc") == 8
        assert (await w.broker.post(path, json={}, headers=w.provider)).status_code == 404  # once

        # a tenant's release says so
        r = await w.request("t1", BODY)
        other = r.json()["leases"][0]["lease_id"]
        await w.broker.post(f"/v1/leases/{other}/ready", json={"access": {}}, headers=w.provider)
        assert (await w.broker.post(f"/v1/leases/{other}/release", headers=w.tenants["t1"])).status_code == 200
        ended = await alloc.wait_for(lambda e: isinstance(e, LeaseReleased) and e.lease.lease_id == other)
        assert (ended.by, ended.exit_code) == ("tenant", None)


async def test_a_capacity_only_lease_cannot_be_completed(settings, nc) -> None:
    async with broker_world(settings, POOLS) as w:
        r = await w.request("t1", {"units": 1, "placement": {"regions": ["cn-gz"]}})
        lease_id = r.json()["leases"][0]["lease_id"]
        r = await w.broker.post(f"/v1/leases/{lease_id}/complete", json={}, headers=w.provider)
        assert r.status_code == 409 and "capacity only" in r.json()["detail"], r.text
