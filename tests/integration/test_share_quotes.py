"""Quotes for shares through the broker's HTTP API, with a real registry, NATS and Redis
(issue 14): a share is quoted on sharing pools only, at its share of the price and of the
TFLOPS; bad shares are 422s with the reason; a share that never fits says why."""

from __future__ import annotations

from decimal import Decimal

from .broker_world import broker_world

POOLS = {
    "gz-shared": {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 16, "prices": {"on_demand": "2.00"},
                  "sharing": {"mode": "memory", "min_milli": 100}},
    "gz-whole": {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 16, "prices": {"on_demand": "1.00"}},
}


async def test_a_share_is_quoted_at_its_share_of_price_and_tflops(settings, nc) -> None:
    async with broker_world(settings, POOLS) as w:
        r = await w.broker.post("/v1/quotes", json={"share": {"milli": 250}, "duration_s": 7200},
                                headers=w.tenants["t1"])
        assert r.status_code == 200, r.text
        q = r.json()
        best = q["options"][0]
        a = best["allocations"][0]
        assert (a["pool_id"], a["milli"], a["units"]) == ("gz-shared", 250, 1)  # never the cheaper whole-only pool
        assert len(a["devices"]) == 1 and 0 <= a["devices"][0] < 16
        assert Decimal(best["compute_cost"]) == Decimal("1.0")  # 2.00 x 0.25 x 2 h
        assert Decimal(best["share_hour_price"]) == Decimal("0.5") and best["milli"] == 250
        assert best["tflops"] == 313.0 / 4  # the catalogue's bf16 figure for a 910B, a quarter of it
        assert await w.free("gz-shared") == 16  # a quote reserves nothing

        r = await w.broker.post("/v1/quotes", json={"units": 4}, headers=w.tenants["t1"])
        whole = r.json()["options"]
        assert whole[0]["allocations"][0]["pool_id"] == "gz-whole" and whole[0]["allocations"][0]["devices"] == []
        shared = [o for o in whole if o["allocations"][0]["pool_id"] == "gz-shared"]
        assert shared and len({d // 8 for d in shared[0]["allocations"][0]["devices"]}) == 1  # one node


async def test_bad_and_impossible_shares(settings, nc) -> None:
    async with broker_world(settings, POOLS) as w:
        for body, words in (({"units": 2, "share": {"milli": 250}}, "'units' must be 1"),
                            ({"performance": {"min_tflops": 10}, "share": {"milli": 250}}, "without 'performance'"),
                            ({"units": 1, "shape": {"kind": "split"}, "share": {"milli": 250}}, "must be 'gang'")):
            r = await w.broker.post("/v1/quotes", json=body, headers=w.tenants["t1"])
            assert r.status_code == 422 and words in r.json()["detail"], (body, r.text)
        for body, words in (({"share": {"milli": 50}}, "smallest share allowed: 100 milli"),
                            ({"share": {"milli": 250, "min_memory_gib": 32}},
                             "gives a 250-milli share 32 GB of memory (most: 16 GB)")):
            r = await w.broker.post("/v1/quotes", json=body, headers=w.tenants["t1"])
            assert r.status_code == 200, r.text
            q = r.json()
            assert q["never"] and not q["options"] and words in q["reasons"][0], q
            r = await w.request("t1", body)  # never placeable: refused with the reason, nothing queued
            assert r.status_code == 422 and any(words in x for x in r.json()["reasons"]), r.text
        r = await w.broker.post("/v1/quotes", json={"share": {"milli": 0}}, headers=w.tenants["t1"])
        assert r.status_code == 400, r.text
        assert await w.free("gz-shared") == 16
