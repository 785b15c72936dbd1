"""The matching engine over small hand-built worlds: constraints, costs, shapes, reasons."""

from __future__ import annotations

from decimal import Decimal as D

import msgspec
import pytest

from services.broker.matching import Ask, Decision, Engine, PoolState
from services.common.messages import Link
from services.registry.domain.topology import build_topology, default_topology

TOPO = default_topology()
COUNTRY = {r.id: r.country for r in TOPO.regions}

# model -> catalogue-like attributes (the real catalogue's figures)
CATALOGUE = {
    "nvidia-h100-sxm-80gb": dict(vendor="nvidia", stack="cuda", memory_gib=80.0,
                                 bf16_tflops=989.4, fp16_tflops=989.4, fp8_tflops=1978.9,
                                 interconnect="nvlink4",
                                 frameworks=("jax", "paddlepaddle", "pytorch", "tensorflow")),
    "nvidia-a100-sxm-40gb": dict(vendor="nvidia", stack="cuda", memory_gib=40.0,
                                 bf16_tflops=312.0, fp16_tflops=312.0, fp8_tflops=None,
                                 interconnect="nvlink3",
                                 frameworks=("jax", "paddlepaddle", "pytorch", "tensorflow")),
    "amd-mi300x": dict(vendor="amd", stack="rocm", memory_gib=192.0, bf16_tflops=1307.4,
                       fp16_tflops=1307.4, fp8_tflops=2614.9, interconnect="xgmi",
                       frameworks=("jax", "pytorch", "tensorflow")),
    "huawei-ascend-910b": dict(vendor="huawei", stack="cann", memory_gib=64.0,
                               bf16_tflops=313.0, fp16_tflops=313.0, fp8_tflops=None,
                               interconnect="hccs",
                               frameworks=("mindspore", "paddlepaddle", "pytorch", "tensorflow")),
}
H100, A100, MI300X, ASCEND = CATALOGUE


def pool(pool_id: str, region: str, price: str, *, free: int = 8, capacity: int | None = None,
         model: str = H100, **kw: object) -> PoolState:
    provider = str(kw.pop("provider", "acme"))
    attrs = dict(CATALOGUE[model])
    attrs.update(kw)
    return PoolState(pool_id=pool_id, provider=provider, region=region,
                     country=COUNTRY[region], model=model, capacity=capacity or max(free, 1),
                     free=free, on_demand=D(price), **attrs)  # type: ignore[arg-type]


def engine(*pools: PoolState, topology=TOPO) -> Engine:
    e = Engine(topology)
    for p in pools:
        e.upsert(p)
    return e


def ids(d: Decision) -> list[list[str]]:
    return [[a.pool_id for a in o.allocations] for o in d.options]


def first(d: Decision) -> str:
    assert d.placed, d.reasons
    return d.options[0].allocations[0].pool_id


def reason(d: Decision) -> str:
    assert not d.placed
    assert d.reasons
    return " | ".join(d.reasons)


# --- basics -------------------------------------------------------------------------------
def test_empty_engine_says_so() -> None:
    d = engine().match(Ask(units=1))
    assert not d.placed and d.never
    assert reason(d) == "no pools are online"


def test_cheapest_gang_pool_and_costs() -> None:
    e = engine(pool("a", "us-east", "2.50"), pool("b", "us-west", "2.40"), pool("c", "us-east", "3"))
    d = e.match(Ask(units=8, hours=D(10)))
    assert ids(d) == [["b"], ["a"], ["c"]]
    best = d.options[0]
    assert best.units == 8 and len(best.allocations) == 1
    assert best.compute_cost == D("192.0")  # 2.40 x 8 units x 10 h
    assert best.transfer_cost == 0 and best.total_cost == D("192.0")
    assert best.unit_hour_price == D("2.4")
    assert best.tflops == pytest.approx(8 * 989.4)
    assert best.currency == "USD" and best.expected_start_s == 0 and best.transfer_s == 0
    assert isinstance(best.total_cost, D)


