"""The broker through its HTTP API, with a real registry, NATS and Redis."""

from __future__ import annotations

import itertools
from decimal import Decimal

import msgspec
import pytest

from services.common.messages import AllocEvent, LeaseGranted, LeaseReleased, RequestEvent, RequestPlaced

from ..helpers import EventTap, eventually
from .broker_world import broker_world
from .conftest import pool_body

POOLS = {
    "yrd-a100": {"region": "cn-yrd", "model": "nvidia-a100-sxm-80gb", "units": 16,
                 "prices": {"on_demand": "2.10", "reserved_month": "1100", "interruptible": "0.8"}},
    "use-h100": {"region": "us-east", "model": "nvidia-h100-sxm-80gb", "units": 8,
                 "prices": {"on_demand": "3.00"}},
    "gz-910b": {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 32, "prices": {"on_demand": "1.20"}},
}


async def test_smallest_request_is_placed_durably(settings, nc, subjects) -> None:
    async with broker_world(settings, POOLS) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc, \
            EventTap(nc.jetstream(), subjects.events("request"), RequestEvent) as reqs:
        r = await w.request("t1", {"units": 1})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["state"] == "placed" and len(body["leases"]) == 1
        lease = body["leases"][0]
        assert lease["pool_id"] == "gz-910b" and lease["units"] == 1 and lease["unit_price"] == "1.20"
        assert lease["renewable"] is True and lease["tenant"] == "t1"
        # durable before the 201: the grant is already in the stream
        info = await nc.jetstream().stream_info(subjects.stream("alloc"))
        assert info.state.messages == 1
        granted = await alloc.wait_for(lambda e: isinstance(e, LeaseGranted))
        assert granted.lease.lease_id == lease["lease_id"] and granted.lease.billing == "on_demand"
        assert str(granted.lease.unit_price) == "1.20" and granted.free_after == 31
        await reqs.wait_for(lambda e: isinstance(e, RequestPlaced) and e.request_id == body["request_id"])
        assert await w.free("gz-910b") == 31
        # visible to its tenant, not to another
        assert (await w.broker.get(f"/v1/leases/{lease['lease_id']}", headers=w.tenants["t1"])).status_code == 200
        assert (await w.broker.get(f"/v1/leases/{lease['lease_id']}", headers=w.tenants["t2"])).status_code == 404
        assert (await w.broker.get(f"/v1/requests/{body['request_id']}", headers=w.tenants["t2"])).status_code == 404
        mine = (await w.broker.get("/v1/leases", headers=w.tenants["t1"])).json()
        assert [x["lease_id"] for x in mine] == [lease["lease_id"]]
        assert (await w.broker.get("/v1/leases", headers=w.tenants["t2"])).json() == []

        r = await w.broker.post(f"/v1/leases/{lease['lease_id']}/release", headers=w.tenants["t2"])
        assert r.status_code == 404
        r = await w.broker.post(f"/v1/leases/{lease['lease_id']}/release", headers=w.tenants["t1"])
        assert r.status_code == 200
        await alloc.wait_for(lambda e: isinstance(e, LeaseReleased) and e.lease.lease_id == lease["lease_id"])
        assert await w.free("gz-910b") == 32
        assert (await w.broker.post(f"/v1/leases/{lease['lease_id']}/release",
                                    headers=w.tenants["t1"])).status_code == 404


async def test_constraints_choose_the_pool(settings, nc) -> None:
    async with broker_world(settings, POOLS) as w:
        r = await w.request("t1", {"units": 4, "accelerators": {"vendors": ["nvidia"]}})
        assert r.status_code == 201 and r.json()["leases"][0]["pool_id"] == "yrd-a100"
        r = await w.request("t1", {"units": 2, "placement": {"regions": ["us-east"]}})
        assert r.status_code == 201 and r.json()["leases"][0]["pool_id"] == "use-h100"
        r = await w.request("t1", {"units": 1, "billing": "reserved_month"})
        assert r.status_code == 201
        lease = r.json()["leases"][0]
        assert lease["pool_id"] == "yrd-a100" and lease["price_basis"] == "unit_month"
        assert lease["renewable"] is False
        r = await w.broker.post(f"/v1/leases/{lease['lease_id']}/renew", headers=w.tenants["t1"])
        assert r.status_code == 409


