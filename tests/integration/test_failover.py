"""Failover (issue 12, item 4) through the public HTTP API on real NATS, JetStream and
Redis: a pool removed under a lease, and the request gets a lease on another pool under
the same request id (attempt 2, ``replaces`` set, ``lease.replaced`` published), never
on a pool that failed it, within ``max_replacements``; ``on_failure: fail`` stops at the
first failure; a replacement with nowhere to go waits in the queue."""

from __future__ import annotations

import time

from services.common.messages import AllocEvent, LeaseLost, LeaseProvisioning, LeaseReplaced

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


# --- delivery: the provider answers failed, or never answers ------------------------------------
SSH = {"kind": "ssh", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA tenant@laptop"]}
TIMEOUT_S = 5
ACME = {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 8, "prices": {"on_demand": "1.00"},
        "delivery": ["ssh"], "provision_timeout_s": TIMEOUT_S}
ZETA = {**ACME, "prices": {"on_demand": "1.50"}}


async def _two_providers(world: World) -> dict[str, str]:
    """acme's pool (the cheapest) and zeta's, both delivering ssh; zeta's key."""
    await world.pool("acme-ssh", **ACME)
    zeta = await world.key("provider", "zeta")
    r = await world.registry.put("/v1/pools/zeta-ssh", json=ZETA, headers=zeta)
    assert r.status_code == 201, r.text
    return zeta


async def _lands_on_zeta(world: World, alloc: EventTap, first: dict, request_id: str, since: float,
                         zeta: dict[str, str]) -> None:
    """The replacement is granted on zeta's pool within provision_timeout_s + 2 s of the
    request, under the same request id, and delivers when zeta answers ready."""
    grant = await alloc.wait_for(lambda e: isinstance(e, LeaseProvisioning) and e.lease.replaces == first["lease_id"],
                                 timeout=TIMEOUT_S + 2)
    assert time.monotonic() - since <= TIMEOUT_S + 2
    assert grant.lease.pool_id == "zeta-ssh" and grant.lease.provider == "zeta"
    assert grant.lease.request_id == request_id and grant.lease.attempt == 2 and grant.lease.delivery == "ssh"
    replaced = await _replaced(alloc, first["lease_id"])
    assert replaced.by_lease == grant.lease.lease_id and replaced.by_pool == "zeta-ssh"
    r = await world.broker.post(f"/v1/leases/{grant.lease.lease_id}/ready", json={"access": {"host": "z.example"}},
                                headers=zeta)
    assert r.status_code == 200, r.text
    view = await _view(world, request_id)
    [lease] = view["leases"]
    assert (lease["lease_id"], lease["state"], lease["access"]["host"]) == (grant.lease.lease_id, "ready", "z.example")
    failed, ready = view["attempts"]
    assert (failed["pool_id"], failed["provider"], failed["state"], failed["charged"]) == \
        ("acme-ssh", "acme", "failed", False)
    assert (ready["pool_id"], ready["state"], ready.get("charged", True)) == ("zeta-ssh", "ready", True)
    assert await world.free("acme-ssh") == 8


async def test_a_provider_that_answers_failed_is_replaced_by_another_provider(settings, nc, subjects) -> None:
    async with broker_world(settings) as world, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        zeta = await _two_providers(world)
        since = time.monotonic()
        r = await world.request("t1", {"units": 2, "workload": SSH})
        assert r.status_code == 201, r.text
        request_id, first = r.json()["request_id"], r.json()["leases"][0]
        assert (first["pool_id"], first["state"]) == ("acme-ssh", "provisioning")
        r = await world.broker.post(f"/v1/leases/{first['lease_id']}/failed", json={"reason": "image pull failed"},
                                    headers=world.provider)
        assert r.status_code == 200, r.text
        await _lands_on_zeta(world, alloc, first, request_id, since, zeta)
        assert (await _view(world, request_id))["attempts"][0]["reason"] == "image pull failed"


async def test_a_provider_that_never_answers_is_replaced_by_another_provider(settings, nc, subjects) -> None:
    async with broker_world(settings) as world, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        zeta = await _two_providers(world)
        since = time.monotonic()
        r = await world.request("t1", {"units": 2, "workload": SSH})
        assert r.status_code == 201, r.text
        request_id, first = r.json()["request_id"], r.json()["leases"][0]
        assert first["pool_id"] == "acme-ssh"
        await _lands_on_zeta(world, alloc, first, request_id, since, zeta)
        assert (await _view(world, request_id))["attempts"][0]["reason"] == f"not ready within {TIMEOUT_S} s"


async def test_bad_failover_settings_are_refused_and_place_nothing(settings) -> None:
    async with broker_world(settings, {"a": _pool("1.00")}) as world:
        for bad, field in (({"on_failure": "retry"}, "on_failure"), ({"max_replacements": 11}, "max_replacements"),
                           ({"max_replacements": -1}, "max_replacements"), ({"on_failure": None}, "on_failure")):
            r = await world.request("t1", {"units": 1, **bad})
            assert r.status_code == 400 and field in r.text, (bad, r.status_code, r.text)
        assert await world.free("a") == 8