def test_limit_gives_distinct_options_best_first() -> None:
    e = engine(*(pool(f"p{i}", "us-east", str(2 + i)) for i in range(5)))
    assert ids(e.match(Ask(units=8), limit=2)) == [["p0"], ["p1"]]
    assert ids(e.match(Ask(units=8), limit=10)) == [[f"p{i}"] for i in range(5)]
    assert ids(e.match(Ask(units=8), limit=0)) == [["p0"]]  # at least one


def test_deterministic_ties_by_pool_id() -> None:
    pools = [pool(pid, "us-east", "2", free=8) for pid in ("zz", "mm", "aa")]
    for order in (pools, pools[::-1]):
        assert ids(engine(*order).match(Ask(units=8))) == [["aa"], ["mm"], ["zz"]]


def test_bad_ask_is_rejected() -> None:
    e = engine(pool("a", "us-east", "2"))
    with pytest.raises(ValueError):
        e.match(Ask())
    with pytest.raises(ValueError):
        e.match(Ask(units=0))


# --- hard constraints and their reasons ----------------------------------------------------
def test_models_constraint_and_reason() -> None:
    e = engine(pool("h", "us-east", "3"), pool("a", "us-east", "1", model=A100))
    assert first(e.match(Ask(units=8))) == "a"
    assert first(e.match(Ask(units=8, models=frozenset({H100})))) == "h"
    d = e.match(Ask(units=8, models=frozenset({"amd-mi300x", "nvidia-b200"})))
    assert reason(d) == "no pool of models ['amd-mi300x', 'nvidia-b200'] is registered"
    assert d.never


@pytest.mark.parametrize(("constraint", "winner", "message"), [
    (dict(vendors=frozenset({"amd"})), "m", "no pool in allowed regions ['us-east'] is from vendors ['intel']"),
    (dict(stacks=frozenset({"rocm"})), "m", "runs stacks ['musa']"),
    (dict(frameworks=frozenset({"mindspore", "pytorch"})), "s", "supports all of frameworks ['mindspore', 'tensorflow', 'xla']"),
    (dict(interconnects=frozenset({"nvlink4"})), "h", "has interconnects ['ib']"),
    (dict(host_archs=frozenset({"aarch64"})), "s", "has host arch ['riscv']"),
])
def test_attribute_constraints(constraint: dict, winner: str, message: str) -> None:
    e = engine(pool("a", "us-east", "1", model=A100), pool("h", "us-east", "2"),
               pool("m", "us-east", "3", model=MI300X),
               pool("s", "us-east", "4", model=ASCEND, host_arch="aarch64"))
    assert first(e.match(Ask(units=8, **constraint))) == winner
    # the same kind of constraint with values nobody has: a reason naming them
    (field, _), = constraint.items()
    impossible = {"vendors": {"intel"}, "stacks": {"musa"},
                  "frameworks": {"mindspore", "tensorflow", "xla"}, "interconnects": {"ib"},
                  "host_archs": {"riscv"}}[field]
    d = e.match(Ask(units=8, regions=frozenset({"us-east"}), **{field: frozenset(impossible)}))
    assert message in reason(d)
    assert d.never


def test_memory_constraint_and_reason_in_user_terms() -> None:
    e = engine(pool("gz", "cn-gz", "1", model=ASCEND, currency="USD"), pool("us", "us-east", "3"))
    assert first(e.match(Ask(units=8, min_memory_gib=80))) == "us"
    d = e.match(Ask(units=8, min_memory_gib=80, regions=frozenset({"cn-gz"})))
    assert reason(d) == "no pool in allowed regions ['cn-gz'] has ≥ 80 GB per unit (largest: 64 GB)"
    assert d.never