async def test_quote_reserves_nothing(settings, nc) -> None:
    async with broker_world(settings, POOLS) as w:
        r = await w.broker.post("/v1/quotes", json={"units": 8, "placement": {"data_region": "cn-gz",
                                                                               "data_gb": 500}},
                                headers=w.tenants["t1"])
        assert r.status_code == 200, r.text
        q = r.json()
        assert q["placeable_now"] and len(q["options"]) >= 2
        best = q["options"][0]
        assert best["allocations"][0]["pool_id"] == "gz-910b" and Decimal(best["transfer_cost"]) == 0
        costs = [float(o["total_cost"]) for o in q["options"]]
        assert costs == sorted(costs)
        assert await w.free("gz-910b") == 32 and await w.free("yrd-a100") == 16


async def test_never_placeable_is_422_with_reasons(settings, nc) -> None:
    async with broker_world(settings, POOLS) as w:
        for body, words in (({"units": 64}, "64"),
                            ({"units": 1, "accelerators": {"min_memory_gib": 200}}, "GB per unit"),
                            ({"units": 1, "placement": {"regions": ["eu-central"]}}, "region"),
                            ({"units": 1, "max_price": "0.5"}, "max")):
            r = await w.request("t1", body)
            assert r.status_code == 422, (body, r.text)
            problem = r.json()
            assert problem["reasons"] and any(words in reason for reason in problem["reasons"]), problem
        for pool_id, pool in POOLS.items():
            assert await w.free(pool_id) == pool["units"]


async def test_queue_then_placed_on_release(settings, nc, subjects) -> None:
    async with broker_world(settings, {"gz-910b": POOLS["gz-910b"]}) as w, \
            EventTap(nc.jetstream(), subjects.events("request"), RequestEvent) as reqs:
        first = await w.request("t1", {"units": 32})
        assert first.status_code == 201
        r = await w.request("t2", {"units": 8})
        assert r.status_code == 202, r.text
        queued = r.json()
        assert queued["state"] == "queued" and queued["queue_position"] == 1 and queued["reasons"]
        # queue: false -> 409, nothing queued
        r = await w.request("t2", {"units": 8, "queue": False})
        assert r.status_code == 409
        lease_id = first.json()["leases"][0]["lease_id"]
        assert (await w.broker.post(f"/v1/leases/{lease_id}/release", headers=w.tenants["t1"])).status_code == 200
        placed = await reqs.wait_for(lambda e: isinstance(e, RequestPlaced) and e.request_id == queued["request_id"])
        assert len(placed.lease_ids) == 1
        view = (await w.broker.get(f"/v1/requests/{queued['request_id']}", headers=w.tenants["t2"])).json()
        assert view["state"] == "placed" and view["leases"][0]["units"] == 8
        assert await w.free("gz-910b") == 24


async def test_cancel_queued(settings, nc) -> None:
    async with broker_world(settings, {"gz-910b": POOLS["gz-910b"]}) as w:
        assert (await w.request("t1", {"units": 32})).status_code == 201
        queued = (await w.request("t2", {"units": 4})).json()
        assert (await w.broker.delete(f"/v1/requests/{queued['request_id']}",
                                      headers=w.tenants["t1"])).status_code == 404
        r = await w.broker.delete(f"/v1/requests/{queued['request_id']}", headers=w.tenants["t2"])
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        r = await w.broker.delete(f"/v1/requests/{queued['request_id']}", headers=w.tenants["t2"])
        assert r.status_code == 409


async def test_idempotency_key(settings, nc) -> None:
    async with broker_world(settings, POOLS) as w:
        h = {"Idempotency-Key": "order-42"}
        one = await w.request("t1", {"units": 2}, headers=h)
        two = await w.request("t1", {"units": 2}, headers=h)
        assert one.status_code == two.status_code == 201
        assert one.json() == two.json()
        assert await w.free("gz-910b") == 30  # once
        r = await w.request("t1", {"units": 3}, headers=h)
        assert r.status_code == 422 and "different body" in r.json()["detail"]
        # the same key is another tenant's own key space
        r = await w.request("t2", {"units": 2}, headers=h)
        assert r.status_code == 201 and r.json()["request_id"] != one.json()["request_id"]


