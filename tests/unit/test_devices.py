"""The per-device placement rule (services/broker/matching/devices.py) on hand-made cases
whose fragmentation values are worked out by hand in the comments."""

from __future__ import annotations

import pytest

from services.broker.matching.devices import (
    MILLI,
    DeviceAsk,
    DeviceCluster,
    DevicePlacement,
    Knobs,
    NodeSpec,
    TypicalAsk,
    typical_mix,
)

A = DeviceAsk(cpu_milli=4000, memory_mib=8192, gpus=1, milli=500)  # half a device
B = DeviceAsk(cpu_milli=8000, memory_mib=16384, gpus=1, milli=1000)  # one whole device
MIX = (TypicalAsk(A, 0.625), TypicalAsk(B, 0.375))


def node(name: str, devices: int = 4, model: str = "T4", cpu: int = 64000, mem: int = 262144) -> NodeSpec:
    return NodeSpec(name=name, model=model, devices=devices, cpu_milli=cpu, memory_mib=mem)


def used(node_idx: int, device: int, milli: int) -> DevicePlacement:
    return DevicePlacement(node=node_idx, devices=(device,), milli=milli, cpu_milli=0, memory_mib=0)


def half_used() -> DeviceCluster:
    """One node, devices free [1000, 1000, 500, 200]."""
    dc = DeviceCluster([node("n0")], MIX)
    dc.take(used(0, 2, 500))
    dc.take(used(0, 3, 800))
    return dc


def test_fragmentation_of_a_node_by_hand() -> None:
    # A (500 milli) fits on 3 devices: only the 200 is stranded -> 0.625 * 200 = 125
    # B (whole) fits on 2 devices: 500 + 200 stranded -> 0.375 * 700 = 262.5
    assert half_used().node_frag(0) == pytest.approx(387.5)
    # an empty 4-device node strands nothing for either
    assert DeviceCluster([node("n0")], MIX).node_frag(0) == 0


def test_node_that_cannot_host_an_expected_ask_counts_all_its_free_as_fragment() -> None:
    dc = DeviceCluster([node("n0", cpu=6000)], MIX)  # B needs 8000 CPU: all 4000 free milli is B's fragment
    assert dc.node_frag(0) == pytest.approx(0.375 * 4000)
    dc = DeviceCluster([node("n0", mem=12000)], MIX)  # B needs 16384 MiB: the same through memory
    assert dc.node_frag(0) == pytest.approx(0.375 * 4000)
    dc = DeviceCluster([node("n0", mem=12000)], MIX, Knobs(memory_aware=False))  # FGD's view: memory ignored
    assert dc.node_frag(0) == 0


def test_share_fills_the_hole_that_strands_least() -> None:
    dc = half_used()
    # on the 500 device: [1000, 1000, 0, 200] -> 0.625*200 + 0.375*200 = 200   (delta -187.5)
    # on a 1000 device:  [500, 1000, 500, 200] -> 0.625*200 + 0.375*1200 = 575 (delta +187.5)
    p = dc.decide(DeviceAsk(gpus=1, milli=500))
    assert p is not None and p.devices == (2,) and p.milli == 500


def test_share_that_fits_only_whole_devices_takes_one_and_is_bounded() -> None:
    dc = half_used()
    p = dc.place(DeviceAsk(gpus=1, milli=600))
    assert p is not None and p.devices[0] in (0, 1)
    assert dc.free[0][p.devices[0]] == 400
    assert dc.decide(DeviceAsk(gpus=1, milli=1000)) is not None  # one whole device is still free
    assert dc.largest_free_slice() == MILLI


def test_whole_devices_never_land_on_a_partly_used_device() -> None:
    dc = DeviceCluster([node("n0", devices=2)], MIX)
    dc.take(used(0, 0, 1))  # device 0 has 999 free: not whole
    p = dc.decide(DeviceAsk(gpus=1, milli=1000))
    assert p is not None and p.devices == (1,)
    assert dc.decide(DeviceAsk(gpus=2, milli=1000)) is None
    with pytest.raises(ValueError):
        dc.take(DevicePlacement(node=0, devices=(0,), milli=1000, cpu_milli=0, memory_mib=0))


def test_gang_stays_on_one_node() -> None:
    dc = DeviceCluster([node("n0", devices=2), node("n1", devices=2)], MIX)
    assert dc.decide(DeviceAsk(gpus=3)) is None  # 4 whole devices free, but no node has 3
    p = dc.decide(DeviceAsk(gpus=2))
    assert p is not None and len(p.devices) == 2


def test_equal_fragmentation_goes_to_the_fuller_node() -> None:
    dc = DeviceCluster([node("n0"), node("n1")], MIX)
    dc.take(used(1, 0, 1000))  # n1: [0, 1000, 1000, 1000]
    # a whole device strands nothing on either node; best fit packs n1
    p = dc.decide(B)
    assert p is not None and p.node == 1


