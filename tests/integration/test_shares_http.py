"""Shares end to end (issue 14) through the public HTTP API: a registry and a broker
in-process on real NATS, JetStream and Redis. A share is placed on a pool that shares
its devices (a cheaper pool that does not share is passed over), names its device, and
takes its milli there; a second share fills the same device before a fresh one; a whole
ask takes wholly free devices on one node; a release gives back exactly its milli. The
registry refuses sharing pools above MAX_SHARED_UNITS and a change of whether a
registered pool shares."""

from __future__ import annotations

import msgspec

from services.common.keys import Keys
from services.common.messages import MAX_SHARED_UNITS, AllocEvent, LeaseGranted, LeaseInfo, LeaseReleased

from ..helpers import EventTap, eventually
from .broker_world import broker_world

SHARED_MODEL = "nvidia-l40s"
POOLS = {
    # cheaper, but does not share: a share is never placed here
    "gz-910b": {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 8, "units_per_node": 8,
                "prices": {"on_demand": "1.00"}},
    "gz-l40s": {"region": "cn-gz", "model": SHARED_MODEL, "units": 8, "units_per_node": 4,
                "prices": {"on_demand": "1.20"}, "sharing": {"mode": "time_slice", "min_milli": 100}},
}


def devices(srds, prefix: str, pool_id: str) -> dict[int, int]:  # noqa: ANN001
    raw = srds.hgetall(Keys(prefix).pool_devices("cn-gz", pool_id))
    return {int(d): int(f) for d, f in raw.items()}


def stored(srds, prefix: str, lease_id: str) -> LeaseInfo:  # noqa: ANN001
    return msgspec.json.decode(srds.hget(Keys(prefix).lease("cn-gz", lease_id), "info"), type=LeaseInfo)


async def test_shares_are_placed_on_devices_and_given_back(settings, nc, subjects, srds, prefix) -> None:
    async with broker_world(settings, POOLS) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        assert devices(srds, prefix, "gz-l40s") == dict.fromkeys(range(8), 1000)
        assert devices(srds, prefix, "gz-910b") == {}

        r = await w.request("t1", {"units": 1, "share": {"milli": 250}})
        assert r.status_code == 201, r.text
        [first] = r.json()["leases"]
        assert first["pool_id"] == "gz-l40s"
        granted = await alloc.wait_for(lambda e: isinstance(e, LeaseGranted) and e.lease.lease_id == first["lease_id"])
        assert granted.lease.milli == 250 and len(granted.lease.devices) == 1
        [device] = granted.lease.devices
        assert granted.devices_free_after == (750,)
        assert granted.free_after == 7  # one device partly taken: 7 wholly free
        assert stored(srds, prefix, first["lease_id"]).devices == (device,)
        assert devices(srds, prefix, "gz-l40s")[device] == 750
        assert await w.free("gz-l40s") == 7 and await w.free("gz-910b") == 8

        # a second share fills the partly taken device first
        r = await w.request("t2", {"units": 1, "share": {"milli": 500}})
        assert r.status_code == 201, r.text
        [second] = r.json()["leases"]
        granted = await alloc.wait_for(lambda e: isinstance(e, LeaseGranted) and e.lease.lease_id == second["lease_id"])
        assert granted.lease.devices == (device,) and granted.devices_free_after == (250,)

        # a whole ask on the sharing pool: wholly free devices, all on one node
        r = await w.request("t1", {"units": 4, "accelerators": {"models": [SHARED_MODEL]}})
        assert r.status_code == 201, r.text
        [whole] = r.json()["leases"]
        granted = await alloc.wait_for(lambda e: isinstance(e, LeaseGranted) and e.lease.lease_id == whole["lease_id"])
        node = 1 - device // 4  # the node without the shared device is the only one with 4 wholly free
        assert granted.lease.milli == 1000 and granted.lease.devices == tuple(range(node * 4, node * 4 + 4))
        assert granted.devices_free_after == (0, 0, 0, 0)
        assert await w.free("gz-l40s") == 3

        # a release gives back exactly its milli, to its device
        r = await w.broker.post(f"/v1/leases/{first['lease_id']}/release", headers=w.tenants["t1"])
        assert r.status_code == 200, r.text
        released = await alloc.wait_for(lambda e: isinstance(e, LeaseReleased)
                                        and e.lease.lease_id == first["lease_id"])
        assert released.devices_free_after == (500,)
        r = await w.broker.post(f"/v1/leases/{second['lease_id']}/release", headers=w.tenants["t2"])
        assert r.status_code == 200, r.text
        released = await alloc.wait_for(lambda e: isinstance(e, LeaseReleased)
                                        and e.lease.lease_id == second["lease_id"])
        assert released.devices_free_after == (1000,) and released.free_after == 4
        r = await w.broker.post(f"/v1/leases/{whole['lease_id']}/release", headers=w.tenants["t1"])
        assert r.status_code == 200, r.text
        assert devices(srds, prefix, "gz-l40s") == dict.fromkeys(range(8), 1000)
        assert await w.free("gz-l40s") == 8


