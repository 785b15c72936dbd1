"""The topology: packaged regions, the distance model, loading and lookups. No servers."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from importlib import resources
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.ids import is_valid_id
from services.common.messages import Link, Region, Topology
from services.registry.domain import topology as topo
from services.registry.domain.topology import (
    EGRESS_CN_CROSS_BORDER,
    EGRESS_CROSS_BORDER,
    EGRESS_DOMESTIC,
    FIXED_RTT_MS,
    MODEL,
    SAME_REGION_RTT_MS,
    TopologyError,
    TopologyIndex,
    add_region,
    build_topology,
    default_index,
    default_topology,
    derive_link,
    haversine_km,
    load_topology,
)

HUBS = {"cn-jjj", "cn-yrd", "cn-gba", "cn-cy", "cn-nmg", "cn-gz", "cn-gs", "cn-nx"}
INTERNATIONAL = {"us-east", "us-west", "eu-central", "eu-west", "ap-southeast",
                 "ap-northeast", "ap-east", "ap-south", "au-east", "me-central", "sa-east"}
REPO = Path(__file__).resolve().parents[2]


def _packaged() -> dict:
    text = resources.files("services.registry.domain").joinpath("regions.json").read_text()
    return json.loads(text)


def _region(rid: str, lat: float, lon: float, country: str = "XX") -> Region:
    return Region(id=rid, name=rid, country=country, lat=lat, lon=lon)


# --- the packaged default ---------------------------------------------------------------
def test_default_has_the_eight_national_hubs() -> None:
    hubs = {r.id: r for r in default_topology().regions if r.kind == "hub"}
    assert set(hubs) == HUBS
    assert all(r.country == "CN" for r in hubs.values())


def test_default_has_international_cloud_regions() -> None:
    clouds = {r.id: r for r in default_topology().regions if r.kind == "cloud"}
    assert len(clouds) >= 8
    assert INTERNATIONAL <= set(clouds)
    assert all(r.country != "CN" for r in clouds.values())
    assert len({r.country for r in clouds.values()}) >= 8


def test_default_regions_are_well_formed() -> None:
    regions = default_topology().regions
    ids = [r.id for r in regions]
    assert len(ids) == len(set(ids))
    for r in regions:
        assert is_valid_id(r.id), r.id
        assert len(r.country) == 2 and r.country.isupper(), r
        assert -90 <= r.lat <= 90 and -180 <= r.lon <= 180, r
        assert r.name


def test_packaged_regions_carry_only_region_fields() -> None:
    data = _packaged()
    assert set(data) == {"model", "regions", "links"}
    allowed = set(Region.__struct_fields__)
    for entry in data["regions"]:
        assert set(entry) <= allowed, entry
    assert data["model"] == MODEL


def test_hub_coordinates_are_in_china_and_clouds_where_named() -> None:
    ix = default_index()
    for hub in HUBS:  # mainland China bounding box
        r = ix.region(hub)
        assert 18 <= r.lat <= 54 and 73 <= r.lon <= 135, r
    assert ix.region("us-east").lon < -60 and ix.region("us-west").lon < -110
    assert ix.region("sa-east").lat < 0 and ix.region("au-east").lat < 0
    assert ix.region("ap-southeast").lat == pytest.approx(1.35, abs=0.5)


def test_default_is_cached_and_names_its_model() -> None:
    assert default_topology() is default_topology()
    assert default_index() is default_index()
    assert default_topology().model == MODEL


def test_every_ordered_pair_has_exactly_one_link() -> None:
    t = default_topology()
    ids = [r.id for r in t.regions]
    pairs = [(ln.src, ln.dst) for ln in t.links]
    assert len(pairs) == len(set(pairs)) == len(ids) ** 2
    assert set(pairs) == {(a, b) for a in ids for b in ids}


def test_latency_symmetric_positive_and_self_is_smallest() -> None:
    ix = default_index()
    ids = ix.ids
    for a in ids:
        own = ix.link(a, a).latency_ms
        assert 0 < own < 1
        for b in ids:
            ab, ba = ix.link(a, b), ix.link(b, a)
            assert ab.latency_ms == ba.latency_ms, (a, b)
            assert ab.latency_ms > 0
            if a != b:
                assert ab.latency_ms > own
                assert ab.latency_ms >= FIXED_RTT_MS


@pytest.mark.parametrize(("a", "b", "low", "high"), [
    ("cn-jjj", "cn-yrd", 15, 45),          # Beijing area - Shanghai area
    ("eu-central", "ap-southeast", 120, 250),  # Frankfurt - Singapore
    ("us-east", "us-west", 50, 90),        # N. Virginia - Oregon
    ("cn-jjj", "cn-nmg", 2, 10),           # Zhangjiakou - Horinger, ~260 km
    ("eu-central", "eu-west", 15, 40),     # Frankfurt - Dublin
    ("us-east", "eu-west", 60, 110),       # transatlantic
])
def test_plausible_round_trip_times(a: str, b: str, low: float, high: float) -> None:
    rtt = default_index().link(a, b).latency_ms
    assert low <= rtt <= high, (a, b, rtt)


def test_rtt_follows_the_documented_formula() -> None:
    ix = default_index()
    a, b = ix.region("eu-central"), ix.region("ap-southeast")
    d = haversine_km(a.lat, a.lon, b.lat, b.lon)
    expected = 2 * d * 1.5 / 204.19 + 2.0
    assert ix.link(a.id, b.id).latency_ms == pytest.approx(expected, abs=0.01)


def test_egress_zero_in_region_and_cross_border_dearer_than_domestic() -> None:
    ix = default_index()
    for a in ix.ids:
        assert ix.link(a, a).egress_per_gb == 0
        for b in ix.ids:
            link = ix.link(a, b)
            assert isinstance(link.egress_per_gb, Decimal)
            assert link.currency == "USD"
            if a != b:
                assert link.egress_per_gb > 0
    domestic = ix.link("cn-jjj", "cn-yrd").egress_per_gb
    us_domestic = ix.link("us-east", "us-west").egress_per_gb
    abroad = ix.link("eu-central", "ap-southeast").egress_per_gb
    out_of_cn = ix.link("cn-gba", "ap-east").egress_per_gb
    into_cn = ix.link("ap-east", "cn-gba").egress_per_gb
    assert domestic == us_domestic == EGRESS_DOMESTIC
    assert abroad == EGRESS_CROSS_BORDER > domestic
    assert out_of_cn == into_cn == EGRESS_CN_CROSS_BORDER > abroad


def test_bandwidth_tiers() -> None:
    ix = default_index()
    self_bw = ix.link("cn-gz", "cn-gz").bandwidth_gbps
    between_hubs = ix.link("cn-gz", "cn-nx").bandwidth_gbps
    near_abroad = ix.link("eu-central", "eu-west").bandwidth_gbps
    intercontinental = ix.link("eu-central", "us-east").bandwidth_gbps
    cn_border = ix.link("cn-gba", "ap-east").bandwidth_gbps
    assert self_bw > between_hubs > near_abroad > intercontinental > 0
    assert between_hubs == 100
    assert cn_border == intercontinental  # short but across the mainland border


def test_default_links_are_all_derived_unless_published() -> None:
    published = {(ln["src"], ln["dst"]) for ln in _packaged()["links"]}
    for link in default_topology().links:
        assert link.derived is ((link.src, link.dst) not in published)


# --- distance ---------------------------------------------------------------------------
@pytest.mark.parametrize(("p", "q", "km"), [
    ((0.0, 0.0), (90.0, 0.0), math.pi / 2 * 6371.0088),
    ((0.0, 0.0), (0.0, 180.0), math.pi * 6371.0088),
    ((51.5074, -0.1278), (40.7128, -74.0060), 5570.0),  # London - New York
    ((10.0, 20.0), (10.0, 20.0), 0.0),
])
def test_haversine_known_distances(p: tuple[float, float], q: tuple[float, float],
                                   km: float) -> None:
    assert haversine_km(*p, *q) == pytest.approx(km, rel=0.005, abs=0.001)


def test_same_region_link() -> None:
    r = _region("x", 10, 10)
    link = derive_link(r, r)
    assert link.latency_ms == SAME_REGION_RTT_MS
    assert link.egress_per_gb == 0 and link.derived
    other = derive_link(r, _region("y", 10, 10))  # same place and country, other region
    assert other.latency_ms == FIXED_RTT_MS and other.egress_per_gb == EGRESS_DOMESTIC
    abroad = derive_link(r, _region("z", 10, 10, "YY"))
    assert abroad.egress_per_gb == EGRESS_CROSS_BORDER


# --- properties -------------------------------------------------------------------------
lats = st.floats(min_value=-90, max_value=90, allow_nan=False)
lons = st.floats(min_value=-180, max_value=180, allow_nan=False)
countries = st.sampled_from(["CN", "US", "DE", "HK", "SG"])


@settings(max_examples=300, deadline=None)
@given(lats, lons, lats, lons, countries, countries)
def test_derived_link_is_symmetric(lat1: float, lon1: float, lat2: float, lon2: float,
                                   c1: str, c2: str) -> None:
    a, b = _region("a", lat1, lon1, c1), _region("b", lat2, lon2, c2)
    ab, ba = derive_link(a, b), derive_link(b, a)
    assert (ab.src, ab.dst) == ("a", "b") and (ba.src, ba.dst) == ("b", "a")
    assert ab.latency_ms == ba.latency_ms
    assert ab.bandwidth_gbps == ba.bandwidth_gbps
    assert ab.egress_per_gb == ba.egress_per_gb
    assert FIXED_RTT_MS <= ab.latency_ms <= 2 * math.pi * 6371.0088 * 1.5 / 204.19 + 3


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0, max_value=180), st.floats(min_value=0, max_value=180),
       st.floats(min_value=-60, max_value=60))
def test_latency_monotone_along_the_equator(x1: float, x2: float, lon0: float) -> None:
    # points on the equator east of lon0: distance grows with the angle, independently
    # of the module's haversine
    near, far = sorted((x1, x2))
    origin = _region("o", 0.0, lon0)
    def east(deg: float, rid: str) -> Region:
        lon = lon0 + deg
        return _region(rid, 0.0, lon - 360 if lon > 180 else lon)
    assert derive_link(origin, east(near, "n")).latency_ms <= \
        derive_link(origin, east(far, "f")).latency_ms
    if far - near > 1:  # about 111 km: strictly longer
        assert derive_link(origin, east(near, "n")).latency_ms < \
            derive_link(origin, east(far, "f")).latency_ms


@settings(max_examples=300, deadline=None)
@given(lats, lons, lats, lons, lats, lons)
def test_latency_monotone_in_distance(la: float, oa: float, lb: float, ob: float,
                                      lc: float, oc: float) -> None:
    a, b, c = _region("a", la, oa), _region("b", lb, ob), _region("c", lc, oc)
    db, dc = haversine_km(la, oa, lb, ob), haversine_km(la, oa, lc, oc)
    if db <= dc:
        assert derive_link(a, b).latency_ms <= derive_link(a, c).latency_ms
    else:
        assert derive_link(a, b).latency_ms >= derive_link(a, c).latency_ms


# --- building with overrides ------------------------------------------------------------
def _pub(src: str, dst: str, latency: float = 7.0, bw: float = 55.0,
         egress: str = "0.011") -> Link:
    return Link(src=src, dst=dst, latency_ms=latency, bandwidth_gbps=bw,
                egress_per_gb=Decimal(egress))


def test_build_topology_uses_overrides_for_their_direction_only() -> None:
    a, b = _region("a", 0, 0, "US"), _region("b", 0, 10, "US")
    t = build_topology([a, b], [_pub("a", "b")])
    ix = TopologyIndex(t)
    ab = ix.link("a", "b")
    assert (ab.latency_ms, ab.bandwidth_gbps, ab.egress_per_gb) == (7.0, 55.0, Decimal("0.011"))
    assert ab.derived is False  # even though Link defaults to derived=True
    assert ix.link("b", "a") == derive_link(b, a)
    assert len(t.links) == 4


@pytest.mark.parametrize(("regions", "links", "message"), [
    ([("a", 0, 0), ("a", 1, 1)], [], "duplicate region id 'a'"),
    ([("a", 0, 0)], [("a", "zz")], "unknown region 'zz'"),
    ([("a", 0, 0)], [("a", "a", -1.0)], "latency_ms"),
    ([("a", 0, 0)], [("a", "a", 1.0, 0.0)], "bandwidth_gbps"),
    ([("a", 0, 0)], [("a", "a", 1.0, 1.0, "-0.01")], "egress_per_gb"),
    ([("a", 0, 0)], [("a", "a"), ("a", "a")], "listed twice"),
    ([("a", 95, 0)], [], "lat"),
    ([("Bad Id", 0, 0)], [], "not a valid id"),
])
def test_build_topology_rejects_invalid_input(regions: list, links: list, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        build_topology([_region(*r) for r in regions], [_pub(*ln) for ln in links])


def test_topology_error_is_a_value_error() -> None:
    assert issubclass(TopologyError, ValueError)


# --- operators' files -------------------------------------------------------------------
def _write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "topology.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


VALID = {
    "model": "my provider's measurements",
    "regions": [
        {"id": "fra-1", "name": "Frankfurt", "country": "DE", "lat": 50.11, "lon": 8.68},
        {"id": "ams-1", "name": "Amsterdam", "country": "NL", "lat": 52.37, "lon": 4.90,
         "kind": "edge"},
        {"id": "sin-1", "name": "Singapore", "country": "SG", "lat": 1.35, "lon": 103.82},
    ],
    "links": [
        {"src": "fra-1", "dst": "ams-1", "latency_ms": 8.5, "bandwidth_gbps": 200,
         "egress_per_gb": "0.005"},
    ],
}


def test_load_topology_valid_file(tmp_path: Path) -> None:
    t = load_topology(_write(tmp_path, VALID))
    assert isinstance(t, Topology)
    assert [r.id for r in t.regions] == ["fra-1", "ams-1", "sin-1"]
    assert t.regions[1].kind == "edge" and t.regions[0].kind == "cloud"
    assert len(t.links) == 9
    ix = TopologyIndex(t)
    published = ix.link("fra-1", "ams-1")
    assert published.derived is False
    assert (published.latency_ms, published.egress_per_gb) == (8.5, Decimal("0.005"))
    derived = ix.link("ams-1", "sin-1")
    assert derived.derived is True and derived.latency_ms > 100
    assert t.model == MODEL


def test_load_topology_links_are_optional(tmp_path: Path) -> None:
    doc = {"regions": VALID["regions"][:2]}
    t = load_topology(str(_write(tmp_path, doc)))
    assert len(t.links) == 4 and all(ln.derived for ln in t.links)


def _variant(**changes: object) -> dict:
    doc = json.loads(json.dumps(VALID))
    for key, value in changes.items():
        section, index, field = key.split("__")
        doc[section][int(index)][field] = value
    return doc


@pytest.mark.parametrize(("doc", "message"), [
    (_variant(links__0__dst="nowhere"), "unknown region 'nowhere'"),
    (_variant(regions__1__id="fra-1"), "duplicate region id 'fra-1'"),
    (_variant(links__0__latency_ms=-3), "latency_ms must be a finite number >= 0"),
    (_variant(links__0__bandwidth_gbps=-1), "bandwidth_gbps"),
    (_variant(links__0__egress_per_gb="-0.5"), "egress_per_gb"),
    (_variant(regions__0__lon=200), "lon"),
    (_variant(regions__0__country="de"), "country"),
    (_variant(regions__0__id="FRA"), "id"),
    ({**VALID, "regoins": []}, "regoins"),
    ({"regions": []}, "no regions"),
    ("{not json", "topology.json"),
])
def test_load_topology_rejects_bad_files(tmp_path: Path, doc: object, message: str) -> None:
    with pytest.raises(TopologyError, match=message) as info:
        load_topology(_write(tmp_path, doc))
    assert "topology.json" in str(info.value)


def test_load_topology_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "absent.json")


# --- the index --------------------------------------------------------------------------
def test_index_lookups() -> None:
    t = default_topology()
    ix = TopologyIndex(t)
    for link in t.links[:50]:
        assert ix.link(link.src, link.dst) is link
    assert ix.region("cn-nx").name.startswith("Ningxia")
    assert set(ix.regions_in_country("CN")) == HUBS
    assert ix.regions_in_country("US") == ("us-east", "us-west")
    assert ix.regions_in_country("ZZ") == ()
    assert "eu-central" in ix and "nowhere" not in ix
    assert len(ix) == len(t.regions)
    with pytest.raises(KeyError, match="nowhere"):
        ix.region("nowhere")
    with pytest.raises(KeyError, match="nowhere"):
        ix.link("eu-central", "nowhere")


def test_index_derives_pairs_missing_from_a_hand_built_topology() -> None:
    a, b = _region("a", 0, 0), _region("b", 0, 1)
    ix = TopologyIndex(Topology(regions=(a, b), links=()))
    assert ix.link("a", "b") == derive_link(a, b)
    assert ix.link("a", "b") is ix.link("a", "b")


# --- adding a region --------------------------------------------------------------------
def test_add_region_links_it_both_ways() -> None:
    base = default_topology()
    new = Region(id="cn-hk-edge", name="Shenzhen edge", country="CN", lat=22.54, lon=114.06,
                 kind="edge")
    grown = add_region(base, new)
    assert grown is not base and base.regions[-1].id != "cn-hk-edge"
    assert len(grown.regions) == len(base.regions) + 1
    assert len(grown.links) == len(grown.regions) ** 2
    ix = TopologyIndex(grown)
    assert ix.link("cn-hk-edge", "cn-hk-edge").latency_ms == SAME_REGION_RTT_MS
    to_gba = ix.link("cn-hk-edge", "cn-gba")
    assert to_gba.derived and to_gba.latency_ms < 10 and to_gba.egress_per_gb == EGRESS_DOMESTIC
    assert ix.link("ap-east", "cn-hk-edge").egress_per_gb == EGRESS_CN_CROSS_BORDER
    assert set(base.links) <= set(grown.links)
    assert "cn-hk-edge" in ix.regions_in_country("CN")


def test_add_region_keeps_published_links_and_is_idempotent() -> None:
    a, b = _region("a", 0, 0), _region("b", 0, 1)
    t = build_topology([a, b], [_pub("a", "b")])
    c = _region("c", 5, 5)
    grown = add_region(t, c)
    assert TopologyIndex(grown).link("a", "b").derived is False
    assert add_region(grown, c) is grown
    with pytest.raises(TopologyError, match="already exists"):
        add_region(grown, _region("c", 6, 6))
    with pytest.raises(TopologyError, match="lat"):
        add_region(grown, _region("d", -91, 0))


# --- docs -------------------------------------------------------------------------------
def test_docs_list_every_default_region() -> None:
    text = (REPO / "docs" / "topology.md").read_text()
    for r in default_topology().regions:
        assert f"`{r.id}`" in text, r.id


def test_topology_round_trips_through_json() -> None:
    t = default_topology()
    again = msgspec.json.decode(msgspec.json.encode(t), type=Topology)
    assert again == t
    assert topo.TopologyFile.__struct_config__.forbid_unknown_fields
