"""The three services, unchanged, on a 3-node NATS cluster (R3 streams) and a Redis
Cluster of 3 masters: pools in regions whose keys live on different masters, gang and
multi-region split placements, renew and release, the meter bills what ended, and the
invariants hold (leased <= capacity; leased = units of the live leases)."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

import msgspec
import pytest
from nats.aio.client import Client as NATS

from services.common.keys import Keys
from services.common.nats_conn import connect
from services.common.settings import Settings
from services.common.subjects import Subjects

from ..helpers import eventually
from .conftest import REPLICAS
from .stack import REGIONS, expected_charges, granted_ids, slot_owner, stack

pytestmark = pytest.mark.timeout(120)

POOLS = {f"{region}-{i}": region for region in REGIONS for i in range(2)}  # 2 pools of 8 units per region


async def test_services_place_split_and_gang_leases_on_clustered_engines(cluster_settings: Settings, tmp_path) -> None:
    s_ = cluster_settings
    keys = Keys(s_.prefix)
    # the regions' keys really are spread over the masters: scripts run on three nodes
    assert len({slot_owner(s_, keys.pool(region, "x")) for region in REGIONS}) == 3

    async with stack(s_, tmp_path) as s:
        for pool_id, region in POOLS.items():
            await s.pool(pool_id, region, 8)
        await eventually(s.quotes_everywhere, timeout=30)
        # a provider agent's batch heartbeat: one pipeline of EVALSHAs fanned out to every master
        r = await s.registry.post("/v1/heartbeats", json={"pools": list(POOLS)}, headers=s.provider)
        assert r.status_code == 200, r.text
        assert len(r.json()["pools"]) == len(POOLS), r.text

        # streams and buckets are replicated on the three nodes
        nc: NATS = await connect(s_.nats_url, "test")
        try:
            js = nc.jetstream()
            info = await js.stream_info(Subjects(s_.prefix).stream("alloc"))
            assert info.config.num_replicas == REPLICAS
            assert info.cluster is not None and len(info.cluster.replicas or []) == REPLICAS - 1
            kv = await js.stream_info(f"KV_{Subjects(s_.prefix).bucket('pools')}")
            assert kv.config.num_replicas == REPLICAS
        finally:
            await nc.close()

        # gang leases: all units in one pool, one per region
        gangs = []
        for region in REGIONS:
            r = await s.request("t2", {"units": 2, "placement": {"regions": [region]}, "lease_ttl_s": 600})
            assert r.status_code == 201, r.text
            (lease,) = r.json()["leases"]
            assert lease["region"] == region and lease["units"] == 2
            gangs.append(lease)

        # a split across all three regions (three masters): 30 units, more than two regions have left
        split_body = {"queue": False, "units": 30, "shape": {"kind": "split", "max_pools": 6, "max_regions": 3},
                      "placement": {"regions": list(REGIONS)}, "lease_ttl_s": 600}
        keyed = {**s.tenants["t1"], "Idempotency-Key": "split-30"}  # the key's scripts on a cluster slot
        r = await s.broker.post("/v1/requests", json=split_body, headers=keyed)
        assert r.status_code == 201, r.text
        again = await s.broker.post("/v1/requests", json=split_body, headers=keyed)
        assert again.status_code == 201 and again.json() == r.json(), again.text
        split = r.json()["leases"]
        assert sum(x["units"] for x in split) == 30 and {x["region"] for x in split} == set(REGIONS)

        # what is left cannot be overbooked: 48 units in all, 36 leased
        r = await s.request("t2", {"units": 13, "shape": {"kind": "split", "max_pools": 6, "max_regions": 3},
                                   "placement": {"regions": list(REGIONS)}})
        assert r.status_code == 409, r.text

        states = s.pool_states(POOLS)
        assert sum(st["leased"] for st in states.values()) == 36
        for pool_id, st in states.items():
            assert st["leased"] <= st["capacity"], (pool_id, st)
            assert st["leased"] == st["live"], (pool_id, st)

        # renew one, release the split and a gang lease
        r = await s.lease_op("t2", gangs[0]["lease_id"], "renew")
        assert r.status_code == 200, r.text
        for lease in [*split, gangs[1]]:
            r = await s.lease_op("t1" if lease in split else "t2", lease["lease_id"], "release")
            assert r.status_code == 200, r.text
        states = s.pool_states(POOLS)
        assert sum(st["leased"] for st in states.values()) == 4
        assert all(st["leased"] == st["live"] <= st["capacity"] for st in states.values()), states

        # the durable record has every grant, the renewal and every release
        events = await s.alloc_events()
        kinds = Counter(type(e).__name__ for e in events)
        assert granted_ids(events) == {x["lease_id"] for x in [*split, *gangs]}
        assert kinds["LeaseRenewed"] == 1 and kinds["LeaseReleased"] == len(split) + 1

        # the meter billed each ended lease, to the minor unit
        await eventually(lambda: s.meter_settled(events), timeout=30)
        billed: dict[str, Decimal] = {}
        for entry in await s.ledger():
            billed[entry.lease_id] = billed.get(entry.lease_id, Decimal(0)) + entry.amount
        assert billed == expected_charges(events, s_.min_bill_s)
        r = await s.meter.get("/v1/usage", params={"group_by": "tenant"}, headers=s.admin)
        totals = {row["tenant"]: Decimal(row["amount"]) for row in r.json()["rows"]}
        by_tenant: dict[str, Decimal] = {}
        for lease_id, amount in billed.items():
            tenant = next(e.lease.tenant for e in events if e.lease.lease_id == lease_id)
            by_tenant[tenant] = by_tenant.get(tenant, Decimal(0)) + amount
        assert totals == by_tenant


async def test_a_split_refused_in_one_region_holds_nothing_in_the_others(cluster_settings: Settings,
                                                                        tmp_path) -> None:
    """All or nothing across regions on different masters: the cheap region is reserved
    first (a split takes the cheapest units first), then the second region refuses (its
    leases are marked as not restored, as after a Redis loss): the first region's units
    must be given back before the client hears 503, and nothing is announced."""
    s_ = msgspec.structs.replace(cluster_settings, sweep_interval_s=600.0)  # no sweep re-marks the region
    cheap, dear = REGIONS[0], REGIONS[1]
    pools = {"cheap-1": cheap, "dear-1": dear}
    body = {"units": 12, "shape": {"kind": "split", "max_pools": 2, "max_regions": 2},
            "placement": {"regions": [cheap, dear]}, "lease_ttl_s": 600}
    async with stack(s_, tmp_path) as s:
        await s.pool("cheap-1", cheap, 8, price="1.00")
        await s.pool("dear-1", dear, 8, price="5.00")

        async def quoted() -> bool:
            r = await s.broker.post("/v1/quotes", json=body, headers=s.admin)
            return r.status_code == 200 and bool(r.json()["options"])

        await eventually(quoted, timeout=30)
        with s.redis() as rc:
            assert rc.delete(Keys(s_.prefix).leases_ready(dear)) == 1

        r = await s.request("t1", body)
        assert r.status_code == 503, r.text
        states = s.pool_states(pools)
        assert all(st["leased"] == 0 and st["live"] == 0 for st in states.values()), states
        assert granted_ids(await s.alloc_events()) == set()

        with s.redis() as rc:  # the same request goes through once the region is ready again
            rc.set(Keys(s_.prefix).leases_ready(dear), "1")
        r = await s.request("t1", body)
        assert r.status_code == 201, r.text
        assert [(x["region"], x["units"]) for x in r.json()["leases"]] == [(cheap, 8), (dear, 4)]
        states = s.pool_states(pools)
        assert states["cheap-1"]["leased"] == 8 and states["dear-1"]["leased"] == 4, states


async def test_a_region_that_lost_its_live_state_alone_is_rebuilt(cluster_settings: Settings, tmp_path) -> None:
    """A Redis Cluster master comes back empty: one region's keys are gone (here deleted:
    marker, pool and lease alike), while the global "rebuilt" markers, elsewhere, are
    not. The broker's sweep must not mark that region ready as it is (it would be booked
    over a lease Redis no longer holds): the region's pools and leases are rebuilt from
    the record, and only then does it place again; a region that never had a lease is
    simply marked ready."""
    s_ = cluster_settings
    keys = Keys(s_.prefix)
    lost, other = REGIONS[0], REGIONS[2]
    async with stack(s_, tmp_path) as s:
        await s.pool("lost-1", lost, 8)
        await s.pool("other-1", other, 8)
        await eventually(lambda: _quotes(s, [lost, other]), timeout=30)
        r = await s.request("t1", {"units": 8, "placement": {"regions": [lost]}, "lease_ttl_s": 600})
        assert r.status_code == 201, r.text
        (held,) = r.json()["leases"]
        r = await s.request("t2", {"units": 2, "placement": {"regions": [other]}, "lease_ttl_s": 600})
        assert r.status_code == 201, r.text
        (kept,) = r.json()["leases"]

        with s.redis() as rc:  # the master of `lost` restarted without its data
            gone = [keys.leases_ready(lost), keys.pool(lost, "lost-1"), keys.region_pools(lost),
                    keys.heartbeats(lost), keys.lease(lost, held["lease_id"]), keys.lease_expiry(lost),
                    keys.pool_leases(lost, "lost-1"), keys.interruptible_leases(lost)]
            # at once, as a master coming back empty loses them: deleted one by one, a
            # sweep between the first (the marker) and the pool keys saw the region as lost
            # while its pools were still there, and the registry kept them as intact
            assert len({rc.keyslot(k) for k in gone}) == 1
            assert rc.delete(*gone) >= 5
            fresh = "ap-south"  # a region nobody ever placed in loses its marker too
            rc.delete(keys.leases_ready(fresh))
            before = rc.hgetall(keys.pool(other, "other-1"))

        async def rebuilt() -> bool:
            with s.redis() as rc:
                return bool(rc.exists(keys.leases_ready(lost)))

        # while it is being rebuilt the region never places over `held`; then it is back whole
        async def rebuilt_never_overbooking() -> bool:
            if await rebuilt():
                return True
            r = await s.request("t1", {"units": 1, "placement": {"regions": [lost]}})
            assert r.status_code in (409, 503), r.text
            return False

        await eventually(rebuilt_never_overbooking, timeout=60, every=0.2, what="the lost region rebuilt")
        states = s.pool_states({"lost-1": lost, "other-1": other})
        assert states["lost-1"] == {"capacity": 8, "leased": 8, "live": 8}, states  # `held` is back
        assert states["other-1"] == {"capacity": 8, "leased": 2, "live": 2}, states  # untouched
        with s.redis() as rc:
            assert rc.exists(keys.leases_ready(fresh))  # nothing to lose there
            after = rc.hgetall(keys.pool(other, "other-1"))
        # not registered again: the same generation, at the same record revision
        assert (after["leased"], after["generation"], after["rev"]) == (before["leased"], before["generation"],
                                                                       before["rev"])
        r = await s.request("t1", {"units": 1, "placement": {"regions": [lost]}})
        assert r.status_code == 409, r.text  # full: the restored lease holds all 8
        r = await s.lease_op("t1", held["lease_id"], "release")
        assert r.status_code == 200, r.text
        r = await s.request("t1", {"units": 1, "placement": {"regions": [lost]}})
        assert r.status_code == 201, r.text
        r = await s.lease_op("t2", kept["lease_id"], "release")  # lookups of the intact region work
        assert r.status_code == 200, r.text


async def _quotes(s, regions: list[str]) -> bool:  # noqa: ANN001
    for region in regions:
        r = await s.broker.post("/v1/quotes", json={"units": 1, "placement": {"regions": [region]}},
                                headers=s.admin)
        if r.status_code != 200 or not r.json()["options"]:
            return False
    return True