async def test_registry_refuses_what_per_device_state_cannot_follow(settings, nc, srds, prefix) -> None:
    async with broker_world(settings, POOLS) as w:
        too_many = {**POOLS["gz-l40s"], "units": MAX_SHARED_UNITS + 1}
        r = await w.registry.put("/v1/pools/big", json=too_many, headers=w.provider)
        assert r.status_code == 422 and str(MAX_SHARED_UNITS) in r.text, r.text
        r = await w.registry.patch("/v1/pools/gz-l40s", json={"units": MAX_SHARED_UNITS + 1}, headers=w.provider)
        assert r.status_code == 422 and str(MAX_SHARED_UNITS) in r.text, r.text
        assert len(devices(srds, prefix, "gz-l40s")) == 8  # nothing changed
        # a largest share below the smallest: no share would ever fit
        inverted = {**POOLS["gz-l40s"], "sharing": {"mode": "memory", "min_milli": 500, "max_milli": 250}}
        r = await w.registry.put("/v1/pools/inverted", json=inverted, headers=w.provider)
        assert r.status_code == 422 and "max_milli 250 is below sharing.min_milli 500" in r.text, r.text
        assert (await w.registry.get("/v1/pools/inverted", headers=w.provider)).status_code == 404
        # a largest share on a pool that shares nothing means nothing: refused, not ignored
        r = await w.registry.put("/v1/pools/plain", json={**POOLS["gz-910b"], "sharing": {"max_milli": 500}},
                                 headers=w.provider)
        assert r.status_code == 422 and "does not (sharing.mode 'none')" in r.text, r.text
        # whether a registered pool shares cannot change (its leases would not say how they were taken)
        r = await w.registry.put("/v1/pools/gz-910b", json={**POOLS["gz-910b"], "sharing": {"mode": "memory"}},
                                 headers=w.provider)
        assert r.status_code == 409, r.text
        r = await w.registry.put("/v1/pools/gz-l40s", json={k: v for k, v in POOLS["gz-l40s"].items()
                                                             if k != "sharing"}, headers=w.provider)
        assert r.status_code == 409, r.text
        # the capacity of a sharing pool changes its devices; its sharing mode may change between kinds
        r = await w.registry.patch("/v1/pools/gz-l40s", json={"units": 12}, headers=w.provider)
        assert r.status_code == 200, r.text
        assert devices(srds, prefix, "gz-l40s") == dict.fromkeys(range(12), 1000)
        r = await w.registry.put("/v1/pools/gz-l40s", json={**POOLS["gz-l40s"], "units": 4,
                                                             "sharing": {"mode": "memory"}}, headers=w.provider)
        assert r.status_code == 200, r.text
        assert devices(srds, prefix, "gz-l40s") == dict.fromkeys(range(4), 1000)
        # a removed pool's devices go with it
        assert (await w.registry.delete("/v1/pools/gz-l40s", headers=w.provider)).status_code in (200, 204)
        assert devices(srds, prefix, "gz-l40s") == {}