def test_residency_regions_and_countries() -> None:
    e = engine(pool("us", "us-east", "1"), pool("ie", "eu-west", "2"), pool("gz", "cn-gz", "3"))
    assert first(e.match(Ask(units=8))) == "us"
    assert first(e.match(Ask(units=8, regions=frozenset({"eu-west", "cn-gz"})))) == "ie"
    assert first(e.match(Ask(units=8, countries=frozenset({"CN"})))) == "gz"
    d = e.match(Ask(units=8, countries=frozenset({"JP"})))
    assert reason(d) == "no pool is in countries ['JP'] (they are in ['CN', 'IE', 'US'])"
    d = e.match(Ask(units=8, regions=frozenset({"ap-south"})))
    assert reason(d).startswith("no pool is in allowed regions ['ap-south']")


def test_latency_constraint_and_reason() -> None:
    e = engine(pool("east", "us-east", "3"), pool("west", "us-west", "2"), pool("ie", "eu-west", "1"))
    # RTT us-east -> us-west is ~53 ms, -> eu-west ~82 ms
    assert first(e.match(Ask(units=8, users_region="us-east", max_latency_ms=100))) == "ie"
    assert first(e.match(Ask(units=8, users_region="us-east", max_latency_ms=60))) == "west"
    assert first(e.match(Ask(units=8, users_region="us-east", max_latency_ms=30))) == "east"
    e.remove("east")
    d = e.match(Ask(units=8, users_region="us-east", max_latency_ms=30))
    assert reason(d) == "no pool within 30 ms of users in us-east (nearest: us-west at 53.5 ms)"
    assert d.never
    # max_latency_ms without users_region (or the reverse) constrains nothing
    assert first(e.match(Ask(units=8, users_region="us-east"))) == "ie"


def test_currency_is_a_hard_constraint() -> None:
    e = engine(pool("cny1", "cn-gz", "10", currency="CNY"), pool("cny2", "cn-gz", "11", currency="CNY"),
               pool("cny3", "cn-yrd", "12", currency="CNY"), pool("usd", "us-east", "3"))
    assert first(e.match(Ask(units=8))) == "usd"
    d = e.match(Ask(units=8, currency="CNY"))
    assert first(d) == "cny1" and d.options[0].currency == "CNY"
    d = e.match(Ask(units=8, regions=frozenset({"cn-gz", "cn-yrd"})))
    assert reason(d) == "3 pools are priced in CNY, not USD"
    assert d.never
    # when something else fails, the currency exclusion is still mentioned
    e.set_free("usd", 0)
    d = e.match(Ask(units=8))
    assert "3 pools are priced in CNY, not USD (not considered)" in d.reasons


def test_exclude_pools() -> None:
    e = engine(pool("a", "us-east", "1"), pool("b", "us-east", "2"))
    assert ids(e.match(Ask(units=8, exclude_pools=frozenset({"a"})))) == [["b"]]
    d = e.match(Ask(units=8, exclude_pools=frozenset({"a", "b"})))
    assert reason(d) == "all 2 matching pools are excluded (just taken by another broker)"
    assert not d.never  # they exist; they are only taken


# --- billing and prices ------------------------------------------------------------------
def test_billing_availability_and_reason() -> None:
    e = engine(pool("od", "us-east", "1"), pool("rm", "us-east", "2", reserved_month=D("1168")))
    assert first(e.match(Ask(units=8, billing="reserved_month"))) == "rm"
    d = e.match(Ask(units=8, billing="reserved_year"))
    assert reason(d) == "no pool offers reserved_year (they offer ['on_demand', 'reserved_month'])"
    assert d.never
    d = e.match(Ask(units=8, billing="interruptible", models=frozenset({H100})))
    assert reason(d).startswith(f"no pool of models ['{H100}'] offers interruptible")


