"""The engine with pools that share devices (issue 14): shares placed by cost, then by
devices.py's fragmentation rule; whole asks on sharing pools get devices on one node;
reasons name the missing slice, the smallest share and the memory."""

from __future__ import annotations

from decimal import Decimal as D

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.broker.matching import Ask, Engine
from services.broker.matching.shares import PER_CLASS, RELEARN, Ladder

from .test_engine import ASCEND, TOPO, pool


def share_pool(pool_id: str, region: str = "cn-gz", price: str = "2", *, capacity: int = 16,
               sharing: str = "time_slice", min_milli: int = 100, upn: int = 8, **kw: object):
    return pool(pool_id, region, price, free=capacity, capacity=capacity, sharing=sharing,
                min_milli=min_milli, units_per_node=upn, **kw)


def engine(*pools) -> Engine:
    e = Engine(TOPO)
    for p in pools:
        e.upsert(p)
    return e


def share(milli: int, **kw: object) -> Ask:
    return Ask(units=1, milli=milli, **kw)  # type: ignore[arg-type]


def test_a_share_goes_to_the_cheapest_sharing_pool_and_costs_its_share() -> None:
    e = engine(pool("whole", "cn-gz", "1"), share_pool("dear", price="3"), share_pool("cheap", price="2"))
    d = e.match(share(250, hours=D(2)))
    assert [o.allocations[0].pool_id for o in d.options] == ["cheap", "dear"]  # never the whole-only pool
    best = d.options[0]
    a = best.allocations[0]
    assert (a.milli, a.units, a.unit_price) == (250, 1, D(2))
    assert len(a.devices) == 1 and 0 <= a.devices[0] < 16
    assert best.compute_cost == D("1.0")  # 2/unit-hour x 0.25 x 2 h
    assert best.share_hour_price == D("0.5") and best.unit_hour_price == D(2)
    assert best.tflops == pytest.approx(989.4 / 4)  # a share delivers its share of the TFLOPS
    assert best.milli == 250


def test_whole_asks_never_see_shares_and_their_options_are_unchanged() -> None:
    plain = engine(pool("a", "cn-gz", "1"), pool("b", "cn-gz", "2"))
    mixed = engine(pool("a", "cn-gz", "1"), pool("b", "cn-gz", "2"), share_pool("s", price="3"))
    ask = Ask(units=2)
    assert mixed.match(ask).options[:2] == plain.match(ask).options[:2]


def test_a_share_prefers_the_partly_used_device_over_a_fresh_one() -> None:
    e = engine(share_pool("s", capacity=8))
    e.set_devices("s", {3: 600})  # 400 taken on device 3
    d = e.match(share(500))
    assert d.options[0].allocations[0].devices == (3,)  # best fit: fills device 3, keeps 7 whole


def test_among_equal_cost_pools_the_one_already_fragmented_is_filled() -> None:
    e = engine(share_pool("fresh", capacity=8), share_pool("used", capacity=8))
    e.set_devices("used", {5: 300})
    d = e.match(share(300))
    assert (d.options[0].allocations[0].pool_id, d.options[0].allocations[0].devices) == ("used", (5,))
    assert d.options[1].allocations[0].pool_id == "fresh"


def test_cost_beats_fragmentation() -> None:
    e = engine(share_pool("dear", price="3", capacity=8), share_pool("cheap", price="2", capacity=8))
    e.set_devices("dear", {0: 250})  # a perfect fit, but dearer
    assert e.match(share(250)).options[0].allocations[0].pool_id == "cheap"


def test_the_equal_cost_scoring_uses_the_learned_mix() -> None:
    """With a mix of 500-milli asks learned, a 250 share goes where it leaves a 500
    slice usable: onto the device with 750 free (leaving 500), not the one with 600
    (leaving 350, a fragment for that mix), though best fit alone would pick 600."""
    e = engine(share_pool("s", capacity=2, upn=2))
    for _ in range(RELEARN):
        e._shares.record(share(500), 1)
    e.set_devices("s", {0: 600, 1: 750})
    assert e.match(share(250)).options[0].allocations[0].devices == (1,)
    blind = engine(share_pool("s", capacity=2, upn=2))
    blind.set_devices("s", {0: 600, 1: 750})
    assert blind.match(share(250)).options[0].allocations[0].devices == (0,)  # no mix: best fit


def test_no_device_with_enough_free_says_the_largest_slice() -> None:
    e = engine(share_pool("s", capacity=2, upn=2))
    e.set_devices("s", {0: 250, 1: 100})
    d = e.match(share(400))
    assert not d.placed and not d.never
    assert d.reasons == ("no device in ['cn-gz'] has 400 milli free; largest free slice is 250",)


