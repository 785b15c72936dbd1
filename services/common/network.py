"""The network between regions, as every service reads it.

Part of the contract, not of one service: the registry stores regions (coordinates,
country) and the links someone *published*; every other pair's link is defined by the
model below and computed by whoever reads it. A stored mesh would be n² links (25
million at 5,000 regions), so no service ever stores or sends one (``docs/topology.md``,
"Storage and scale"). Registry and broker must derive the same figure for the same
pair, hence one copy of the model, here.

* ``latency_ms`` is the **round-trip time (RTT)** in milliseconds:
  ``RTT = 2 × distance_km × ROUTE_FACTOR / FIBRE_KM_PER_MS + FIXED_RTT_MS``; a link to
  the same region is ``SAME_REGION_RTT_MS``.
* ``bandwidth_gbps`` and ``egress_per_gb`` (USD, Decimal) by tier: same region, same
  country, nearby cross-border, far or mainland-China cross-border.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from decimal import Decimal

import msgspec

from .messages import Link, Region
from .subjects import parse_topology_key

log = logging.getLogger(__name__)
_region = msgspec.json.Decoder(Region)
_link = msgspec.json.Decoder(Link)

# --- the derivation model's constants (sources in docs/topology.md) -------------------
EARTH_RADIUS_KM = 6371.0088          # IUGG mean Earth radius
FIBRE_KM_PER_MS = 204.19             # c / 1.4682 (group index of standard SMF at 1550 nm)
ROUTE_FACTOR = 1.5                   # fibre path length / great-circle distance
FIXED_RTT_MS = 2.0                   # per round trip: metro access, switching at both ends
SAME_REGION_RTT_MS = 0.5             # within one region / campus
NEAR_KM = 3000.0                     # cross-border links up to this distance count as "near"

BW_SAME_REGION_GBPS = 400.0
BW_DOMESTIC_GBPS = 100.0
BW_CROSS_BORDER_NEAR_GBPS = 40.0
BW_CROSS_BORDER_FAR_GBPS = 10.0      # also any link crossing the mainland-China border

EGRESS_SAME_REGION = Decimal("0")
EGRESS_DOMESTIC = Decimal("0.02")        # AWS inter-region list price (US/EU regions)
EGRESS_CROSS_BORDER = Decimal("0.09")    # AWS internet egress, first paid tier (us-east-1)
EGRESS_CN_CROSS_BORDER = Decimal("0.15")  # assumption: licensed cross-border circuits
CN_BORDER_COUNTRY = "CN"                 # mainland China; HK and MO are their own codes
CURRENCY = "USD"

MODEL = (
    "great-circle-fibre/v1: RTT ms = 2 * d_km * 1.5 / 204.19 km/ms + 2.0 (same region 0.5); "
    "bandwidth Gbit/s 400 same region, 100 same country, 40 cross-border <= 3000 km, "
    "10 farther or to/from CN; egress USD/GB 0 same region, 0.02 same country, "
    "0.09 cross-border, 0.15 cross-border to/from CN"
)

DERIVED_CACHE_MAX = 100_000  # derived links remembered per reader (a few MB); then forgotten


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km on a sphere of the mean Earth radius.

    The two points are put in a canonical order first so that the result is bit-for-bit
    the same whichever way round they are given.
    """
    (lat1, lon1), (lat2, lon2) = sorted(((lat1, lon1), (lat2, lon2)))
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    h = min(1.0, max(0.0, h))
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(h))


def great_circle_km(a: Region, b: Region) -> float:
    return haversine_km(a.lat, a.lon, b.lat, b.lon)


def _rtt_ms(distance_km: float) -> float:
    return round(2 * distance_km * ROUTE_FACTOR / FIBRE_KM_PER_MS + FIXED_RTT_MS, 3)


def derive_link(a: Region, b: Region) -> Link:
    """The modelled link ``a -> b`` (``derived=True``). ``latency_ms`` is an RTT."""
    if a.id == b.id:
        return Link(src=a.id, dst=b.id, latency_ms=SAME_REGION_RTT_MS,
                    bandwidth_gbps=BW_SAME_REGION_GBPS, egress_per_gb=EGRESS_SAME_REGION,
                    currency=CURRENCY, derived=True)
    distance = great_circle_km(a, b)
    if a.country == b.country:
        bandwidth, egress = BW_DOMESTIC_GBPS, EGRESS_DOMESTIC
    elif CN_BORDER_COUNTRY in (a.country, b.country):
        bandwidth, egress = BW_CROSS_BORDER_FAR_GBPS, EGRESS_CN_CROSS_BORDER
    elif distance <= NEAR_KM:
        bandwidth, egress = BW_CROSS_BORDER_NEAR_GBPS, EGRESS_CROSS_BORDER
    else:
        bandwidth, egress = BW_CROSS_BORDER_FAR_GBPS, EGRESS_CROSS_BORDER
    return Link(src=a.id, dst=b.id, latency_ms=_rtt_ms(distance), bandwidth_gbps=bandwidth,
                egress_per_gb=egress, currency=CURRENCY, derived=True)