def test_reserved_pricing_math() -> None:
    e = engine(pool("r", "us-east", "2.5", free=16, reserved_month=D("1460"), reserved_year=D("1095")))
    month = e.match(Ask(units=2, billing="reserved_month", hours=D(5))).options[0]
    assert month.compute_cost == D("2920")  # 1460 x 2 units x 1 month (hours ignored)
    assert month.unit_hour_price == D("2")  # 1460 / 730
    assert month.allocations[0].unit_price == D("1460")
    assert month.allocations[0].price_basis == "unit_month"
    year = e.match(Ask(units=2, billing="reserved_year")).options[0]
    assert year.compute_cost == D("26280")  # 1095 x 2 x 12 months
    assert year.unit_hour_price == D("1.5")
    od = e.match(Ask(units=2, hours=D("7.5"))).options[0]
    assert od.compute_cost == D("37.50") and od.allocations[0].price_basis == "unit_hour"
    # max_price is per unit-hour: reserved compares the term fee / 730 h
    assert e.match(Ask(units=2, billing="reserved_month", max_price=D(2))).placed
    d = e.match(Ask(units=2, billing="reserved_month", max_price=D("1.99")))
    assert reason(d) == "cheapest match costs 2/unit-hour, above your max 1.99"


def test_interruptible_is_per_hour() -> None:
    e = engine(pool("i", "us-east", "3", interruptible=D("0.9")), pool("x", "us-east", "1"))
    d = e.match(Ask(units=4, billing="interruptible", hours=D(10)))
    assert ids(d) == [["i"]]
    assert d.options[0].compute_cost == D("36.0")


def test_max_price_reason_with_numbers() -> None:
    e = engine(pool("a", "us-east", "12.40"), pool("b", "us-east", "15"))
    d = e.match(Ask(units=8, max_price=D(10)))
    assert reason(d) == "cheapest match costs 12.4/unit-hour, above your max 10"
    assert d.never
    assert ids(e.match(Ask(units=8, max_price=D("12.4")))) == [["a"]]


# --- capacity, shapes and `never` ----------------------------------------------------------
def test_gang_needs_one_pool_and_suggests_split() -> None:
    e = engine(pool("a", "us-east", "2", free=32, capacity=64),
               pool("b", "us-east", "2", free=32, capacity=32))
    d = e.match(Ask(units=64))
    assert reason(d) == "no single pool has 64 free units (largest free: 32); try shape split"
    assert not d.never  # "a" has 64 units once its leases end
    d = e.match(Ask(units=64, gang=False, max_pools=2))
    assert ids(d) == [["a", "b"]] and d.options[0].units == 64
    d = e.match(Ask(units=65))
    assert reason(d) == "no single pool has 65 units even when idle (largest: 64 units); try shape split"
    assert d.never


def test_split_not_enough_free_and_never() -> None:
    e = engine(pool("a", "us-east", "2", free=32, capacity=64), pool("b", "us-west", "2", free=16, capacity=16))
    d = e.match(Ask(units=64, gang=False, max_pools=4, max_regions=2))
    assert d.reasons[0] == "not enough free units: 48 of 64 free across matching pools"
    assert not d.never  # 80 units registered
    d = e.match(Ask(units=100, gang=False, max_pools=4, max_regions=2))
    assert d.never
    assert "not enough capacity even when idle: 80 of 100 registered across matching pools" in d.reasons