async def test_a_lost_redis_gets_its_device_state_back_from_the_leases(settings, nc, subjects, srds, prefix) -> None:
    """Redis lost: the registry writes its pools again (every device free), then the
    broker restores the live leases from the allocation stream, each taking its milli on
    its devices again; releases after that give back exactly what they took."""
    async with broker_world(settings, POOLS) as w:
        placed = []
        for tenant, body in (("t1", {"units": 1, "share": {"milli": 250}}), ("t2", {"units": 1, "share": {"milli": 300}}),
                             ("t1", {"units": 2, "accelerators": {"models": [SHARED_MODEL]}})):
            r = await w.request(tenant, body)
            assert r.status_code == 201, r.text
            placed.append((tenant, r.json()["leases"][0]["lease_id"]))
        before = devices(srds, prefix, "gz-l40s")
        assert sorted(before.values()) == [0, 0, 450, 1000, 1000, 1000, 1000, 1000]
        for key in srds.scan_iter(f"{prefix}:*", count=1000):
            srds.delete(key)
        # the registry's and the broker's sweeps notice the loss and rebuild (their own loops)
        await eventually(lambda: srds.exists(Keys(prefix).rebuilt_marker("broker")), what="the broker's rebuild")
        assert devices(srds, prefix, "gz-l40s") == before
        assert await w.free("gz-l40s") == 5
        for tenant, lease_id in placed:
            r = await w.broker.post(f"/v1/leases/{lease_id}/release", headers=w.tenants[tenant])
            assert r.status_code == 200, r.text
        assert devices(srds, prefix, "gz-l40s") == dict.fromkeys(range(8), 1000)
        assert await w.free("gz-l40s") == 8


async def test_concurrent_share_requests_never_overbook_a_device(settings, nc, srds, prefix) -> None:
    """24 shares of 300 milli asked at once of 8 devices: whichever are placed, each
    device holds at most 1000 milli of them, the devices' hash says exactly what the
    leases took, and once all are released every device is wholly free."""
    import asyncio

    async with broker_world(settings, POOLS) as w:
        replies = await asyncio.gather(*(w.request(f"t{1 + i % 2}", {"units": 1, "share": {"milli": 300},
                                                                    "queue": False}) for i in range(24)))
        assert all(r.status_code in (201, 409) for r in replies), [r.text for r in replies]
        placed = [(f"t{1 + i % 2}", r.json()["leases"][0]["lease_id"]) for i, r in enumerate(replies)
                  if r.status_code == 201]
        assert len(placed) >= 8, [r.text for r in replies]
        taken: dict[int, int] = {}
        for _, lease_id in placed:
            lease = stored(srds, prefix, lease_id)
            assert lease.pool_id == "gz-l40s" and lease.milli == 300 and len(lease.devices) == 1
            taken[lease.devices[0]] = taken.get(lease.devices[0], 0) + 300
        assert all(t <= 1000 for t in taken.values()), taken
        assert devices(srds, prefix, "gz-l40s") == {d: 1000 - taken.get(d, 0) for d in range(8)}
        for tenant, lease_id in placed:
            r = await w.broker.post(f"/v1/leases/{lease_id}/release", headers=w.tenants[tenant])
            assert r.status_code == 200, r.text
        assert devices(srds, prefix, "gz-l40s") == dict.fromkeys(range(8), 1000)


async def test_a_share_preempts_an_interruptible_lease_on_a_sharing_pool(settings, nc, subjects, srds, prefix) -> None:
    """A sharing pool full of interruptible whole-device leases: an on-demand share ends
    one of them and takes its milli on the device it freed, in one step."""
    spot = {**POOLS["gz-l40s"], "prices": {"on_demand": "1.20", "interruptible": "0.40"}}
    async with broker_world(settings, {"gz-l40s": spot}) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        for _ in range(8):
            r = await w.request("t2", {"units": 1, "billing": "interruptible", "priority": 1})
            assert r.status_code == 201, r.text
        assert await w.free("gz-l40s") == 0
        r = await w.request("t1", {"units": 1, "share": {"milli": 400}, "queue": False})
        assert r.status_code == 201, r.text
        [share] = r.json()["leases"]
        granted = await alloc.wait_for(lambda e: isinstance(e, LeaseGranted) and e.lease.lease_id == share["lease_id"])
        [device] = granted.lease.devices
        assert granted.lease.milli == 400 and granted.devices_free_after == (600,)
        preempted = await alloc.wait_for(lambda e: type(e).__name__ == "LeasePreempted")
        assert preempted.lease.devices == (device,) and preempted.devices_free_after == (1000,)
        assert devices(srds, prefix, "gz-l40s") == {d: 600 if d == device else 0 for d in range(8)}

