"""The network topology: regions and the directed links between them.

Pure code: no I/O beyond reading a topology file, no clock, no servers. The default
topology is packaged as ``regions.json`` next to this module; operators can load their
own file of the same shape.

Every ordered pair of regions (self-pairs included) has a :class:`Link`. Links that
nobody published are *derived* from the great-circle distance by the model in
``services.common.network`` (every reader derives the same figure; see
``docs/topology.md``). At scale nothing here builds the mesh: :func:`load_records`
validates a file's regions and published links, and the registry stores just those.
:func:`build_topology` (the full n² mesh) remains for small worlds and tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from decimal import Decimal
from functools import cache
from importlib import resources
from pathlib import Path

import msgspec

from services.common.ids import is_valid_id
from services.common.messages import Link, Region, Topology
from services.common.network import (  # noqa: F401  (the model lives in the contract; re-exported)
    BW_CROSS_BORDER_FAR_GBPS,
    BW_CROSS_BORDER_NEAR_GBPS,
    BW_DOMESTIC_GBPS,
    BW_SAME_REGION_GBPS,
    CN_BORDER_COUNTRY,
    CURRENCY,
    EARTH_RADIUS_KM,
    EGRESS_CN_CROSS_BORDER,
    EGRESS_CROSS_BORDER,
    EGRESS_DOMESTIC,
    EGRESS_SAME_REGION,
    FIBRE_KM_PER_MS,
    FIXED_RTT_MS,
    MODEL,
    NEAR_KM,
    ROUTE_FACTOR,
    SAME_REGION_RTT_MS,
    derive_link,
    great_circle_km,
    haversine_km,
)

__all__ = [
    "BW_CROSS_BORDER_FAR_GBPS", "BW_CROSS_BORDER_NEAR_GBPS", "BW_DOMESTIC_GBPS",
    "BW_SAME_REGION_GBPS", "CN_BORDER_COUNTRY", "EARTH_RADIUS_KM", "EGRESS_CN_CROSS_BORDER",
    "EGRESS_CROSS_BORDER", "EGRESS_DOMESTIC", "EGRESS_SAME_REGION", "FIBRE_KM_PER_MS",
    "FIXED_RTT_MS", "MODEL", "NEAR_KM", "ROUTE_FACTOR", "SAME_REGION_RTT_MS", "TopologyError",
    "TopologyFile", "TopologyIndex", "add_region", "check_region", "build_topology", "default_index",
    "default_records", "default_topology", "derive_link", "great_circle_km", "haversine_km",
    "load_records", "load_topology", "parse_records", "parse_topology",
]

_COUNTRY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class TopologyError(ValueError):
    """A topology (file, overrides or new region) is invalid; the message says why."""


class TopologyFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The on-disk shape of a topology: ``regions.json`` and operators' own files.

    ``model`` is an informational label; the loaded topology's ``model`` always names
    the derivation model used for the pairs the file does not list.
    """

    model: str = ""
    regions: tuple[Region, ...]
    links: tuple[Link, ...] = ()


# --- validation --------------------------------------------------------------------------
def check_region(region: Region) -> None:
    if not is_valid_id(region.id):
        raise TopologyError(f"region id {region.id!r} is not a valid id "
                            "(lower-case a-z 0-9 _ -, at most 63 characters)")
    if len(region.country) != 2 or not set(region.country) <= _COUNTRY_CHARS:
        raise TopologyError(f"region {region.id!r}: country {region.country!r} is not an "
                            "ISO 3166-1 alpha-2 code")
    if not (math.isfinite(region.lat) and -90.0 <= region.lat <= 90.0):
        raise TopologyError(f"region {region.id!r}: lat {region.lat!r} is not in [-90, 90]")
    if not (math.isfinite(region.lon) and -180.0 <= region.lon <= 180.0):
        raise TopologyError(f"region {region.id!r}: lon {region.lon!r} is not in [-180, 180]")
    if region.kind not in ("hub", "cloud", "edge"):
        raise TopologyError(f"region {region.id!r}: kind {region.kind!r} is not "
                            "one of hub, cloud, edge")


def _check_regions(regions: Iterable[Region]) -> dict[str, Region]:
    by_id: dict[str, Region] = {}
    for region in regions:
        check_region(region)
        if region.id in by_id:
            raise TopologyError(f"duplicate region id {region.id!r}")
        by_id[region.id] = region
    return by_id


def _check_link(link: Link, by_id: dict[str, Region]) -> None:
    where = f"link {link.src!r} -> {link.dst!r}"
    for end in (link.src, link.dst):
        if end not in by_id:
            raise TopologyError(f"{where} references unknown region {end!r}")
    if not (isinstance(link.latency_ms, (int, float)) and math.isfinite(link.latency_ms)
            and link.latency_ms >= 0):
        raise TopologyError(f"{where}: latency_ms must be a finite number >= 0, "
                            f"got {link.latency_ms!r}")
    if not (isinstance(link.bandwidth_gbps, (int, float)) and math.isfinite(link.bandwidth_gbps)
            and link.bandwidth_gbps > 0):
        raise TopologyError(f"{where}: bandwidth_gbps must be a finite number > 0, "
                            f"got {link.bandwidth_gbps!r}")
    egress = link.egress_per_gb
    if not (isinstance(egress, Decimal) and egress.is_finite() and egress >= 0):
        raise TopologyError(f"{where}: egress_per_gb must be a decimal >= 0, got {egress!r}")
    if len(link.currency) != 3 or not set(link.currency) <= _COUNTRY_CHARS:
        raise TopologyError(f"{where}: currency {link.currency!r} is not an ISO 4217 code")