def test_split_respects_max_pools_and_max_regions() -> None:
    e = engine(pool("e1", "us-east", "1", free=8), pool("e2", "us-east", "1.1", free=8),
               pool("e3", "us-east", "5", free=32),
               pool("w1", "us-west", "1.05", free=8), pool("w2", "us-west", "1.2", free=8))
    # cheapest units first, one region, up to 3 pools
    d = e.match(Ask(units=16, gang=False, max_pools=3))
    assert ids(d)[0] == ["e1", "e2"]
    # across two regions the cheapest 16 units are e1 + w1
    d = e.match(Ask(units=16, gang=False, max_pools=3, max_regions=2))
    assert sorted(ids(d)[0]) == ["e1", "w1"]
    assert len({a.region for a in d.options[0].allocations}) == 2
    # one pool only: the big expensive one is the only one with 16 free
    d = e.match(Ask(units=16, gang=False, max_pools=1))
    assert ids(d) == [["e3"]]
    # 24 units in <= 2 pools in one region: only e3 can carry most of it
    d = e.match(Ask(units=24, gang=False, max_pools=2))
    best = d.options[0]
    assert len(best.allocations) <= 2 and best.units == 24
    assert {a.pool_id for a in best.allocations} == {"e1", "e3"}
    # 40 units: with 3 pools the cheap ones first; with 2 pools e3 must carry most
    assert ids(e.match(Ask(units=40, gang=False, max_pools=3)))[0] == ["e1", "e2", "e3"]
    assert sorted(ids(e.match(Ask(units=40, gang=False, max_pools=2)))[0]) == ["e1", "e3"]
    # 48 units in one region with at most 2 pools cannot fit
    d = e.match(Ask(units=48, gang=False, max_pools=2))
    assert "need more than max_pools=2 pools (the 2 largest hold 40 free)" in reason(d)
    assert d.never
    d = e.match(Ask(units=60, gang=False, max_pools=5, max_regions=1))
    assert "do not fit in max_regions=1 region (the best 1 hold 48 free in 5 pools)" in reason(d)
    assert d.never


def test_split_prefers_whole_pools_then_best_fit() -> None:
    e = engine(pool("big", "us-east", "2", free=64), pool("mid", "us-east", "2", free=24),
               pool("small", "us-east", "2", free=8))
    # equal prices: take the largest whole pools until the rest fits one, then best fit
    d = e.match(Ask(units=70, gang=False, max_pools=3))
    assert [(a.pool_id, a.units) for a in d.options[0].allocations] == [("big", 64), ("small", 6)]
    assert d.options[0].stranded_units == 2


# --- fragmentation-aware tiebreak -----------------------------------------------------------
def test_best_fit_keeps_big_pools_free() -> None:
    e = engine(pool("big", "us-east", "2", free=64), pool("exact", "us-east", "2", free=8),
               pool("roomy", "us-east", "2", free=16))
    d = e.match(Ask(units=8))
    assert ids(d) == [["exact"], ["roomy"], ["big"]]
    assert [o.stranded_units for o in d.options] == [0, 8, 56]
    assert ids(e.match(Ask(units=8), limit=1)) == [["exact"]]
    assert ids(e.match(Ask(units=10), limit=1)) == [["roomy"]]
    # a cheaper pool still wins over a better fit
    e.upsert(pool("cheap-big", "us-east", "1.99", free=64))
    assert first(e.match(Ask(units=8))) == "cheap-big"


# --- network: transfer cost and time ---------------------------------------------------------
def test_data_transfer_changes_the_choice() -> None:
    e = engine(pool("us", "us-east", "2.00"), pool("gz", "cn-gz", "2.05"))
    assert first(e.match(Ask(units=8))) == "us"
    d = e.match(Ask(units=8, data_region="cn-gz", data_gb=500))
    assert ids(d) == [["gz"], ["us"]]
    gz, us = d.options
    assert gz.transfer_cost == 0 and gz.total_cost == D("16.40")
    assert us.transfer_cost == D("75.00")  # 500 GB x 0.15 USD/GB across the CN border
    assert us.total_cost == D("91.00")
    # seconds: 500 GB x 8 / min(link bandwidth, pool egress)
    assert gz.transfer_s == pytest.approx(500 * 8 / 10)  # pool egress 10 Gbit/s < 400
    assert us.transfer_s == pytest.approx(500 * 8 / 10)
    # transfer is counted once per destination region, not per pool
    e2 = engine(pool("a", "us-east", "2", free=4), pool("b", "us-east", "2", free=4))
    d = e2.match(Ask(units=8, gang=False, max_pools=2, data_region="us-west", data_gb=100))
    assert d.options[0].transfer_cost == D("2.00")  # 100 GB x 0.02, once