def test_min_milli_and_sharing_mode_are_reasons() -> None:
    assert engine(pool("w", "cn-gz", "1")).match(share(250)).reasons == (
        "no pool in ['cn-gz'] shares devices (the 1 matching pool leases whole devices only)",)
    d = engine(share_pool("s", min_milli=200)).match(share(100))
    assert d.never and d.reasons == (
        "no sharing pool in ['cn-gz'] places a share of 100 milli (smallest share allowed: 200 milli)",)
    assert engine(share_pool("s", min_milli=200)).match(share(200)).placed


def test_a_pool_that_sells_slices_only_takes_no_larger_share_and_no_whole_device() -> None:
    """sharing.max_milli (an AWS g6f sells 1/8 of an L4, and only that): a larger share or
    a whole device goes elsewhere, or is refused with the reason."""
    eighth = share_pool("eighth", price="1", sharing="memory", min_milli=125, max_milli=125, capacity=1)
    assert engine(eighth).match(share(125)).options[0].allocations[0].pool_id == "eighth"
    d = engine(eighth).match(share(250))
    assert d.never and d.reasons == (
        "no sharing pool in ['cn-gz'] places a share of 250 milli (largest share allowed: 125 milli)",)
    # a whole device: the dearer whole pool, never the cheaper slices-only one
    e = engine(eighth, pool("whole", "cn-gz", "3", free=1, capacity=1))
    d = e.match(Ask(units=1))
    assert [a.pool_id for o in d.options for a in o.allocations] == ["whole"]
    e.set_free("whole", 0)
    d = e.match(Ask(units=1))  # the whole pool is full: not now (a queued ask waits for it)
    assert not d.placed and not d.never and d.reasons == ("no single pool has 1 free units (largest free: 0)",)
    d = engine(eighth).match(Ask(units=1))  # slices only: never (a queued ask would wait forever)
    assert d.never and d.reasons == (
        "no pool sells whole devices: they sell slices only (a share of at most 125 milli: ask for a share)",)
    # a larger share goes to a pool that allows it, however dear
    e = engine(eighth, share_pool("any", price="9"))
    assert e.match(share(500)).options[0].allocations[0].pool_id == "any"


def test_memory_rule_per_mode() -> None:
    # an Ascend 910B has 64 GB: a 250 share of a "memory" pool gets 16 GB, of a time-slice pool all 64
    mem = engine(share_pool("m", model=ASCEND, sharing="memory"))
    assert mem.match(share(250, share_memory_gib=16.0)).placed
    d = mem.match(share(250, share_memory_gib=20.0))
    assert d.never and d.reasons == (
        "no sharing pool in ['cn-gz'] gives a 250-milli share 20 GB of memory (most: 16 GB)",)
    assert mem.match(share(500, share_memory_gib=20.0)).placed
    assert engine(share_pool("t", model=ASCEND)).match(share(250, share_memory_gib=64.0)).placed


def test_price_cap_applies_to_what_the_share_costs() -> None:
    e = engine(share_pool("s", price="4"))
    assert e.match(share(250, max_price=D(1))).placed  # 4 x 0.25 = 1/hour
    d = e.match(share(500, max_price=D(1)))
    assert d.never and d.reasons == ("cheapest 500-milli share costs 2/hour, above your max 1",)


def test_static_reasons_come_first() -> None:
    d = engine(share_pool("s")).match(share(250, regions=frozenset({"cn-bj"})))
    assert d.never and "allowed regions" in d.reasons[0]


