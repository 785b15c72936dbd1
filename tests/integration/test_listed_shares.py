"""AWS's fractional L4 instances (G6f: 1/8, 1/4, 1/2 of one L4; issue 15) imported from
real SkyPilot catalogue rows and registered through the registry's HTTP API as sharing
pools, then quoted and placed through the broker on real NATS and Redis: a share of exactly
the sold fraction goes to that instance's pool, never to a pool whose smallest share is
larger or to a whole-GPU pool, and costs what the instance costs per hour."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import msgspec

from services.registry.domain.importers import parse_skypilot

from ..helpers import eventually
from .broker_world import broker_world


async def eventually_refused(w, body: dict) -> None:  # noqa: ANN001
    """Once the broker has seen the whole-L4 pool go: 422, never placeable, with the reason."""
    async def refused() -> bool:
        r = await w.request("t1", body)
        assert r.status_code in (201, 409, 422), r.text
        if r.status_code == 201:
            raise AssertionError(f"placed on {r.json()['leases'][0]['pool_id']}")
        return r.status_code == 422 and r.json()["reasons"] == [
            "no pool of models ['nvidia-l4'] sells whole devices: they sell slices only "
            "(a share of at most 250 milli: ask for a share)"]
    await eventually(refused, what="a whole L4 refused as never placeable")

FIXTURE = Path(__file__).parents[1] / "fixtures" / "catalogues" / "aws-v9" / "vms.csv"
WANTED = {"g6f.large", "g6f.2xlarge", "gr6.4xlarge"}  # 1/8 and 1/4 of an L4, and a whole L4


async def test_a_share_of_the_sold_fraction_is_placed_on_the_imported_instance(settings, nc) -> None:
    # the import's --region-map puts AWS's us-east-1 on the test topology's us-east
    result = parse_skypilot(FIXTURE.read_text("utf-8"), "acme", {"us-east"}, cloud="aws",
                            region_map={"us-east-1": "us-east"})
    by_offer = {o.offer: o for o in result.outcomes if o.status == "ready" and o.offer in WANTED}
    assert set(by_offer) == WANTED, result.errors
    specs = dict(result.pools)
    pools = {o.pool_id: msgspec.to_builtins(specs[o.pool_id]) for o in by_offer.values()}
    async with broker_world(settings, pools) as w:
        eighth = by_offer["g6f.large"].pool_id
        r = await w.registry.get(f"/v1/pools/{eighth}", headers=w.admin)
        assert r.json()["spec"]["sharing"] == {"mode": "memory", "min_milli": 125, "max_milli": 125}, r.text

        ask = {"share": {"milli": 125}, "accelerators": {"models": ["nvidia-l4"]}, "duration_s": 3600}
        r = await w.broker.post("/v1/quotes", json=ask, headers=w.tenants["t1"])
        assert r.status_code == 200, r.text
        best = r.json()["options"][0]
        # not the quarter-L4 pool (its smallest share is 250), not the whole-L4 pool
        assert [(a["pool_id"], a["milli"], a["units"]) for a in best["allocations"]] == [(eighth, 125, 1)], best
        assert Decimal(best["share_hour_price"]) == Decimal("0.202")  # g6f.large's price per instance-hour
        assert Decimal(best["compute_cost"]) == Decimal("0.202")
        assert best["tflops"] == 121.0 / 8  # an eighth of the L4's dense bf16

        r = await w.request("t1", ask)
        assert r.status_code == 201, r.text
        placed = r.json()
        assert placed["state"] == "placed" and placed["leases"][0]["pool_id"] == eighth
        share = placed["placement"]
        assert (share["milli"], Decimal(share["share_hour_price"])) == (125, Decimal("0.202"))
        assert [(a["pool_id"], a["milli"], a["devices"]) for a in share["allocations"]] == [(eighth, 125, [0])]

        # each slice pool sells its size only: a quarter goes to the quarter pool (g6f.2xlarge),
        # a half to none of them, a whole L4 to the whole-L4 pool, and once that is taken to none
        quarter = by_offer["g6f.2xlarge"].pool_id
        r = await w.request("t1", {**ask, "share": {"milli": 250}})
        assert r.status_code == 201 and r.json()["leases"][0]["pool_id"] == quarter, r.text
        r = await w.request("t1", {**ask, "share": {"milli": 500}, "queue": False})
        assert r.status_code == 422 and "largest share allowed: 250 milli" in str(r.json()["reasons"]), r.text


async def test_a_slice_pool_sells_its_size_only_never_a_whole_device(settings, nc) -> None:
    """sharing.max_milli = the sold fraction: a whole L4 goes to the whole-L4 pool, and
    once that is taken, not to the wholly free slice pools (409: the whole pool is full);
    with only slice pools left registered, a whole ask can never be placed (422)."""
    result = parse_skypilot(FIXTURE.read_text("utf-8"), "acme", {"us-east"}, cloud="aws",
                            region_map={"us-east-1": "us-east"})
    by_offer = {o.offer: o for o in result.outcomes if o.status == "ready" and o.offer in WANTED}
    specs = dict(result.pools)
    pools = {o.pool_id: msgspec.to_builtins(specs[o.pool_id]) for o in by_offer.values()}
    async with broker_world(settings, pools) as w:
        whole = {"units": 1, "accelerators": {"models": ["nvidia-l4"]}, "duration_s": 3600, "queue": False}
        r = await w.request("t1", whole)
        assert r.status_code == 201 and r.json()["leases"][0]["pool_id"] == by_offer["gr6.4xlarge"].pool_id, r.text
        r = await w.request("t1", whole)
        assert r.status_code == 409, r.text
        assert r.json()["reasons"] == ["no single pool has 1 free units (largest free: 0)"], r.text
        for offer in ("g6f.large", "g6f.2xlarge"):  # untouched: their one device still wholly free
            assert await w.free(by_offer[offer].pool_id) == 1
        r = await w.registry.delete(f"/v1/pools/{by_offer['gr6.4xlarge'].pool_id}", headers=w.provider)
        assert r.status_code in (200, 204), r.text
        await eventually_refused(w, whole)
