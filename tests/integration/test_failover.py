"""Failover (issue 12, item 4) through the public HTTP API on real NATS, JetStream and
Redis: a pool removed under a lease, and the request gets a lease on another pool under
the same request id (attempt 2, ``replaces`` set, ``lease.replaced`` published), never
on a pool that failed it, within ``max_replacements``; ``on_failure: fail`` stops at the
first failure; a replacement with nowhere to go waits in the queue."""

from __future__ import annotations

from services.common.messages import AllocEvent, LeaseLost, LeaseReplaced

from ..helpers import EventTap, eventually
from .broker_world import World, broker_world


def _pool(price: str, units: int = 8) -> dict:
    return {"units": units, "units_per_node": units, "prices": {"currency": "USD", "on_demand": price}}


async def _remove(world: World, pool_id: str) -> None:
    r = await world.registry.delete(f"/v1/pools/{pool_id}", headers=world.provider)
    assert r.status_code == 200, r.text


async def _view(world: World, request_id: str) -> dict:
    r = await world.broker.get(f"/v1/requests/{request_id}", headers=world.tenants["t1"])
    assert r.status_code == 200, r.text
    return r.json()


async def _replaced(alloc: EventTap, old: str) -> LeaseReplaced:
    return await alloc.wait_for(lambda e: isinstance(e, LeaseReplaced) and e.lease.lease_id == old)


async def test_a_removed_pool_is_replaced_on_another_pool(settings, nc, subjects) -> None:
    """Before: the lease ended as lease.lost and the request was left with nothing."""
    pools = {"a": _pool("1.00"), "b": _pool("2.00")}
    async with broker_world(settings, pools) as world, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        r = await world.request("t1", {"units": 4, "duration_s": 3600})
        assert r.status_code == 201, r.text
        request_id, first = r.json()["request_id"], r.json()["leases"][0]
        assert first["pool_id"] == "a" and first["attempt"] == 1
        await _remove(world, "a")
        replaced = await _replaced(alloc, first["lease_id"])
        assert replaced.by_pool == "b" and replaced.lease.request_id == request_id
        view = await _view(world, request_id)
        assert view["state"] == "placed"
        [lease] = view["leases"]
        assert lease["lease_id"] == replaced.by_lease and lease["pool_id"] == "b"
        assert lease["request_id"] == request_id and lease["attempt"] == 2 and lease["replaces"] == first["lease_id"]
        assert lease["expires_at"] == first["expires_at"]  # a fixed end is kept: the remaining duration only
        attempts = view["attempts"]
        assert [(a["pool_id"], a["state"]) for a in attempts] == [("a", "lost"), ("b", "ready")]
        assert "removed" in attempts[0]["reason"]
        lost = next(e for e in alloc.events if isinstance(e, LeaseLost) and e.lease.lease_id == first["lease_id"])
        assert replaced.seq == lost.seq + 1 and replaced.id == f"{first['lease_id']}.{lost.seq + 1}"
        assert await world.free("b") == 4


async def test_a_failed_pool_is_never_chosen_again_and_a_replacement_waits_for_capacity(settings, nc,
                                                                                          subjects) -> None:
    pools = {"a": _pool("1.00"), "b": _pool("2.00"), "c": _pool("3.00")}
    async with broker_world(settings, pools) as world, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        r = await world.request("t1", {"units": 4, "max_replacements": 5})
        assert r.status_code == 201, r.text
        request_id, on_a = r.json()["request_id"], r.json()["leases"][0]["lease_id"]
        await _remove(world, "a")
        on_b = (await _replaced(alloc, on_a)).by_lease
        await world.pool("a", **_pool("0.50"))  # back, cheapest of all: still never chosen for this request
        await _remove(world, "b")
        third = await _replaced(alloc, on_b)
        assert third.by_pool == "c"
        await _remove(world, "c")  # only "a" is left, which failed this request: the replacement waits
        await alloc.wait_for(lambda e: isinstance(e, LeaseLost) and e.lease.request_id == request_id
                             and e.lease.pool_id == "c")
        view = await eventually(lambda: _queued(world, request_id), what="the replacement queued")
        assert view["leases"] == [] and "waits for capacity" in view["reasons"][-1]
        assert await world.free("a") == 8
        await world.pool("d", **_pool("4.00"))  # capacity appears: the queued replacement lands there
        fourth = await _replaced(alloc, third.by_lease)
        assert fourth.by_pool == "d"
        view = await _view(world, request_id)
        assert view["state"] == "placed"
        [lease] = view["leases"]
        assert lease["pool_id"] == "d" and lease["attempt"] == 4 and lease["replaces"] == third.by_lease
        assert [a["pool_id"] for a in view["attempts"]] == ["a", "b", "c", "d"]
        assert await world.free("a") == 8