def test_whole_asks_on_a_sharing_pool_take_one_node_of_whole_devices() -> None:
    e = engine(share_pool("s", capacity=16, upn=8))
    e.set_devices("s", {0: 500, 9: 500})  # one device taken on each node: 14 whole, 7 per node
    e.set_free("s", 14)
    d = e.match(Ask(units=4))
    devices = d.options[0].allocations[0].devices
    assert len(devices) == 4 and len({i // 8 for i in devices}) == 1
    assert all(e.devices("s")[i] == 1000 for i in devices)
    d = e.match(Ask(units=8))  # 14 whole devices free, but no node has 8
    assert not d.placed and not d.never
    assert d.reasons == ("1 sharing pool has 8 whole devices free, but not on one node (most on one node: 7)",)


def test_whole_ask_moves_on_when_the_sharing_pool_is_spread_thin() -> None:
    e = engine(share_pool("s", price="1", capacity=16, upn=8), pool("w", "cn-gz", "2", free=8))
    e.set_devices("s", {0: 500, 9: 500})
    e.set_free("s", 14)
    d = e.match(Ask(units=8))
    assert [o.allocations[0].pool_id for o in d.options] == ["w"]
    assert d.options[0].allocations[0].devices == ()  # a pool that does not share names no devices


def test_whole_ask_above_a_node_takes_whole_nodes_first() -> None:
    e = engine(share_pool("s", capacity=24, upn=8))
    e.set_devices("s", {0: 500})
    e.set_free("s", 23)
    devices = e.match(Ask(units=10)).options[0].allocations[0].devices
    assert len(devices) == 10 and 0 not in devices and set(range(8, 16)) <= set(devices)


def test_set_devices_follows_absolute_values_and_ignores_strangers() -> None:
    e = engine(share_pool("s", capacity=4, upn=4))
    e.set_devices("s", {1: 200, 99: 0, 2: 1500})
    e.set_devices("nope", {0: 0})
    assert e.devices("s") == {0: 1000, 1: 200, 2: 1000, 3: 1000}
    e.set_devices("s", {1: 200})  # idempotent: the same event twice
    assert e.devices("s")[1] == 200
    assert e.devices("nope") is None


def test_reregistration_keeps_devices_unless_their_count_changes() -> None:
    e = engine(share_pool("s", capacity=4, upn=4))
    e.set_devices("s", {1: 200})
    e.upsert(share_pool("s", price="5", capacity=4, upn=4))
    assert e.devices("s")[1] == 200
    e.upsert(share_pool("s", capacity=8, upn=4))
    assert e.devices("s") == dict.fromkeys(range(8), 1000)
    e.upsert(share_pool("s", capacity=8, sharing="none"))
    assert e.devices("s") is None and not e.match(share(250)).placed


def test_excluded_and_unreliable_pools_are_skipped() -> None:
    e = engine(share_pool("a", price="1"), share_pool("b", price="2"))
    assert e.match(share(250, exclude_pools=frozenset({"a"}))).options[0].allocations[0].pool_id == "b"
    d = e.match(share(250, exclude_pools=frozenset({"a", "b"})))
    assert not d.placed and not d.never and "excluded" in d.reasons[0]


def test_one_option_per_pool_and_at_most_limit() -> None:
    e = engine(*(share_pool(f"p{i}", capacity=8) for i in range(PER_CLASS + 3)))
    d = e.match(share(250), limit=5)
    pools = [o.allocations[0].pool_id for o in d.options]
    assert len(pools) == 5 and len(set(pools)) == 5


def test_reserved_share_costs_its_share_of_the_term() -> None:
    p = msgspec.structs.replace(share_pool("s"), reserved_month=D(1000))
    d = engine(p).match(share(100, billing="reserved_month"))
    assert d.options[0].compute_cost == D("100.0")
    assert d.options[0].share_hour_price == (D(1000) / 730 / 10).quantize(D("0.000001"))


def test_an_ask_for_a_share_of_several_units_is_refused() -> None:
    with pytest.raises(ValueError):
        engine(share_pool("s")).match(Ask(units=2, milli=500))


def test_the_mix_is_retaken_only_when_it_drifts() -> None:
    e = engine(share_pool("s", capacity=8))
    shares = e._shares
    for _ in range(50):
        e.match(share(500))
    learned = shares.mix
    assert [(t.ask.milli, t.weight) for t in learned] == [(500, 1.0)]
    shares.caches.frag[("marker",)] = 0.0
    for _ in range(RELEARN):
        e.match(share(500))
    assert shares.mix is learned and ("marker",) in shares.caches.frag  # same mix: scores kept
    for _ in range(RELEARN // 2):
        e.match(share(250))
    for _ in range(RELEARN // 2):
        e.match(share(500))
    assert {t.ask.milli for t in shares.mix} == {250, 500} and ("marker",) not in shares.caches.frag


def test_billing_not_offered_by_sharing_pools_is_the_reason() -> None:
    d = engine(share_pool("s")).match(share(250, billing="reserved_month"))
    assert d.never and d.reasons == ("no sharing pool in ['cn-gz'] offers reserved_month",)


def test_objective_time_with_data_prefers_the_near_pool() -> None:
    near = share_pool("near", region="cn-gz", price="3")
    far = share_pool("far", region="us-east", price="1")
    d = engine(near, far).match(share(250, data_region="cn-gz", data_gb=500.0, objective="time"))
    assert d.placed and d.options[0].allocations[0].pool_id == "near"
    assert d.options[0].transfer_s <= d.options[-1].transfer_s


def test_a_batch_places_shares_on_partly_used_devices_and_restores_what_it_tried() -> None:
    from services.broker.matching import place_batch

    e = engine(share_pool("s", capacity=2, upn=2))
    e.set_devices("s", {0: 500, 1: 500})
    e.set_free("s", 0)  # no whole device left: only shares fit
    result = place_batch(e, [share(500), share(500), share(250)], time_budget_s=0.2)
    placed = [p for p in result.placements if p is not None]
    assert len(placed) == 2 and sorted(p.allocations[0].devices for p in placed) == [(0,), (1,)]
    assert e.devices("s") == {0: 0, 1: 0}  # the engine holds the plan's shares, nothing more


@settings(max_examples=200, deadline=None)
@given(tops=st.lists(st.integers(0, 1000), min_size=1, max_size=40),
       changes=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 1000)), max_size=20),
       j=st.integers(0, 45), milli=st.integers(1, 1000))
def test_a_ladder_finds_the_next_pool_with_a_slice_as_a_scan_would(tops, changes, j, milli) -> None:
    ladder = Ladder([(D(i % 7), f"p{i:02d}", t) for i, t in enumerate(tops)])
    now = {pid: tops[int(pid[1:])] for pid in ladder.pids}
    for i, top in changes:
        if i < len(tops):
            ladder.update(f"p{i:02d}", top)
            now[f"p{i:02d}"] = top
    want = next((k for k in range(j, len(ladder.pids)) if now[ladder.pids[k]] >= milli), -1)
    assert ladder.first(j, milli) == want
    assert ladder.prices == sorted(ladder.prices)


def test_full_cheap_pools_are_skipped_and_price_order_kept() -> None:
    pools = [share_pool(f"p{i}", price=str(1 + i), capacity=8) for i in range(6)]
    e = engine(*pools)
    for i in range(4):  # the four cheapest are full
        e.set_devices(f"p{i}", dict.fromkeys(range(8), 0))
    e.set_devices("p4", {0: 200})
    assert [o.allocations[0].pool_id for o in e.match(share(300)).options] == ["p4", "p5"]
    assert e.match(share(200)).options[0].allocations[0].devices == (0,)  # p4's 200 slice fits exactly
    e.upsert(share_pool("p0", price="9", capacity=8))  # re-registered dearer: its devices stay as they were
    assert [o.allocations[0].pool_id for o in e.match(share(300), limit=3).options] == ["p4", "p5"]
    e.set_devices("p0", dict.fromkeys(range(8), 1000))  # its leases ended
    assert [o.allocations[0].pool_id for o in e.match(share(300), limit=3).options] == ["p4", "p5", "p0"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([(100, 1000), (125, 125), (250, 500), (500, 1000), (0, 0)]),
                          st.integers(1, 3), st.sampled_from(["1", "2", "3"])), min_size=1, max_size=6),
       st.sampled_from([100, 125, 250, 400, 500, 750, 1000]), st.integers(1, 2))