def test_objective_time_vs_cost() -> None:
    e = engine(pool("slow", "us-east", "2", egress_gbps=10.0),
               pool("fast", "us-east", "3", egress_gbps=100.0))
    ask = Ask(units=8, data_region="us-west", data_gb=1000)
    assert first(e.match(ask)) == "slow"
    d = e.match(msgspec.structs.replace(ask, objective="time"))
    assert ids(d) == [["fast"], ["slow"]]
    assert d.options[0].transfer_s == pytest.approx(80.0)  # 1000 GB x 8 / 100 Gbit/s
    assert d.options[1].transfer_s == pytest.approx(800.0)
    # without data every option starts now: time falls back to cost
    assert first(e.match(Ask(units=8, objective="time"))) == "slow"


def test_transfer_in_another_currency_cannot_be_priced() -> None:
    e = engine(pool("gz", "cn-gz", "10", currency="CNY"), pool("yrd", "cn-yrd", "9", currency="CNY"))
    # the topology prices egress in USD: a CNY ask can use data only where it is free to move
    d = e.match(Ask(units=8, currency="CNY", data_region="cn-gz", data_gb=100))
    assert ids(d) == [["gz"]]
    d = e.match(Ask(units=8, currency="CNY", data_region="us-east", data_gb=100))
    assert reason(d).startswith("no pool can receive data from us-east")


def test_hand_built_topology() -> None:
    regions = [r for r in TOPO.regions if r.id in ("us-east", "eu-west")]
    topo = build_topology(regions)
    e = engine(pool("us", "us-east", "2"), pool("ie", "eu-west", "2.5"), topology=topo)
    # us: 16 + 100 GB x 0.09 = 25 > ie: 20
    assert first(e.match(Ask(units=8, data_region="eu-west", data_gb=100))) == "ie"
    assert first(e.match(Ask(units=8, data_region="eu-west", data_gb=1))) == "us"
    # a published, cheaper link: us: 16 + 100 x 0.01 = 17 < 20
    e.set_topology(build_topology(regions, [
        Link(src="eu-west", dst="us-east", latency_ms=70, bandwidth_gbps=100,
             egress_per_gb=D("0.01"))]))
    assert first(e.match(Ask(units=8, data_region="eu-west", data_gb=100))) == "us"


# --- normalised performance -----------------------------------------------------------------
def test_performance_gang_picks_cheapest_single_pool() -> None:
    e = engine(pool("h", "us-east", "3.00", free=16),  # 989.4 bf16 each
               pool("a", "us-east", "1.00", free=32, model=A100))  # 312 each
    # 5000 TFLOPS: 6 H100 = 18.00/h, or 17 A100 = 17.00/h
    d = e.match(Ask(min_tflops=5000))
    assert ids(d) == [["a"], ["h"]]
    a, h = d.options
    assert (a.units, h.units) == (17, 6)
    assert a.tflops == pytest.approx(17 * 312) and a.tflops >= 5000
    assert a.total_cost == D("17.00") and h.total_cost == D("18.00")


def test_performance_split_cheapest_mix_and_metric() -> None:
    e = engine(pool("h", "us-east", "3.00", free=16),        # 3.03 / PFLOPS-h bf16
               pool("a", "us-east", "1.00", free=8, model=A100),  # 3.21 / PFLOPS-h
               pool("m", "us-east", "5.00", free=8, model=MI300X))  # 3.82 / PFLOPS-h
    d = e.match(Ask(min_tflops=20000, gang=False, max_pools=3))
    best = d.options[0]
    # all 16 H100s (15830.4), all 8 A100s (2496), then 2 MI300X for the last 1673.6
    assert [(x.pool_id, x.units) for x in best.allocations] == [("h", 16), ("a", 8), ("m", 2)]
    assert best.units == 26
    assert best.tflops >= 20000
    # fp8: A100 has no fp8 figure and is excluded
    d = e.match(Ask(min_tflops=20000, metric="fp8", gang=False, max_pools=3))
    assert all(x.model != A100 for o in d.options for x in o.allocations)
    assert d.options[0].allocations[0].pool_id == "h"  # 1.52 / PFLOPS-h fp8
    d = e.match(Ask(min_tflops=100, metric="fp8", models=frozenset({A100})))
    assert reason(d).startswith(f"no pool of models ['{A100}'] has a fp8 TFLOPS figure")