async def test_lease_expires_without_renewal(settings, nc, subjects) -> None:
    from services.common.messages import LeaseExpired, LeaseRenewed

    async with broker_world(settings, POOLS) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        r = await w.request("t1", {"units": 4, "lease_ttl_s": 2})
        lease = r.json()["leases"][0]
        r = await w.broker.post(f"/v1/leases/{lease['lease_id']}/renew", headers=w.tenants["t1"])
        assert r.status_code == 200 and r.json()["expires_at"] > lease["expires_at"]
        await alloc.wait_for(lambda e: isinstance(e, LeaseRenewed) and e.seq == 2)
        expired = await alloc.wait_for(lambda e: isinstance(e, LeaseExpired), timeout=10)
        assert expired.lease.lease_id == lease["lease_id"] and expired.seq == 3
        assert await w.free("gz-910b") == 32
        assert (await w.broker.post(f"/v1/leases/{lease['lease_id']}/renew",
                                    headers=w.tenants["t1"])).status_code == 404


async def test_pool_removed_marks_leases_lost(settings, nc, subjects) -> None:
    from services.common.messages import LeaseLost

    async with broker_world(settings, POOLS) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        lease = (await w.request("t1", {"units": 4})).json()["leases"][0]
        assert (await w.registry.delete("/v1/pools/gz-910b", headers=w.provider)).status_code == 200
        lost = await alloc.wait_for(lambda e: isinstance(e, LeaseLost))
        assert lost.lease.lease_id == lease["lease_id"] and "removed" in lost.reason
        assert (await w.broker.get(f"/v1/leases/{lease['lease_id']}", headers=w.tenants["t1"])).status_code == 404
        # the next request goes elsewhere
        r = await w.request("t1", {"units": 1})
        assert r.status_code == 201 and r.json()["leases"][0]["pool_id"] != "gz-910b"