def test_every_option_respects_its_pool_s_smallest_and_largest_share(specs, milli, units) -> None:
    """Any pools, any ask: a share lands only where min_milli <= milli <= max_milli, whole
    units only on pools that sell whole devices; with every device free, a whole ask is
    placed exactly when such a pool is big enough, and 'never' otherwise ((0, 0): a pool
    that does not share)."""
    pools = [pool(f"w{i}", "cn-gz", price, free=cap, capacity=cap) if bounds == (0, 0) else
             share_pool(f"s{i}", price=price, capacity=cap, min_milli=bounds[0], max_milli=bounds[1])
             for i, (bounds, cap, price) in enumerate(specs)]
    by_id = {p.pool_id: p for p in pools}
    ask = Ask(units=units) if milli == 1000 else share(milli)
    d = engine(*pools).match(ask)
    for option in d.options:
        for a in option.allocations:
            p = by_id[a.pool_id]
            if milli < 1000:
                assert p.sharing != "none" and p.min_milli <= milli <= p.max_milli, (a, p)
            else:
                assert p.max_milli >= 1000, (a, p)
    if milli == 1000:  # every device free: placed exactly when a pool selling whole devices is big enough
        fits = any(p.max_milli >= 1000 and p.capacity >= units for p in pools)
    else:  # ... or a sharing pool takes that size of share
        fits = any(p.sharing != "none" and p.min_milli <= milli <= p.max_milli for p in pools)
    assert d.placed == fits and d.never == (not fits), d
