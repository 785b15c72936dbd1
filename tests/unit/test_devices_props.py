"""Properties of the per-device state under random asks and releases (hypothesis): no
device above 1000 milli, no whole-device placement on a partly used device, release gives
back exactly what was taken, the shape index always matches the state, and a decision is
found whenever some placement fits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.broker.matching.devices import (
    MILLI,
    DeviceAsk,
    DeviceCluster,
    DevicePlacement,
    Knobs,
    NodeSpec,
    typical_mix,
)

MODELS = ("T4", "V100", "G2")

node_st = st.builds(
    lambda model, devices, cpu, mem: (model, devices, cpu, mem),
    st.sampled_from(MODELS), st.sampled_from([1, 2, 4, 8]),
    st.integers(0, 16).map(lambda c: c * 4000), st.integers(0, 8).map(lambda m: m * 16384),
)


@st.composite
def ask_st(draw) -> DeviceAsk:
    kind = draw(st.sampled_from(["share", "whole", "cpu"]))
    cpu = draw(st.integers(0, 8)) * 2000
    mem = draw(st.integers(0, 4)) * 8192
    models = frozenset(draw(st.sets(st.sampled_from(MODELS), max_size=2)))
    if kind == "share":
        return DeviceAsk(cpu_milli=cpu, memory_mib=mem, gpus=1, milli=draw(st.integers(1, 999)), models=models)
    if kind == "whole":
        return DeviceAsk(cpu_milli=cpu, memory_mib=mem, gpus=draw(st.sampled_from([1, 2, 4, 8])), models=models)
    return DeviceAsk(cpu_milli=cpu, memory_mib=mem, gpus=0, milli=0)


op_st = st.one_of(st.tuples(st.just("ask"), ask_st()), st.tuples(st.just("release"), st.integers(0, 10_000)))


def snapshot(dc: DeviceCluster) -> tuple:
    return ([list(f) for f in dc.free], list(dc.cpu), list(dc.mem), list(dc.key),
            {m: {k: sorted(b.members) for k, b in shapes.items()} for m, shapes in dc.buckets.items()})


def fits_somewhere(dc: DeviceCluster, ask: DeviceAsk) -> bool:
    """Brute force over nodes: is there any legal placement?"""
    for i, free in enumerate(dc.free):
        if dc.cpu[i] < ask.cpu_milli or dc.mem[i] < ask.memory_mib:
            continue
        if ask.models and dc.model[i] not in ask.models:
            continue
        if ask.gpus == 0:
            return True
        if ask.share and any(v >= ask.milli for v in free):
            return True
        if not ask.share and sum(1 for v in free if v == MILLI) >= ask.gpus:
            return True
    return False


def check_index(dc: DeviceCluster) -> None:
    for i in range(len(dc.free)):
        assert dc.key[i] == dc._key(i)
        assert i in dc.buckets[dc.model[i]][dc.key[i]].members
    assert sum(len(b.members) for shapes in dc.buckets.values() for b in shapes.values()) == len(dc.free)
    assert all(b.members for shapes in dc.buckets.values() for b in shapes.values())  # none empty


@settings(max_examples=150, deadline=None)
@given(nodes=st.lists(node_st, min_size=1, max_size=5), ops=st.lists(op_st, max_size=40),
       mix_asks=st.lists(ask_st(), max_size=12), tolerance=st.sampled_from([0.0, 100.0]))
def test_random_asks_and_releases_keep_every_invariant(nodes, ops, mix_asks, tolerance) -> None:
    specs = [NodeSpec(name=f"n{k}", model=m, devices=d, cpu_milli=c, memory_mib=mem)
             for k, (m, d, c, mem) in enumerate(nodes)]
    dc = DeviceCluster(specs, typical_mix(mix_asks), Knobs(tolerance=tolerance))
    initial = snapshot(dc)
    held: list[DevicePlacement] = []
    for kind, arg in ops:
        if kind == "ask":
            before = snapshot(dc)
            p = dc.decide(arg)
            assert snapshot(dc) == before, "decide must not change state"
            assert (p is not None) == fits_somewhere(dc, arg)
            if p is None:
                continue
            free_before = list(dc.free[p.node])
            if arg.gpus and not arg.share:
                assert all(free_before[d] == MILLI for d in p.devices), "whole device on a used one"
            assert len(p.devices) == arg.gpus and len(set(p.devices)) == arg.gpus
            dc.take(p)
            # release straight away gives back exactly the state before, then take again
            dc.release(p)
            assert snapshot(dc) == before
            dc.take(p)
            held.append(p)
        elif held:
            dc.release(held.pop(arg % len(held)))
        for i, free in enumerate(dc.free):
            assert all(0 <= v <= MILLI for v in free)
            assert 0 <= dc.cpu[i] <= dc.cpu_cap[i] and 0 <= dc.mem[i] <= dc.mem_cap[i]
        check_index(dc)
        assert dc.allocated_milli() == sum(p.milli * len(p.devices) for p in held)
    for p in reversed(held):
        dc.release(p)
    assert snapshot(dc)[:3] == initial[:3]
    check_index(dc)


@settings(max_examples=100, deadline=None)
@given(devices=st.sampled_from([1, 2, 4, 8]), takes=st.lists(st.integers(1, 1000), min_size=1, max_size=12))
def test_overbooking_is_refused_and_changes_nothing(devices, takes) -> None:
    dc = DeviceCluster([NodeSpec(name="n", model="T4", devices=devices, cpu_milli=1000, memory_mib=1000)])
    for m in takes:
        d = m % devices
        p = DevicePlacement(node=0, devices=(d,), milli=m, cpu_milli=0, memory_mib=0)
        before = snapshot(dc)
        if dc.free[0][d] >= m:
            dc.take(p)
        else:
            with pytest.raises(ValueError):
                dc.take(p)
            assert snapshot(dc) == before
        assert all(0 <= v <= MILLI for v in dc.free[0])
    # give back more than was taken: refused
    over = DevicePlacement(node=0, devices=(0,), milli=MILLI - dc.free[0][0] + 1, cpu_milli=0, memory_mib=0)
    before = snapshot(dc)
    with pytest.raises(ValueError):
        dc.release(over)
    assert snapshot(dc) == before


@settings(max_examples=200, deadline=None)
@given(mix=st.lists(ask_st(), min_size=1, max_size=12), model=st.sampled_from(MODELS),
       free=st.lists(st.integers(0, MILLI), min_size=1, max_size=8), milli=st.integers(1, 999),
       cpu_cls=st.integers(0, 4), mem_cls=st.integers(0, 4))
def test_a_share_scores_the_same_as_the_shape_it_leaves(mix, model, free, milli, cpu_cls, mem_cls) -> None:
    """The incremental count of a share's candidate devices equals ``frag`` of each shape
    it would leave, exactly (the same sums in the same order)."""
    dc = DeviceCluster([NodeSpec(name="n", model=model, devices=len(free), cpu_milli=0, memory_mib=0)],
                       typical_mix(mix))
    shape = tuple(sorted(free, reverse=True))
    got = dc._share_frags(model, shape, cpu_cls, mem_cls, milli)
    assert [v for v, _ in got] == sorted({v for v in free if v >= milli})
    for v, after in got:
        left = list(shape)
        left.remove(v)
        left.append(v - milli)
        assert after == dc.frag(model, tuple(sorted(left, reverse=True)), cpu_cls, mem_cls)
