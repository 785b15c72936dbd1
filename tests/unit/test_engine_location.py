"""Pools whose location nobody knows (a catalogue's ``default``/``earth``/empty region) and
pools sold as interruptible only: where the engine may and may not place them, and what it
says when it prunes them. Pure: no servers."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal as D

import msgspec
import pytest

from services.broker.matching import Ask, Engine, PoolState
from services.broker.world import pool_state
from services.common.messages import Pool, Region, Topology
from services.common.network import Network
from services.registry.domain.topology import build_topology, default_topology

from .test_engine import engine, first, pool, reason

TOPO = default_topology()
NOWHERE = Region(id="daytona-unlocated", name="daytona: location unknown", country="ZZ", lat=0.0, lon=0.0,
                 located=False)
WORLD = Topology(regions=(*TOPO.regions, NOWHERE), links=TOPO.links, model=TOPO.model)


def unlocated(pool_id: str, price: str, **kw: object) -> PoolState:
    state = pool(pool_id, "us-east", price, **kw)
    return msgspec.structs.replace(state, region=NOWHERE.id, country=NOWHERE.country)


def test_unconstrained_ask_is_placed_there_and_the_quote_says_the_location_is_unknown() -> None:
    e = engine(unlocated("far", "1"), pool("east", "us-east", "2"), topology=WORLD)
    d = e.match(Ask(units=8))
    assert first(d) == "far"
    assert d.options[0].allocations[0].location == "unknown"
    assert [o.allocations[0].location for o in d.options] == ["unknown", "known"]


@pytest.mark.parametrize(("ask", "check"), [
    (Ask(units=8, users_region="us-east", max_latency_ms=10_000), "latency to users in us-east"),
    (Ask(units=8, countries=frozenset({"US"})), "residency"),
    (Ask(units=8, countries=frozenset({"ZZ"})), "residency"),  # the placeholder is no country
    (Ask(units=8, data_region="us-east", data_gb=100), "distance to data in us-east"),
    (Ask(units=8, data_region="us-east"), "distance to data in us-east"),
])
def test_location_constraints_prune_it_and_say_why(ask: Ask, check: str) -> None:
    e = engine(unlocated("far", "1"), topology=WORLD)
    d = e.match(ask)
    assert reason(d) == f"location of pool far unknown (region ['daytona-unlocated']): cannot check {check}"
    assert d.never
    # with a located pool beside it, that one is placed: the unknown one is never "near"
    e.upsert(pool("east", "us-east", "2"))
    placed = [[a.pool_id for a in o.allocations] for o in e.match(ask).options]
    assert placed == ([] if "ZZ" in ask.countries else [["east"]])


def test_its_own_region_is_not_distance_zero() -> None:
    """Users or data "in" the unlocated region are nowhere in particular: its pools are
    not 0 ms or 0 km from them."""
    e = engine(unlocated("far", "1"), topology=WORLD)
    for ask in (Ask(units=8, users_region=NOWHERE.id, max_latency_ms=1),
                Ask(units=8, data_region=NOWHERE.id, data_gb=10)):
        d = e.match(ask)
        assert not d.placed and "location of pool far unknown" in reason(d)


def test_pruned_unlocated_pools_are_named_beside_the_constraint_that_failed() -> None:
    e = engine(unlocated("far", "1"), pool("west", "us-west", "2"), topology=WORLD)
    d = e.match(Ask(units=8, users_region="us-east", max_latency_ms=30))
    assert reason(d) == ("no pool within 30 ms of users in us-east (nearest: us-west at 53.5 ms) | "
                         "location of pool far unknown (region ['daytona-unlocated']): cannot check latency "
                         "to users in us-east (not considered)")


def test_network_gives_no_link_to_or_from_it() -> None:
    net = Network(WORLD.regions)
    assert net.link(NOWHERE.id, NOWHERE.id) is None and net.link("us-east", NOWHERE.id) is None
    assert net.rtt_ms(NOWHERE.id, "us-east") is None and net.rtt_ms(NOWHERE.id, NOWHERE.id) is None
    assert net.within("us-east", 1e9, [NOWHERE.id, "us-east"]) == ["us-east"]
    assert net.within(NOWHERE.id, 1e9, [NOWHERE.id, "us-east"]) == []
    assert not any(NOWHERE.id in (ln.src, ln.dst) for ln in net.links())
    mesh = build_topology((*TOPO.regions[:3], NOWHERE))
    assert len(mesh.links) == 9 and not any(NOWHERE.id in (ln.src, ln.dst) for ln in mesh.links)


# --- sold as interruptible only ----------------------------------------------------------
def _spot_only_pool() -> PoolState:
    """A registered pool whose prices give no on-demand price (Verda's spot-only offer), as
    it crosses the wire: decoded, then turned into the engine's view."""
    record = {
        "pool_id": "verda-spot", "provider": "verda", "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
        "spec": {"region": "eu-west", "model": "nvidia-h100-sxm-80gb", "units": 8, "availability": "listed",
                 "prices": {"interruptible": "1.5"}},
        "accelerator": {"model": "nvidia-h100-sxm-80gb", "vendor": "nvidia", "name": "H100", "memory_gib": 80,
                        "memory_bandwidth_gbs": 3350, "bf16_tflops": 989.4, "fp16_tflops": 989.4,
                        "interconnect": "nvlink4", "interconnect_gbs": 900, "stack": "cuda"},
    }
    decoded = msgspec.json.decode(msgspec.json.encode(record), type=Pool)
    assert decoded.created_at == datetime(2026, 1, 1, tzinfo=UTC)
    return pool_state(decoded, "IE", free=8)


def test_spot_only_pool_takes_interruptible_asks_only() -> None:
    e = Engine(TOPO)
    e.upsert(_spot_only_pool())
    d = e.match(Ask(units=8, billing="interruptible"))
    assert first(d) == "verda-spot" and d.options[0].allocations[0].unit_price == D("1.5")
    for billing in ("on_demand", "reserved_month", "reserved_year"):
        d = e.match(Ask(units=8, billing=billing))
        assert reason(d) == f"no pool offers {billing} (they offer ['interruptible'])", billing
        assert d.never