def test_performance_split_takes_cheapest_per_tflops_first() -> None:
    e = engine(pool("h", "us-east", "3.00", free=4),
               pool("a", "us-east", "1.00", free=64, model=A100))
    d = e.match(Ask(min_tflops=5000, gang=False, max_pools=2))
    best = d.options[0]
    assert [(x.pool_id, x.units) for x in best.allocations] == [("h", 4), ("a", 4)]
    assert best.tflops == pytest.approx(4 * 989.4 + 4 * 312)
    assert best.compute_cost == D("16.00")
    d = e.match(Ask(min_tflops=5e6, gang=False, max_pools=2))
    assert reason(d).startswith("not enough free capacity: 23925.6 TFLOPS bf16 of 5000000 TFLOPS bf16")
    assert d.never


# --- state changes ---------------------------------------------------------------------------
def test_set_free_remove_upsert() -> None:
    e = engine(pool("a", "us-east", "1", free=8, capacity=8), pool("b", "us-east", "2", free=8))
    assert len(e) == 2 and e.get("a").free == 8
    assert first(e.match(Ask(units=8))) == "a"
    e.set_free("a", 4)
    assert e.get("a").free == 4
    assert ids(e.match(Ask(units=8))) == [["b"]]
    assert first(e.match(Ask(units=4))) == "a"
    e.set_free("a", 8)
    assert first(e.match(Ask(units=8))) == "a"
    e.remove("a")
    e.remove("a")  # absent: no error
    e.set_free("nope", 3)  # absent: no error
    assert len(e) == 1 and e.get("a") is None
    assert ids(e.match(Ask(units=8))) == [["b"]]
    e.upsert(pool("b", "us-east", "0.5", free=8))  # replace: new price
    assert e.match(Ask(units=8)).options[0].total_cost == D("4.0")
    e.upsert(pool("b", "eu-west", "0.5", free=8))  # replace: moves region
    assert e.match(Ask(units=8)).options[0].allocations[0].region == "eu-west"
    assert len(e) == 1
    # the engine keeps its own copy: the caller's struct is not changed by set_free
    mine = pool("c", "us-east", "1", free=8)
    e.upsert(mine)
    e.set_free("c", 0)
    assert mine.free == 8 and e.get("c").free == 0


def test_set_free_between_matches_keeps_index_exact() -> None:
    e = engine(*(pool(f"p{i}", "us-east", "2", free=8 * (i + 1), capacity=64) for i in range(6)))
    e.match(Ask(units=1))  # built
    for i in range(6):
        e.set_free(f"p{i}", 0)
    assert reason(e.match(Ask(units=1))).startswith("no single pool has 1 free units")
    e.set_free("p3", 20)
    e.set_free("p5", 12)
    assert ids(e.match(Ask(units=10))) == [["p5"], ["p3"]]


