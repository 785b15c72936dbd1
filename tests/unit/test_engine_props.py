"""Property tests of the matching engine against brute force over small random worlds.

``ENGINE_EXAMPLES=3000 pytest tests/unit/test_engine_props.py`` for a longer run."""

from __future__ import annotations

import math
import os
from decimal import Decimal
from itertools import combinations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.broker.matching import Ask, Decision, Engine, PoolState
from services.broker.matching.model import HOURS_PER_MONTH
from services.registry.domain.topology import TopologyIndex, build_topology, default_topology

TOPO = default_topology()
REGIONS = ["us-east", "us-west", "eu-west", "cn-gz", "cn-yrd"]
TOPO_SMALL = build_topology([r for r in TOPO.regions if r.id in REGIONS])
INDEX = TopologyIndex(TOPO_SMALL)
COUNTRY = {r.id: r.country for r in TOPO_SMALL.regions}

# model -> (vendor, stack, memory, bf16, fp8, interconnect, frameworks)
MODELS = {
    "m-nv": ("nvidia", "cuda", 80.0, 989.4, 1978.9, "nvlink4", ("jax", "pytorch")),
    "m-amd": ("amd", "rocm", 192.0, 1307.4, None, "xgmi", ("pytorch",)),
    "m-asc": ("huawei", "cann", 64.0, 313.0, None, "hccs", ("mindspore", "pytorch")),
}
PRICES = [Decimal(p) for p in ("1", "1.5", "2", "2.25", "3")]
BILLINGS = ("on_demand", "reserved_month", "reserved_year", "interruptible")
SETTINGS = settings(max_examples=int(os.environ.get("ENGINE_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def pools(draw: st.DrawFn, n_max: int = 16) -> list[PoolState]:
    n = draw(st.integers(0, n_max))
    out = []
    for i in range(n):
        model = draw(st.sampled_from(sorted(MODELS)))
        vendor, stack, mem, bf16, fp8, ic, fw = MODELS[model]
        region = draw(st.sampled_from(REGIONS))
        capacity = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
        free = draw(st.sampled_from([0, capacity // 2, capacity, capacity, draw(st.integers(0, capacity))]))
        price = draw(st.sampled_from(PRICES))
        optional = {b: (draw(st.sampled_from(PRICES)) * (700 if b.startswith("reserved") else 1)
                        if draw(st.booleans()) else None)
                    for b in ("reserved_month", "reserved_year", "interruptible")}
        out.append(PoolState(
            pool_id=f"p{i:02d}", provider=f"prov{i % 3}", region=region, country=COUNTRY[region],
            model=model, vendor=vendor, stack=stack, frameworks=fw, memory_gib=mem,
            interconnect=ic, host_arch=draw(st.sampled_from(["x86_64", "x86_64", "aarch64"])),
            bf16_tflops=bf16, fp16_tflops=bf16, fp8_tflops=fp8, capacity=capacity, free=free,
            currency=draw(st.sampled_from(["USD", "USD", "USD", "CNY"])), on_demand=price,
            egress_gbps=draw(st.sampled_from([10.0, 100.0])), **optional))
    return out


def subset(values: list[str]) -> st.SearchStrategy[frozenset[str]]:
    return st.frozensets(st.sampled_from(values), max_size=2)


@st.composite
def asks(draw: st.DrawFn, pool_ids: list[str]) -> Ask:
    def rarely(strategy: st.SearchStrategy, default: object, odds: int = 5) -> object:
        return draw(strategy) if draw(st.integers(1, odds)) == 1 else default

    perf = draw(st.integers(0, 3)) == 0
    data = draw(st.booleans())
    users = rarely(st.just(True), False, 4)
    return Ask(
        units=None if perf else draw(st.sampled_from([1, 2, 4, 8, 8, 16, 24, 40, 70])),
        min_tflops=draw(st.sampled_from([500.0, 2000.0, 9000.0, 30000.0])) if perf else None,
        metric=rarely(st.sampled_from(["fp8", "fp16"]), "bf16", 3),
        models=rarely(subset(sorted(MODELS)), frozenset(), 4),
        vendors=rarely(subset(["nvidia", "amd", "huawei"]), frozenset(), 6),
        frameworks=rarely(st.frozensets(st.sampled_from(["pytorch", "jax"]), max_size=1),
                          frozenset(), 6),
        host_archs=rarely(st.frozensets(st.sampled_from(["x86_64", "aarch64"]), max_size=1),
                          frozenset(), 6),
        min_memory_gib=rarely(st.sampled_from([70.0, 100.0]), 0.0, 6),
        gang=draw(st.booleans()),
        max_pools=draw(st.integers(1, 4)),
        max_regions=draw(st.integers(1, 3)),
        regions=rarely(subset(REGIONS), frozenset(), 6),
        countries=rarely(st.frozensets(st.sampled_from(["US", "CN", "IE"]), max_size=2),
                         frozenset(), 6),
        data_region=draw(st.sampled_from(REGIONS)) if data else None,
        data_gb=draw(st.sampled_from([0.0, 50.0, 2000.0])) if data else 0.0,
        users_region=draw(st.sampled_from(REGIONS)) if users else None,
        max_latency_ms=draw(st.sampled_from([5.0, 80.0, 200.0])) if users else None,
        billing=rarely(st.sampled_from(BILLINGS[1:]), "on_demand", 3),
        hours=draw(st.sampled_from([Decimal(1), Decimal("2.5"), Decimal(24)])),
        max_price=rarely(st.sampled_from([Decimal("1.5"), Decimal("2.5")]), None, 4),
        currency=rarely(st.just("CNY"), "USD", 5),
        objective=draw(st.sampled_from(["cost", "time"])),
        exclude_pools=rarely(st.frozensets(st.sampled_from(pool_ids), max_size=3), frozenset(), 3)
        if pool_ids else frozenset(),
    )


# --- the oracle: constraints and costs written out directly ----------------------------
def tflops(p: PoolState, metric: str) -> float:
    return {"bf16": p.bf16_tflops, "fp16": p.fp16_tflops, "fp8": p.fp8_tflops or 0.0}[metric]


def factor(ask: Ask) -> Decimal:
    return {"on_demand": ask.hours, "interruptible": ask.hours, "reserved_month": Decimal(1),
            "reserved_year": Decimal(12)}[ask.billing]


def transfer(ask: Ask, region: str) -> tuple[Decimal, float] | None:
    """(cost, bandwidth) of moving the ask's data to region; None if unpriceable."""
    if not ask.data_region or ask.data_gb <= 0:
        return Decimal(0), math.inf
    link = INDEX.link(ask.data_region, region)
    cost = Decimal(repr(ask.data_gb)) * link.egress_per_gb
    if cost and link.currency != ask.currency:
        return None
    return cost, link.bandwidth_gbps


def qualifies(p: PoolState, ask: Ask, *, ignore_exclude: bool = False) -> bool:
    price = getattr(p, ask.billing)
    per_hour = None if price is None else (
        price / HOURS_PER_MONTH if ask.billing.startswith("reserved") else price)
    return (
        (not ask.models or p.model in ask.models)
        and (not ask.vendors or p.vendor in ask.vendors)
        and (not ask.stacks or p.stack in ask.stacks)
        and set(ask.frameworks) <= set(p.frameworks)
        and (not ask.interconnects or p.interconnect in ask.interconnects)
        and (not ask.host_archs or p.host_arch in ask.host_archs)
        and p.memory_gib >= ask.min_memory_gib
        and (not ask.regions or p.region in ask.regions)
        and (not ask.countries or p.country in ask.countries)
        and (ask.users_region is None or ask.max_latency_ms is None
             or INDEX.link(ask.users_region, p.region).latency_ms <= ask.max_latency_ms)
        and p.currency == ask.currency
        and price is not None
        and (ask.max_price is None or per_hour <= ask.max_price)
        and (ignore_exclude or p.pool_id not in ask.exclude_pools)
        and (ask.units is not None or tflops(p, ask.metric) > 0)
        and transfer(ask, p.region) is not None
    )


def gang_units(p: PoolState, ask: Ask) -> int:
    if ask.units is not None:
        return ask.units
    t = tflops(p, ask.metric)
    u = math.ceil(ask.min_tflops / t)
    if u > 1 and (u - 1) * t >= ask.min_tflops * (1 - 1e-12):
        u -= 1
    return u


def gang_costs(world: list[PoolState], ask: Ask, *, use_capacity: bool = False) -> list[tuple]:
    """(objective key, pool id) of every single-pool placement."""
    out = []
    for p in world:
        if not qualifies(p, ask, ignore_exclude=use_capacity):
            continue
        n = gang_units(p, ask)
        if (p.capacity if use_capacity else p.free) < n:
            continue
        t_cost, bw = transfer(ask, p.region)
        cost = getattr(p, ask.billing) * n * factor(ask) + t_cost
        secs = 0.0 if not (ask.data_region and ask.data_gb > 0) else ask.data_gb * 8 / min(bw, p.egress_gbps)
        key = (secs, cost) if ask.objective == "time" and secs else (cost, secs)
        out.append((key, p.pool_id))
    return sorted(out)


def split_feasible(world: list[PoolState], ask: Ask, *, use_capacity: bool = False) -> bool:
    need = ask.units if ask.units is not None else ask.min_tflops * (1 - 1e-9)
    value = {p.pool_id: (p.capacity if use_capacity else p.free)
             * (1 if ask.units is not None else tflops(p, ask.metric))
             for p in world if qualifies(p, ask, ignore_exclude=use_capacity)}
    region_of = {p.pool_id: p.region for p in world}
    regions = sorted({region_of[pid] for pid in value})
    for k in range(1, min(ask.max_regions, len(regions)) + 1):
        for combo in combinations(regions, k):
            vals = sorted((v for pid, v in value.items() if region_of[pid] in combo), reverse=True)
            if sum(vals[:ask.max_pools]) >= need:
                return True
    return False


def option_key(ask: Ask, o) -> tuple:
    return (o.transfer_s, o.total_cost) if ask.objective == "time" and ask.data_region and ask.data_gb > 0 \
        else (o.total_cost, o.transfer_s)


def check_decision(world: list[PoolState], ask: Ask, d: Decision, limit: int) -> None:
    by_id = {p.pool_id: p for p in world}
    assert len(d.options) <= limit
    assert len({frozenset(a.pool_id for a in o.allocations) for o in d.options}) == len(d.options)
    f = factor(ask)
    for o in d.options:
        assert o.allocations
        ids = [a.pool_id for a in o.allocations]
        assert len(ids) == len(set(ids))
        regions = {a.region for a in o.allocations}
        if ask.gang:
            assert len(o.allocations) == 1
        else:
            assert len(o.allocations) <= ask.max_pools
            assert len(regions) <= ask.max_regions
        compute = Decimal(0)
        delivered = 0.0
        for a in o.allocations:
            p = by_id[a.pool_id]
            assert qualifies(p, ask), (p, ask)
            assert 1 <= a.units <= p.free
            assert a.region == p.region and a.model == p.model and a.provider == p.provider
            assert a.unit_price == getattr(p, ask.billing)
            compute += a.unit_price * a.units * f
            delivered += a.units * tflops(p, ask.metric)
        assert o.units == sum(a.units for a in o.allocations)
        if ask.units is not None:
            assert o.units == ask.units
        else:
            assert o.tflops >= ask.min_tflops * (1 - 1e-9)
            if ask.gang:  # the fewest units of that model that deliver it
                assert o.units == gang_units(by_id[ids[0]], ask)
        assert math.isclose(o.tflops, delivered, rel_tol=1e-9)
        assert o.compute_cost == compute
        assert o.transfer_cost == sum((transfer(ask, r)[0] for r in regions), Decimal(0))
        assert o.total_cost == o.compute_cost + o.transfer_cost
        assert o.currency == ask.currency
        assert o.stranded_units == sum(by_id[a.pool_id].free - a.units for a in o.allocations)
        assert isinstance(o.total_cost, Decimal) and isinstance(o.unit_hour_price, Decimal)
    keys = [option_key(ask, o) for o in d.options]
    assert keys == sorted(keys)
    if d.options and ask.objective == "cost":
        assert all(d.options[0].total_cost <= o.total_cost for o in d.options)
    if ask.gang:
        brute = gang_costs(world, ask)
        if brute:
            assert d.placed
            assert option_key(ask, d.options[0]) == brute[0][0]
            # the whole top-`limit` list is exact too
            assert [option_key(ask, o) for o in d.options] == [k for k, _ in brute[:limit]]
        else:
            assert not d.placed
    else:
        assert d.placed == split_feasible(world, ask)
    if not d.placed:
        assert d.reasons and all(isinstance(r, str) and r for r in d.reasons)
        ever = gang_costs(world, ask, use_capacity=True) if ask.gang else \
            split_feasible(world, ask, use_capacity=True)
        if d.never:
            assert not ever
        elif ask.gang:
            # never is exact for gang asks
            assert ever


def engine_for(world: list[PoolState]) -> Engine:
    e = Engine(TOPO_SMALL)
    for p in world:
        e.upsert(p)
    return e


@SETTINGS
@given(st.data())
def test_options_satisfy_constraints_and_gang_is_exact(data: st.DataObject) -> None:
    world = data.draw(pools())
    engine = engine_for(world)
    limit = data.draw(st.integers(1, 4))
    for _ in range(3):
        ask = data.draw(asks([p.pool_id for p in world]))
        check_decision(world, ask, engine.match(ask, limit=limit), limit)


@st.composite
def crowded(draw: st.DrawFn) -> list[PoolState]:
    """Many pools that differ only in price (two levels), free units and region: ties."""
    n = draw(st.integers(1, 14))
    base = PoolState(pool_id="x", provider="p", region="us-east", country="US", model="m-nv",
                     vendor="nvidia", stack="cuda", frameworks=("pytorch",), memory_gib=80.0,
                     interconnect="nvlink4", bf16_tflops=989.4, fp16_tflops=989.4,
                     capacity=64, free=0, on_demand=Decimal(1))
    return [msgspec.structs.replace(
        base, pool_id=f"c{i:02d}", free=draw(st.integers(0, 64)),
        region=draw(st.sampled_from(["us-east", "us-east", "us-west"])),
        on_demand=draw(st.sampled_from([Decimal(1), Decimal(2)]))) for i in range(n)]


@SETTINGS
@given(st.data())
def test_gang_best_fit_among_equal_cost(data: st.DataObject) -> None:
    world = data.draw(st.one_of(pools(), crowded()))
    engine = engine_for(world)
    ask = msgspec.structs.replace(data.draw(asks([p.pool_id for p in world])), gang=True)
    if data.draw(st.booleans()):  # mostly unconstrained, so that ties are common
        ask = Ask(units=data.draw(st.integers(1, 64)), data_region=ask.data_region,
                  data_gb=ask.data_gb, objective=ask.objective, exclude_pools=ask.exclude_pools)
    d = engine.match(ask, limit=1)
    brute = gang_costs(world, ask)
    if brute:
        by_id = {p.pool_id: p for p in world}
        best = brute[0][0]
        ties = [pid for k, pid in brute if k == best]
        fits = min((by_id[pid].free - gang_units(by_id[pid], ask), pid) for pid in ties)
        assert d.options[0].allocations[0].pool_id == fits[1]
        assert d.options[0].stranded_units == fits[0]


@SETTINGS
@given(st.data())
def test_incremental_updates_match_a_fresh_index(data: st.DataObject) -> None:
    """set_free / remove / upsert after indexing give the same answers as a fresh engine."""
    world = {p.pool_id: p for p in data.draw(pools())}
    engine = engine_for(list(world.values()))
    engine.match(Ask(units=1))  # index everything
    extra = data.draw(pools(6))
    for _ in range(data.draw(st.integers(1, 15))):
        op = data.draw(st.sampled_from(["free", "free", "free", "remove", "upsert"]))
        if op == "free" and world:
            pid = data.draw(st.sampled_from(sorted(world)))
            free = data.draw(st.integers(0, world[pid].capacity))
            engine.set_free(pid, free)
            world[pid] = msgspec.structs.replace(world[pid], free=free)
        elif op == "remove" and world:
            pid = data.draw(st.sampled_from(sorted(world)))
            engine.remove(pid)
            del world[pid]
        elif op == "upsert" and extra:
            p = extra.pop()
            p = msgspec.structs.replace(p, pool_id=data.draw(st.sampled_from(
                sorted(world) + [f"n{len(extra)}"])))
            engine.upsert(p)
            world[p.pool_id] = p
        if data.draw(st.booleans()) and world:
            # interleave matches so that updates hit built books and cached walk orders
            engine.match(data.draw(st.sampled_from([Ask(units=1), data.draw(asks(sorted(world)))])))
    assert len(engine) == len(world)
    for cell in engine._cells:  # noqa: SLF001 - each book's floor is kept, not recomputed
        for book in cell.books.values():
            assert book.floor == book.first(0, 1)
    for pid, p in world.items():
        assert engine.get(pid) == p
    fresh = engine_for(list(world.values()))
    for _ in range(3):
        ask = data.draw(asks(sorted(world)))
        got = engine.match(ask, limit=3)
        assert got == fresh.match(ask, limit=3)
        check_decision(list(world.values()), ask, got, 3)