async def _queued(world: World, request_id: str) -> dict | None:
    view = await _view(world, request_id)
    return view if view["state"] == "queued" else None


async def _state(world: World, request_id: str, state: str) -> dict | None:
    view = await _view(world, request_id)
    return view if view["state"] == state else None


async def test_max_replacements_is_respected(settings, nc, subjects) -> None:
    pools = {"a": _pool("1.00"), "b": _pool("2.00"), "c": _pool("3.00")}
    async with broker_world(settings, pools) as world, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        r = await world.request("t1", {"units": 2, "max_replacements": 1})
        assert r.status_code == 201, r.text
        request_id, on_a = r.json()["request_id"], r.json()["leases"][0]["lease_id"]
        await _remove(world, "a")
        on_b = (await _replaced(alloc, on_a)).by_lease
        await _remove(world, "b")
        view = await eventually(lambda: _state(world, request_id, "failed"), what="the request failed")
        assert view["leases"] == [] and "max_replacements (1) reached" in view["reasons"][-1]
        assert [(a["pool_id"], a["state"]) for a in view["attempts"]] == [("a", "lost"), ("b", "lost")]
        assert not any(isinstance(e, LeaseReplaced) and e.lease.lease_id == on_b for e in alloc.events)
        assert await world.free("c") == 8


async def test_on_failure_fail_records_the_attempt_and_stops(settings, nc, subjects) -> None:
    pools = {"a": _pool("1.00"), "b": _pool("2.00")}
    async with broker_world(settings, pools) as world, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        r = await world.request("t1", {"units": 2, "on_failure": "fail"})
        assert r.status_code == 201, r.text
        request_id, on_a = r.json()["request_id"], r.json()["leases"][0]["lease_id"]
        await _remove(world, "a")
        view = await eventually(lambda: _state(world, request_id, "failed"), what="the request failed")
        assert "on_failure is fail" in view["reasons"][-1]
        assert [(a["pool_id"], a["state"], a["lease_id"]) for a in view["attempts"]] == [("a", "lost", on_a)]
        assert not any(isinstance(e, LeaseReplaced) for e in alloc.events)
        assert await world.free("b") == 8


async def test_a_split_request_replaces_only_the_part_it_lost(settings, nc, subjects) -> None:
    pools = {"a": _pool("1.00", 4), "b": _pool("1.10", 4), "c": _pool("2.00", 8)}
    async with broker_world(settings, pools) as world, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        r = await world.request("t1", {"units": 8, "shape": {"kind": "split", "max_pools": 2}})
        assert r.status_code == 201, r.text
        request_id = r.json()["request_id"]
        leases = {lease["pool_id"]: lease for lease in r.json()["leases"]}
        assert set(leases) == {"a", "b"}
        await _remove(world, "a")
        replaced = await _replaced(alloc, leases["a"]["lease_id"])
        assert replaced.by_pool == "c"
        view = await _view(world, request_id)
        assert sorted((lease["pool_id"], lease["units"], lease["attempt"]) for lease in view["leases"]) == \
            [("b", 4, 1), ("c", 4, 2)]
        assert await world.free("c") == 4