# --- building ----------------------------------------------------------------------------
def build_topology(regions: Iterable[Region], overrides: Iterable[Link] = ()) -> Topology:
    """The full directed mesh over ``regions`` (self-links included).

    A pair listed in ``overrides`` takes that link, marked ``derived=False`` (published);
    an override applies to its own direction only. Every other pair is derived.
    Raises :class:`TopologyError` on invalid regions or overrides.
    """
    regions = tuple(regions)
    by_id = _check_regions(regions)
    published: dict[tuple[str, str], Link] = {}
    for link in overrides:
        _check_link(link, by_id)
        key = (link.src, link.dst)
        if key in published:
            raise TopologyError(f"link {link.src!r} -> {link.dst!r} is listed twice")
        published[key] = link if not link.derived else msgspec.structs.replace(link, derived=False)
    links = tuple(
        published[(a.id, b.id)] if (a.id, b.id) in published else derive_link(a, b)
        for a in regions for b in regions
    )
    return Topology(regions=regions, links=links, model=MODEL)


def add_region(topology: Topology, region: Region) -> Topology:
    """A new topology with ``region`` added and derived links to and from it.

    Existing links (published ones included) are kept. Adding a region that is already
    present with identical fields returns ``topology`` unchanged; the same id with
    different fields raises :class:`TopologyError`.
    """
    check_region(region)
    for existing in topology.regions:
        if existing.id == region.id:
            if existing == region:
                return topology
            raise TopologyError(f"region {region.id!r} already exists with different "
                                f"fields: {existing!r}")
    new_links = [derive_link(region, region)]
    for other in topology.regions:
        new_links.append(derive_link(region, other))
        new_links.append(derive_link(other, region))
    return Topology(regions=(*topology.regions, region), links=(*topology.links, *new_links),
                    model=topology.model or MODEL)


def parse_records(data: bytes | str, *, source: str = "<topology>") -> TopologyFile:
    """Decode and validate topology JSON: its regions and published links, no mesh."""
    try:
        parsed = msgspec.json.decode(data, type=TopologyFile)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise TopologyError(f"{source}: {exc}") from None
    if not parsed.regions:
        raise TopologyError(f"{source}: no regions")
    try:
        by_id = _check_regions(parsed.regions)
        seen: set[tuple[str, str]] = set()
        links = []
        for link in parsed.links:
            _check_link(link, by_id)
            if (link.src, link.dst) in seen:
                raise TopologyError(f"link {link.src!r} -> {link.dst!r} is listed twice")
            seen.add((link.src, link.dst))
            links.append(msgspec.structs.replace(link, derived=False) if link.derived else link)
    except TopologyError as exc:
        raise TopologyError(f"{source}: {exc}") from None
    return TopologyFile(model=parsed.model, regions=parsed.regions, links=tuple(links))


def parse_topology(data: bytes | str, *, source: str = "<topology>") -> Topology:
    """Decode and validate topology JSON (``regions`` + optional ``links``), meshed."""
    records = parse_records(data, source=source)
    return build_topology(records.regions, records.links)


def _read(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read topology file: {exc.strerror or exc}") from None


def load_records(path: str | Path) -> TopologyFile:
    """An operator's topology file, validated, as the registry stores it (no mesh).

    Raises :class:`TopologyError` (a ``ValueError``) naming the file and the problem.
    """
    return parse_records(_read(path), source=str(path))


def load_topology(path: str | Path) -> Topology:
    """An operator's topology file, meshed; pairs it does not list are derived."""
    return parse_topology(_read(path), source=str(path))


def _packaged_bytes() -> bytes:
    return resources.files(__package__ or "services.registry.domain").joinpath(
        "regions.json").read_bytes()


@cache
def default_records() -> TopologyFile:
    """The packaged regions: China's eight national compute hubs and public cloud regions."""
    return parse_records(_packaged_bytes(), source="regions.json")


@cache
def default_topology() -> Topology:
    """The packaged topology, meshed."""
    return parse_topology(_packaged_bytes(), source="regions.json")


@cache
def default_index() -> TopologyIndex:
    return TopologyIndex(default_topology())


# --- lookups -----------------------------------------------------------------------------
class TopologyIndex:
    """O(1) lookups over a :class:`Topology`.

    ``link`` answers every pair of known regions: a pair missing from the topology (one
    built by hand) is derived on first use and remembered.
    """

    __slots__ = ("_by_country", "_links", "_regions", "topology")

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._regions: dict[str, Region] = {r.id: r for r in topology.regions}
        self._links: dict[tuple[str, str], Link] = {(ln.src, ln.dst): ln for ln in topology.links}
        by_country: dict[str, list[str]] = {}
        for region in topology.regions:
            by_country.setdefault(region.country, []).append(region.id)
        self._by_country = {cc: tuple(ids) for cc, ids in by_country.items()}

    def link(self, src: str, dst: str) -> Link:
        try:
            return self._links[(src, dst)]
        except KeyError:
            pass
        a, b = self.region(src), self.region(dst)
        link = self._links[(src, dst)] = derive_link(a, b)
        return link

    def region(self, region_id: str) -> Region:
        try:
            return self._regions[region_id]
        except KeyError:
            raise KeyError(f"unknown region {region_id!r}") from None

    def regions_in_country(self, country: str) -> tuple[str, ...]:
        return self._by_country.get(country, ())

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self._regions)

    def __contains__(self, region_id: object) -> bool:
        return region_id in self._regions

    def __len__(self) -> int:
        return len(self._regions)