BAD = {
    "no units": {},
    "zero units": {"units": 0},
    "absurd units": {"units": 10**9},
    "both units and performance": {"units": 1, "performance": {"min_tflops": 100}},
    "unknown model": {"units": 1, "accelerators": {"models": ["nvidia-h9000"]}},
    "unknown vendor": {"units": 1, "accelerators": {"vendors": ["acme-chips"]}},
    "unknown stack": {"units": 1, "accelerators": {"stacks": ["cobol"]}},
    "unknown region": {"units": 1, "placement": {"regions": ["atlantis"]}},
    "latency without users": {"units": 1, "placement": {"max_latency_ms": 20}},
    "data without region": {"units": 1, "placement": {"data_gb": 100}},
    "reserved with duration": {"units": 1, "billing": "reserved_year", "duration_s": 3600},
    "malformed duration": {"units": 1, "duration_s": "1h"},
    "negative duration": {"units": 1, "duration_s": -5},
    "unknown billing": {"units": 1, "billing": "free"},
    "unknown field": {"units": 1, "colour": "red"},
    "bad price": {"units": 1, "max_price": "-3"},
    "nan price": {"units": 1, "max_price": "NaN"},
    "deadline but no queue": {"units": 1, "queue": False, "deadline_s": 60},
    "bad priority": {"units": 1, "priority": 42},
    "not an object": [1],
    "contradictory residency": {"units": 1, "placement": {"regions": ["cn-gz"], "countries": ["US"]}},
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_bad_requests_are_4xx_and_reserve_nothing(settings, nc, case: str) -> None:
    async with broker_world(settings, {"gz-910b": POOLS["gz-910b"]}) as w:
        r = await w.request("t1", BAD[case])
        assert 400 <= r.status_code < 500 and r.status_code != 404, (case, r.status_code, r.text)
        assert r.json()["detail"], r.text
        assert await w.free("gz-910b") == 32
        assert (await w.broker.get("/v1/leases", headers=w.tenants["t1"])).json() == []


async def test_roles(settings, nc) -> None:
    async with broker_world(settings, POOLS) as w:
        assert (await w.broker.post("/v1/requests", json={"units": 1})).status_code == 401
        assert (await w.broker.post("/v1/requests", json={"units": 1}, headers=w.provider)).status_code == 403
        ops = await w.key("ops")
        assert (await w.broker.post("/v1/requests", json={"units": 1}, headers=ops)).status_code == 403
        lease = (await w.request("t1", {"units": 1})).json()["leases"][0]
        assert (await w.broker.get(f"/v1/leases/{lease['lease_id']}", headers=ops)).status_code == 200
        assert (await w.broker.post(f"/v1/leases/{lease['lease_id']}/release", headers=ops)).status_code == 403
        assert len((await w.broker.get("/v1/leases", params={"tenant": "t1"}, headers=ops)).json()) == 1
        assert (await w.broker.get("/v1/leases", params={"tenant": "t1"},
                                   headers=w.tenants["t2"])).status_code == 404  # another tenant's: nothing leaks


async def test_interruptible_leases_are_preempted_for_on_demand(settings, nc, subjects) -> None:
    from services.common.messages import LeasePreempted

    pools = {"yrd-a100": POOLS["yrd-a100"]}
    async with broker_world(settings, pools) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        cheap = await w.request("t1", {"units": 12, "billing": "interruptible", "priority": 2})
        assert cheap.status_code == 201 and cheap.json()["leases"][0]["unit_price"] == "0.8"
        other = await w.request("t1", {"units": 4, "billing": "interruptible", "priority": 6})
        assert other.status_code == 201
        # a higher-priority interruptible request may take only lower-priority capacity
        r = await w.request("t2", {"units": 16, "billing": "interruptible", "priority": 4, "queue": False})
        assert r.status_code == 409
        # an on-demand request may preempt interruptible capacity
        r = await w.request("t2", {"units": 10})
        assert r.status_code == 201, r.text
        notice = await alloc.wait_for(lambda e: isinstance(e, LeasePreempted))
        assert notice.lease.lease_id == cheap.json()["leases"][0]["lease_id"]
        assert notice.by_request == r.json()["request_id"]
        # the higher-priority interruptible lease survived; nothing is overbooked
        alive = {x["lease_id"] for x in (await w.broker.get("/v1/leases", headers=w.tenants["t1"])).json()}
        assert alive == {other.json()["leases"][0]["lease_id"]}
        assert await w.free("yrd-a100") == 16 - 4 - 10


async def test_budget_exhausted_stops_placing_and_revokes_after_grace(settings, nc, subjects) -> None:
    from datetime import UTC, datetime

    import msgspec

    from services.common.messages import BudgetExhausted, BudgetRestored, LeaseRevoked
    from services.common.nats_conn import publish_event

    fast = msgspec.structs.replace(settings, budget_grace_s=0.5, sweep_interval_s=0.1)
    async with broker_world(fast, POOLS) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        on_demand = (await w.request("t1", {"units": 2})).json()["leases"][0]
        reserved = (await w.request("t1", {"units": 1, "billing": "reserved_month"})).json()["leases"][0]
        js = nc.jetstream()
        await publish_event(js, subjects.billing("t1"), BudgetExhausted(
            id="b1", at=datetime.now(UTC), tenant="t1", budget=Decimal("10"), spent=Decimal("10.5")))
        revoked = await alloc.wait_for(lambda e: isinstance(e, LeaseRevoked), timeout=10)
        assert revoked.lease.lease_id == on_demand["lease_id"] and "budget" in revoked.reason
        r = await w.request("t1", {"units": 1})
        assert r.status_code == 422 and "budget" in r.json()["detail"]
        assert (await w.request("t2", {"units": 1})).status_code == 201  # others unaffected
        alive = {x["lease_id"] for x in (await w.broker.get("/v1/leases", headers=w.tenants["t1"])).json()}
        assert alive == {reserved["lease_id"]}  # paid in advance: keeps running
        await publish_event(js, subjects.billing("t1"), BudgetRestored(id="b2", at=datetime.now(UTC), tenant="t1"))

        from ..helpers import eventually

        async def placeable() -> bool:
            return (await w.request("t1", {"units": 1})).status_code == 201

        await eventually(placeable, timeout=5)


async def test_a_queued_request_stays_queued_when_its_grant_cannot_be_recorded(settings, nc, subjects) -> None:
    """The allocation stream refusing the grant is the event store's failure, not the
    request's: it stays queued (and says why) and is placed once the store takes grants."""
    js = nc.jetstream()
    async with broker_world(settings, {"gz-910b": POOLS["gz-910b"]}) as w:
        assert (await w.request("t1", {"units": 32})).status_code == 201
        queued = (await w.request("t2", {"units": 8})).json()
        assert queued["state"] == "queued"
        info = await js.stream_info(subjects.stream("alloc"))
        config = info.config
        config.max_msg_size = 64
        await js.update_stream(config)  # the allocation stream now refuses every grant (too big)
        await w.pool("gz-910b-2", **{**POOLS["gz-910b"], "units": 8})  # capacity appears: a queue pass runs

        async def said_why() -> bool:
            view = (await w.broker.get(f"/v1/requests/{queued['request_id']}", headers=w.tenants["t2"])).json()
            assert view["state"] in ("queued", "placing"), view  # never rejected for the store's failure
            return any("not granted" in r for r in view["reasons"])

        await eventually(said_why, timeout=30)
        config.max_msg_size = -1
        await js.update_stream(config)
        await w.pool("gz-910b-3", **{**POOLS["gz-910b"], "units": 8})  # another capacity event, another pass

        async def placed() -> bool:
            view = (await w.broker.get(f"/v1/requests/{queued['request_id']}", headers=w.tenants["t2"])).json()
            return view["state"] == "placed"

        await eventually(placed, timeout=30)


async def test_a_reservation_batch_that_fails_after_running_gives_the_units_back(settings, nc) -> None:
    """Redis (or a cluster node) fails the whole reservation pipeline after its scripts
    ran: the placement is a 503 and every unit it took comes back."""
    import redis.exceptions

    async with broker_world(settings, {"gz-910b": POOLS["gz-910b"]}) as w:
        leases = w.broker.app.state.broker.leases
        real = leases.reserve_many

        async def ran_then_failed(groups):  # noqa: ANN001, ANN202
            await real(groups)
            raise redis.exceptions.ConnectionError("connection lost after the pipeline was sent")

        leases.reserve_many = ran_then_failed
        r = await w.request("t1", {"units": 3})
        assert r.status_code == 503, r.text
        assert await w.free("gz-910b") == 32
        leases.reserve_many = real
        r = await w.request("t1", {"units": 3})
        assert r.status_code == 201, r.text
        assert await w.free("gz-910b") == 29


def _cn_gz_pools(n: int) -> dict[str, dict]:
    """``n`` pools of 8 units alike but for their price (1.00, 1.01, ...): best first."""
    return {f"gz-{i:02d}": {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 8,
                            "prices": {"on_demand": f"{1 + i / 100:.2f}"}} for i in range(n)}


def _losing_races(leases, lose: dict[str, int], tried: list[str]):  # noqa: ANN001, ANN202
    """``reserve_many`` under which the first ``lose["n"]`` reservations lose their race:
    just before each, a rival broker reserves every free unit of that pool (for real, in
    Redis), so the broker's own script refuses it."""
    real = leases.reserve_many
    rivals = itertools.count()

    async def reserve_many(groups):  # noqa: ANN001, ANN202
        out = []
        for group in groups:
            region, group_leases, expires = group
            tried.append(group_leases[0].pool_id)
            if lose["n"] > 0:
                lose["n"] -= 1
                pool_id = group_leases[0].pool_id
                free = int(await leases.redis.hget(leases.keys.pool(region, pool_id), "free"))
                rival = msgspec.structs.replace(group_leases[0], lease_id=f"rival-{next(rivals)}", tenant="rival",
                                                units=free)
                assert (await leases.reserve(region, [rival], expires))[0]
            out += await real([group])
        return out

    return reserve_many


async def test_a_placement_that_keeps_losing_races_tries_on_before_giving_up(settings, nc) -> None:
    """Replicas race for the same units; the loser learns the pool's real free count and
    matches again. Eleven lost races in a row still end in a placement."""
    async with broker_world(settings, _cn_gz_pools(16)) as w:
        leases = w.broker.app.state.broker.leases
        lose, tried = {"n": 11}, []
        leases.reserve_many = _losing_races(leases, lose, tried)
        r = await w.request("t1", {"units": 8})
        assert r.status_code == 201, r.text
        placed = r.json()["leases"][0]["pool_id"]
        assert len(tried) == 12 and placed == tried[-1] and placed not in tried[:-1], tried
        assert await w.free(placed) == 0


async def test_after_a_lost_race_the_runners_up_are_tried_in_random_order(settings, nc) -> None:
    """Replicas that lost a race to each other must not all reach for the same next-best
    pool (they would lose again, and again): after a lost race the broker tries the best
    few options in a random order. Eight placements, each losing its first race: with the
    options tried best first, every second try would be the cheapest pool still in view;
    in random order, that happens eight times in a row with probability (1/3)^8."""
    pools = _cn_gz_pools(24)
    async with broker_world(settings, pools) as w:
        leases = w.broker.app.state.broker.leases
        lose, tried = {"n": 0}, []
        leases.reserve_many = _losing_races(leases, lose, tried)
        gone: set[str] = set()  # taken whole, by the rival or by a placement
        cheapest_second = []
        for _ in range(8):
            lose["n"], tried[:] = 1, []
            r = await w.request("t1", {"units": 8})
            assert r.status_code == 201, r.text
            assert len(tried) == 2, tried
            in_view = sorted(p for p in pools if p not in gone | {tried[0]})  # by price
            cheapest_second.append(tried[1] == in_view[0])
            gone |= set(tried)
        assert not all(cheapest_second), tried


async def test_unlocated_and_spot_only_pools_end_to_end(settings, nc) -> None:
    """A catalogue's offers of unknown location and its spot-only offers, through the real
    registry and broker: placed where nothing forbids it, refused with the reason where a
    location or on-demand price would be needed; the quote says the location is unknown."""
    async with broker_world(settings) as w:
        nowhere = {"id": "daytona-unlocated", "name": "daytona: location unknown", "country": "ZZ",
                   "lat": 0.0, "lon": 0.0, "located": False}
        r = await w.registry.put("/v1/regions/daytona-unlocated", json=nowhere, headers=w.admin)
        assert r.status_code == 200 and r.json()["located"] is False, r.text
        r = await w.registry.get("/v1/network", params={"src": "us-east", "dst": "daytona-unlocated"})
        assert r.status_code == 200 and r.json() == []  # no link is made up for it
        await w.pool("far-h100", region="daytona-unlocated", model="nvidia-h100-sxm-80gb", units=8,
                     prices={"on_demand": "2.00"}, availability="listed")
        await w.pool("spot-a100", region="eu-west", model="nvidia-a100-sxm-80gb", units=8,
                     prices={"interruptible": "0.70"}, availability="listed")
        r = await w.registry.put("/v1/pools/no-price", json=pool_body(prices={"currency": "USD"}),
                                 headers=w.provider)
        assert r.status_code == 422 and "at least one of on_demand" in r.text, r.text

        async def quote(body: dict) -> dict:
            r = await w.broker.post("/v1/quotes", json=body, headers=w.tenants["t1"])
            assert r.status_code == 200, r.text
            return r.json()

        h100 = {"units": 8, "accelerators": {"models": ["nvidia-h100-sxm-80gb"]}}
        q = await eventually(lambda: _placeable(quote(h100)), what="the unlocated pool is matchable")
        alloc = q["options"][0]["allocations"][0]
        assert (alloc["pool_id"], alloc["location"], alloc["availability"]) == ("far-h100", "unknown", "listed")
        for placement, check in (({"users_region": "us-east", "max_latency_ms": 500}, "latency"),
                                 ({"countries": ["US"]}, "residency"),
                                 ({"data_region": "us-east", "data_gb": 10}, "distance to data")):
            r = await w.request("t1", {**h100, "placement": placement})
            assert r.status_code == 422, r.text
            assert any("location of pool far-h100 unknown" in x and check in x for x in r.json()["reasons"]), r.text

        a100 = {"units": 8, "accelerators": {"models": ["nvidia-a100-sxm-80gb"]}}
        await eventually(lambda: _placeable(quote({**a100, "billing": "interruptible"})), what="spot pool matchable")
        r = await w.request("t1", a100)
        assert r.status_code == 422 and "no pool of models ['nvidia-a100-sxm-80gb'] offers on_demand " \
            "(they offer ['interruptible'])" in r.json()["reasons"], r.text
        r = await w.request("t1", {**a100, "billing": "interruptible"})
        assert r.status_code == 201, r.text
        lease = r.json()["leases"][0]
        assert (lease["pool_id"], Decimal(lease["unit_price"])) == ("spot-a100", Decimal("0.70"))


async def _placeable(q) -> dict | None:
    q = await q
    return q if q["placeable_now"] else None
