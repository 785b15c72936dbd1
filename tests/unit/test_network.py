"""The reader's view of the topology (``services.common.network``): records in, links out,
the same figures as the registry's full mesh. No servers."""

from __future__ import annotations

from decimal import Decimal

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.messages import Link, Region
from services.common.network import Network, derive_link
from services.common.subjects import link_key, parse_topology_key, region_key
from services.registry.domain.topology import build_topology, default_records

regions_st = st.lists(
    st.builds(lambda i, lat, lon, cc: Region(id=f"r{i}", name=f"r{i}", country=cc, lat=lat, lon=lon),
              st.integers(0, 40), st.floats(-89, 89), st.floats(-179, 179), st.sampled_from(["US", "DE", "CN"])),
    min_size=1, max_size=25, unique_by=lambda r: r.id)


def published(src: str, dst: str, ms: float) -> Link:
    return Link(src=src, dst=dst, latency_ms=ms, bandwidth_gbps=5, egress_per_gb=Decimal("0.1"), derived=False)


def test_same_links_as_the_full_mesh() -> None:
    base = default_records()
    override = published("us-east", "eu-west", 61.0)
    mesh = build_topology(base.regions, [override])
    net = Network(base.regions, [override])
    assert {(ln.src, ln.dst): ln for ln in mesh.links} == {(ln.src, ln.dst): ln for ln in net.links()}
    assert net.link("eu-west", "us-east") == derive_link(net.regions["eu-west"], net.regions["us-east"])
    assert net.link("us-east", "atlantis") is None and net.rtt_ms("atlantis", "us-east") is None


@settings(max_examples=150, deadline=None)
@given(regions_st, st.floats(0.5, 400), st.data())
def test_within_is_the_brute_force_answer(regions: list[Region], max_ms: float, data: st.DataObject) -> None:
    ids = [r.id for r in regions]
    links = [published(s, d, data.draw(st.floats(0, 500)))
             for s, d in data.draw(st.lists(st.tuples(st.sampled_from(ids + ["gone"]), st.sampled_from(ids)),
                                            max_size=6, unique=True))]
    net = Network(regions, links)
    src = data.draw(st.sampled_from(ids + ["gone"]))
    among = ids + ["gone"]

    def latency(s: str, d: str) -> float:  # what the engine compares: s -> d, else d -> s
        ms = net.rtt_ms(s, d)
        ms = net.rtt_ms(d, s) if ms is None else ms
        return (0.0 if s == d else float("inf")) if ms is None else ms

    assert net.within(src, max_ms, among) == [r for r in among if latency(src, r) <= max_ms]
    for r in among:
        link = net.link(src, r)
        assert net.rtt_ms(src, r) == (None if link is None else link.latency_ms)


def test_records_from_the_bucket() -> None:
    net = Network()
    fra = Region(id="fra", name="Frankfurt", country="DE", lat=50.11, lon=8.68)
    ams = Region(id="ams", name="Amsterdam", country="NL", lat=52.37, lon=4.90)
    for region in (fra, ams):
        assert net.apply(region_key(region.id), msgspec.json.encode(region))
    assert not net.apply(region_key("fra"), msgspec.json.encode(fra))  # unchanged
    derived = net.link("fra", "ams")
    assert derived is not None and derived.derived
    link = published("fra", "ams", 8.5)
    assert net.apply(link_key("fra", "ams"), msgspec.json.encode(link))
    assert net.link("fra", "ams") == link and net.link("ams", "fra").derived  # its own direction only
    assert net.apply(link_key("fra", "ams"), None)
    assert net.link("fra", "ams") == derived
    moved = msgspec.structs.replace(ams, lat=40.0)
    assert net.apply(region_key("ams"), msgspec.json.encode(moved))
    assert net.link("fra", "ams") != derived  # derived links follow the region
    assert not net.apply(region_key("bad"), b"{not json")  # logged and ignored
    assert not net.apply("some.other.key.shape", b"{}")
    assert net.apply(region_key("ams"), None) and "ams" not in net and net.link("fra", "ams") is None
    assert parse_topology_key(link_key("a", "b")) == ("a", "b") and parse_topology_key(region_key("a")) == "a"


def test_within_keeps_regions_exactly_at_the_bound() -> None:
    """On one meridian the great circle is the latitude difference: the tightest case
    for skipping regions by latitude."""
    regions = [Region(id=f"m{i}", name="m", country="US", lat=-80 + i * 0.7, lon=12.5) for i in range(229)]
    net = Network(regions)
    for r in regions:
        ms = net.rtt_ms("m100", r.id)
        assert ms is not None and r.id in net.within("m100", ms, [r.id])
        assert r.id == "m100" or r.id not in net.within("m100", ms - 0.002, [r.id])