def test_memory_aware_rule_keeps_memory_for_the_expected_asks() -> None:
    # n0 is fuller (best fit would pick it), but after a 6 GiB ask its 20 GiB left could no
    # longer host B (16 GiB) -> its remaining GPU would be stranded; n1 keeps plenty.
    nodes = [node("n0", mem=20480 + 2048), node("n1")]
    ask = DeviceAsk(cpu_milli=1000, memory_mib=8192, gpus=1, milli=1000)
    blind = DeviceCluster(nodes, MIX, Knobs(memory_aware=False))
    aware = DeviceCluster(nodes, MIX)
    for dc in (blind, aware):
        dc.take(used(0, 0, 1000))
    assert blind.decide(ask).node == 0
    assert aware.decide(ask).node == 1


def test_cpu_only_ask_avoids_stranding_gpus() -> None:
    # n0 has all its devices free; n1's are all taken. Using n0's CPU down to 6000 would
    # leave B unplaceable there (4000 milli stranded); on n1 nothing is stranded.
    dc = DeviceCluster([node("n0", cpu=12000), node("n1", devices=1, cpu=12000)], MIX)
    dc.take(used(1, 0, 1000))
    p = dc.decide(DeviceAsk(cpu_milli=6000, memory_mib=1, gpus=0, milli=0))
    assert p is not None and p.node == 1 and p.devices == () and p.milli == 0


def test_scarce_model_is_kept_for_the_asks_that_need_it() -> None:
    only_v100 = DeviceAsk(cpu_milli=4000, memory_mib=8192, gpus=1, milli=1000, models=frozenset({"V100"}))
    mix = typical_mix([A] * 6 + [only_v100] * 4)
    # the V100 node is listed first and fuller: without scarcity it would win the tie-break
    nodes = [node("v0", model="V100"), node("t0", model="T4"), node("t1", model="T4")]
    dc = DeviceCluster(nodes, mix)
    dc.take(used(0, 3, 1000))
    p = dc.decide(DeviceAsk(gpus=1, milli=1000))
    assert p is not None and dc.model[p.node] == "T4"
    q = dc.decide(only_v100)
    assert q is not None and dc.model[q.node] == "V100"
    assert dc.scarcity["V100"] > dc.scarcity["T4"] == 0


def test_scarcity_knob_breaks_a_fragmentation_tie() -> None:
    # mix: A (500 share, any model) and a 2-device gang that only runs on V100, half each.
    # v0 (V100, 4 devices) has a 500 hole: filling it takes the gang's 0.5*500 stranded
    # milli away (delta -250). On t0 (T4, 8 devices) the gang cannot run at all, so all of
    # t0's free milli is its fragment and taking 500 of it is also delta -250: a tie.
    # Best fit alone would fill v0; the scarcity penalty, 1.0 * (0.5 / (4/12)) * 500 =
    # 750 milli on V100, sends the share to the T4.
    gang_v100 = DeviceAsk(gpus=2, models=frozenset({"V100"}))
    mix = (TypicalAsk(A, 0.5), TypicalAsk(gang_v100, 0.5))
    nodes = [node("v0", model="V100"), node("t0", model="T4", devices=8)]
    share = DeviceAsk(gpus=1, milli=500)
    with_scarcity = DeviceCluster(nodes, mix, Knobs(scarcity_weight=1.0))
    without = DeviceCluster(nodes, mix, Knobs(scarcity_weight=0.0))
    for dc in (with_scarcity, without):
        dc.take(used(0, 3, 500))
    assert with_scarcity.scarcity == {"V100": pytest.approx(1.5), "T4": 0.0}
    assert with_scarcity.decide(share).node == 1
    assert without.decide(share).node == 0


def test_tolerance_treats_small_differences_as_ties() -> None:
    # n0 [1000, 1000, 1000, 500]: filling its hole removes B's 0.375*500 -> delta -187.5
    # n1 [1000, 600, 0, 0]: 500 on the 600 leaves A and B 100 stranded each:
    #    (0.625 + 0.375) * 100 - 0.375 * 600 = -125
    # strictly n0 wins; with differences under 1000 milli ignored, best fit packs n1
    def cluster(knobs: Knobs) -> DeviceCluster:
        dc = DeviceCluster([node("n0"), node("n1")], MIX, knobs)
        dc.take(used(0, 3, 500))
        for d, m in ((1, 400), (2, 1000), (3, 1000)):
            dc.take(used(1, d, m))
        return dc

    share = DeviceAsk(gpus=1, milli=500)
    assert cluster(Knobs(tolerance=0)).decide(share).node == 0
    assert cluster(Knobs()).decide(share).node == 0  # default 100: -1.875 and -1.25 still differ
    p = cluster(Knobs(tolerance=1000)).decide(share)
    assert p.node == 1 and p.devices == (1,)


def test_ask_validation() -> None:
    with pytest.raises(ValueError):
        DeviceAsk(gpus=2, milli=500)  # a share is of one device
    with pytest.raises(ValueError):
        DeviceAsk(gpus=1, milli=0)
    with pytest.raises(ValueError):
        DeviceAsk(gpus=1, milli=1001)
    with pytest.raises(ValueError):
        DeviceAsk(cpu_milli=-1)


def test_typical_mix_keeps_the_popular_shapes() -> None:
    asks = [A] * 90 + [B] * 6 + [DeviceAsk(gpus=8)] * 4
    mix = typical_mix(asks, coverage=0.95)
    assert [t.ask for t in mix] == [A, B]
    assert sum(t.weight for t in mix) == pytest.approx(1.0)
    assert mix[0].weight == pytest.approx(90 / 96)