class Network:
    """Regions by id and published links by pair; every other pair of known regions is
    derived on first use (and remembered, up to ``DERIVED_CACHE_MAX`` pairs).

    Built from a few stored records instead of a mesh, so a reader follows changes one
    region or one link at a time. ``link`` is None only when a region is unknown.
    """

    __slots__ = ("_derived", "_published", "countries", "regions")

    def __init__(self, regions: Iterable[Region] = (), links: Iterable[Link] = ()) -> None:
        self.regions: dict[str, Region] = {}
        self.countries: dict[str, str] = {}  # region id -> ISO country code
        self._published: dict[tuple[str, str], Link] = {}
        self._derived: dict[tuple[str, str], Link] = {}
        for region in regions:
            self.put_region(region)
        for link in links:
            self.put_link(link)

    # --- changes -----------------------------------------------------------------------
    def put_region(self, region: Region) -> bool:
        """Add or replace a region; False if it was there unchanged."""
        if self.regions.get(region.id) == region:
            return False
        if region.id in self.regions:
            self._derived.clear()  # it moved: every derived link to or from it changed
        self.regions[region.id] = region
        self.countries[region.id] = region.country
        return True

    def drop_region(self, region_id: str) -> bool:
        if self.regions.pop(region_id, None) is None:
            return False
        del self.countries[region_id]
        self._derived.clear()
        return True

    def put_link(self, link: Link) -> bool:
        """A published link: it replaces the derived one for its own direction only."""
        if self._published.get((link.src, link.dst)) == link:
            return False
        self._published[(link.src, link.dst)] = link
        return True

    def drop_link(self, src: str, dst: str) -> bool:
        return self._published.pop((src, dst), None) is not None

    def apply(self, key: str, value: bytes | None) -> bool:
        """One record of the topology bucket (``subjects.region_key``/``link_key``; value
        None: deleted). An unreadable record is logged and ignored. True if it changed
        anything."""
        what = parse_topology_key(key)
        try:
            if isinstance(what, str):
                if value is None:
                    return self.drop_region(what)
                return self.put_region(_region.decode(value))
            if what is not None:
                if value is None:
                    return self.drop_link(*what)
                return self.put_link(_link.decode(value))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("topology record %r is unreadable (%s): ignored", key, exc)
        return False

    # --- reads -------------------------------------------------------------------------
    def link(self, src: str, dst: str) -> Link | None:
        pair = (src, dst)
        found = self._published.get(pair) or self._derived.get(pair)
        if found is not None:
            return found
        a, b = self.regions.get(src), self.regions.get(dst)
        if a is None or b is None:
            return None
        if len(self._derived) >= DERIVED_CACHE_MAX:
            self._derived.clear()
        link = self._derived[pair] = derive_link(a, b)
        return link

    def rtt_ms(self, src: str, dst: str) -> float | None:
        """``link(src, dst).latency_ms``, without building (or remembering) a link."""
        link = self._published.get((src, dst)) or self._derived.get((src, dst))
        if link is not None:
            return link.latency_ms
        a, b = self.regions.get(src), self.regions.get(dst)
        if a is None or b is None:
            return None
        return SAME_REGION_RTT_MS if src == dst else _rtt_ms(great_circle_km(a, b))

    def within(self, src: str, max_ms: float, among: Iterable[str]) -> list[str]:
        """Those of ``among`` at most ``max_ms`` RTT from ``src``; where ``src -> r`` has
        no link (an unknown region), a published ``r -> src`` counts. A derived link is
        only computed for regions whose latitude alone does not rule them out (the
        meridian arc bounds the great circle from below), so the cost follows the
        regions near ``src``, not all of them."""
        a = self.regions.get(src)
        max_km = (max_ms - FIXED_RTT_MS) * FIBRE_KM_PER_MS / (2 * ROUTE_FACTOR) + 1.0  # 1 km: rounding
        band = math.degrees(max_km / EARTH_RADIUS_KM)
        out = []
        for r in among:
            link = self._published.get((src, r))
            if link is not None:
                ms: float | None = link.latency_ms
            elif a is not None and (b := self.regions.get(r)) is not None:
                if r != src and abs(b.lat - a.lat) > band:
                    continue
                ms = self.rtt_ms(src, r)
            else:
                back = self._published.get((r, src))
                ms = back.latency_ms if back is not None else (0.0 if r == src else None)
            if ms is not None and ms <= max_ms:
                out.append(r)
        return out

    def links(self, src: str | None = None, dst: str | None = None) -> Iterator[Link]:
        """Every link from ``src`` and/or to ``dst`` (all n² when neither is given)."""
        for s in [src] if src is not None else list(self.regions):
            for d in [dst] if dst is not None else list(self.regions):
                link = self.link(s, d)
                if link is not None:
                    yield link

    @property
    def published(self) -> dict[tuple[str, str], Link]:
        return self._published

    def __contains__(self, region_id: object) -> bool:
        return region_id in self.regions

    def __len__(self) -> int:
        return len(self.regions)