def test_walk_order_follows_pools_filling_up_and_freeing() -> None:
    """The walk over cells is ordered by the cheapest price with a free unit, cached per
    request shape: a cheap pool that fills up stops holding the walk back, and one that
    frees up again is found at once (its cell moves back to the front)."""
    e = engine(pool("c1", "us-east", "1.00", capacity=8, model=H100),
               pool("c2", "us-east", "5.00", capacity=8, model=H100),
               pool("m1", "us-east", "2.00", capacity=8, model=A100),
               pool("d1", "us-east", "3.00", capacity=8, model=MI300X))
    e.set_free("c1", 0)  # the H100 cell's floor is 5.00, behind the A100 one
    assert ids(e.match(Ask(units=1), limit=1)) == [["m1"]]  # orders the cells for "any units"
    e.set_free("c1", 3)  # and back down to 1.00: the cached orders must know
    assert ids(e.match(Ask(units=1), limit=1)) == [["c1"]]
    assert ids(e.match(Ask(units=2), limit=1)) == [["c1"]]
    assert ids(e.match(Ask(units=4), limit=1)) == [["m1"]]
    e.set_free("m1", 0)
    assert ids(e.match(Ask(units=4), limit=2)) == [["d1"], ["c2"]]


@pytest.mark.parametrize("keep", [3, 4096])
def test_cached_orders_catch_up_after_many_floor_moves(monkeypatch: pytest.MonkeyPatch, keep: int) -> None:
    """More moves than an order replays one by one (or than the engine remembers): the
    order re-sorts in full, and answers stay those of a fresh engine."""
    from services.broker.matching import engine as engine_module

    monkeypatch.setattr(engine_module._Moves, "KEEP", keep)  # noqa: SLF001
    models = [H100, A100, MI300X, ASCEND]
    pools = [pool(f"p{i}", "us-east" if i % 2 else "eu-central", f"{1 + i % 7}.{i % 10}0", capacity=8,
                  model=models[i % 4]) for i in range(40)]
    e = engine(*pools)
    shapes = [Ask(units=1), Ask(units=3), Ask(units=2, regions=frozenset({"us-east"})),
              Ask(units=1, models=frozenset({H100, A100})),
              Ask(units=2, data_region="us-east", data_gb=500.0),  # walks the (region, egress) groups
              Ask(units=12, gang=False, max_pools=3, max_regions=2),  # walks the regions
              Ask(units=12, gang=False, max_pools=2, data_region="eu-central", data_gb=50.0)]
    for ask in shapes:
        e.match(ask)  # cache an order per shape
    free = {p.pool_id: 8 for p in pools}
    for round_ in range(40):  # a few pools fill or free up, the orders catch up, ...
        for i in ((round_ * 7) % 40, (round_ * 13 + 5) % 40)[: 1 + round_ % 2]:
            pid = pools[i].pool_id
            free[pid] = 0 if free[pid] else 8
            e.set_free(pid, free[pid])
        fresh = engine(*(msgspec.structs.replace(p, free=free[p.pool_id]) for p in pools))
        for ask in shapes:
            assert e.match(ask, limit=3) == fresh.match(ask, limit=3), (round_, ask)
        assert_orders_current(e)
    for p in pools[:30]:  # many moves between two uses: the orders re-sort in full
        free[p.pool_id] = 0 if free[p.pool_id] else 8
        e.set_free(p.pool_id, free[p.pool_id])
    assert_orders_current(e)


def assert_orders_current(e: Engine) -> None:
    """Every cached walk order, once caught up, is what sorting afresh gives: rows by
    (floor bound, cell id), and its per-region and per-group views the same rows."""
    for order in e._orders.values():  # noqa: SLF001 - the engine's internals, checked directly
        order.refresh(e._moves)  # noqa: SLF001
        expected = sorted(((order.bound(c, b), c, b) for _, c, b in order.rows), key=lambda r: (r[0], r[1].id))
        assert order.rows == expected
        if order._by_region is not None:  # noqa: SLF001
            for region, rows in order._by_region.items():  # noqa: SLF001
                assert rows == [r for r in expected if r[1].region == region]
        if order._groups is not None:  # noqa: SLF001
            for (region, egress), rows in order._groups.items():  # noqa: SLF001
                assert rows == [r for r in expected if (r[1].region, r[1].egress_gbps) == (region, egress)]
