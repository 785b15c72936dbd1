"""What an app may ask for (``POST /v1/requests`` and ``/v1/quotes``), and the pure
translation of a request into the engine's ``Ask``. Everything but ``units`` has a
default: ``{"units": 1}`` is one unit of anything, anywhere, on demand, as an open
lease kept alive by renewals."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

from services.common.delivery import MAX_WORKLOAD_BYTES, OnFailure, Workload
from services.common.errors import BadRequest, Unprocessable
from services.common.messages import Accelerator, Billing, Currency, HostArch, Id, Price
from services.common.money import price_problem

from ..matching.model import Ask, Metric, Objective
from .printable import check_printable

MAX_UNITS = 100_000
DAY = 86_400
# A lease that fails or is lost is placed again elsewhere: the tenant waits out another
# provisioning and pays for a second placement, so a pool's expected cost is its cost x
# (1 + P(failure) x FAILOVER_COST_FACTOR), P(failure) = 1 - score (docs/reliability.md)
FAILOVER_COST_FACTOR = 1.0


class AcceleratorSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    models: Annotated[list[Id], msgspec.Meta(max_length=64)] = []
    vendors: Annotated[list[str], msgspec.Meta(max_length=16)] = []
    stacks: Annotated[list[str], msgspec.Meta(max_length=16)] = []
    frameworks: Annotated[list[str], msgspec.Meta(max_length=8)] = []
    interconnects: Annotated[list[str], msgspec.Meta(max_length=16)] = []
    host_arch: list[HostArch] = []
    min_memory_gib: Annotated[float, msgspec.Meta(ge=0, le=100_000)] = 0.0


class Performance(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Normalised performance: the broker finds the cheapest mix that delivers it."""

    min_tflops: Annotated[float, msgspec.Meta(gt=0, le=1e8)]
    metric: Metric = "bf16"


class Shape(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kind: Literal["gang", "split"] = "gang"
    max_pools: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    max_regions: Annotated[int, msgspec.Meta(ge=1, le=32)] = 1


class PlacementSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    regions: Annotated[list[Id], msgspec.Meta(max_length=64)] = []
    countries: Annotated[list[Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$(?!\n)")]], msgspec.Meta(max_length=64)] = []
    data_region: Id | None = None
    data_gb: Annotated[float, msgspec.Meta(ge=0, le=1e9)] = 0.0
    users_region: Id | None = None
    max_latency_ms: Annotated[float, msgspec.Meta(gt=0, le=10_000)] | None = None


class Share(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A share of one device (docs/sharing.md): ``milli`` thousandths of it, on a pool
    that shares (``sharing.mode`` not "none") and allows that small a share; with
    ``min_memory_gib``, the device must have that much memory (on "memory" pools: the
    slice, milli/1000 of the device's memory)."""

    milli: Annotated[int, msgspec.Meta(ge=1, le=999)]
    min_memory_gib: Annotated[float, msgspec.Meta(gt=0, le=10_000)] | None = None


class ComputeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    units: Annotated[int, msgspec.Meta(ge=1, le=MAX_UNITS)] | None = None
    accelerators: AcceleratorSpec = msgspec.field(default_factory=AcceleratorSpec)  # (a factory: litestar's
    # OpenAPI generation hashes defaults, and a struct holding lists is unhashable: GET /schema was a 500)
    performance: Performance | None = None
    shape: Shape = msgspec.field(default_factory=Shape)
    placement: PlacementSpec = msgspec.field(default_factory=PlacementSpec)
    billing: Billing = "on_demand"
    duration_s: Annotated[int, msgspec.Meta(ge=60, le=366 * DAY)] | None = None
    lease_ttl_s: Annotated[int, msgspec.Meta(ge=1, le=DAY)] = 300
    max_price: Price | None = None  # per unit-hour
    currency: Currency = "USD"
    priority: Annotated[int, msgspec.Meta(ge=0, le=9)] = 5
    objective: Objective = "cost"
    queue: bool = True  # wait for capacity when none is free now
    deadline_s: Annotated[int, msgspec.Meta(ge=1, le=30 * DAY)] | None = None  # give up queueing after
    # delivery (docs/lifecycle.md, "Lease"): what to run on the lease; only pools that
    # deliver its kind are chosen. None: capacity only (any pool; ready at grant)
    workload: Workload | None = None
    on_failure: OnFailure = "replace"  # a failed or lost lease: place it again elsewhere, or end there
    max_replacements: Annotated[int, msgspec.Meta(ge=0, le=10)] = 2
    min_reliability: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None  # pools scored below are pruned
    share: Share | None = None  # a slice of one device (units 1 or omitted; no performance ask)


TERM_MONTHS = {"reserved_month": 1, "reserved_year": 12}
MONTH_S = 730 * 3600


def workload_kind(request: ComputeRequest) -> str:
    """The kind of the request's workload ("" = capacity only)."""
    return "" if request.workload is None else type(request.workload).__struct_config__.tag  # type: ignore[return-value]


def term_seconds(request: ComputeRequest) -> int | None:
    """How long a lease runs without renewals: a reserved term, a duration, or None
    (an open lease that lives by renewals)."""
    if request.billing in TERM_MONTHS:
        return TERM_MONTHS[request.billing] * MONTH_S
    return request.duration_s


def to_ask(request: ComputeRequest, catalogue: Mapping[str, Accelerator], regions: Mapping[str, str],
           exclude_pools: frozenset[str] = frozenset()) -> Ask:
    """Validate against the catalogue and the topology (``regions``: id -> country) and
    resolve defaults. Raises ``Unprocessable`` with the reason."""
    units = request.units
    if request.share is not None:
        if request.performance is not None:
            raise Unprocessable("a share is of one device: give 'share' without 'performance' "
                                "(a share delivers share.milli/1000 of the device's TFLOPS)")
        if units not in (None, 1):
            raise Unprocessable(f"a share is of one device: 'units' must be 1 or left out with 'share' (got {units})")
        if request.shape.kind != "gang":
            raise Unprocessable("a share is of one device: shape.kind must be 'gang' with 'share'")
        units = 1
    if (units is None) == (request.performance is None):
        raise Unprocessable("give exactly one of 'units' or 'performance'")
    acc, where = request.accelerators, request.placement
    unknown = [m for m in acc.models if m not in catalogue]
    if unknown:
        raise Unprocessable(f"unknown accelerator models {unknown}; see GET /v1/accelerators on the registry")
    for field, values, attr in (("vendors", acc.vendors, "vendor"), ("stacks", acc.stacks, "stack")):
        if values:  # most requests name neither: no need to gather what is known
            known = {getattr(a, attr) for a in catalogue.values()}
            bad = [v for v in values if v not in known]
            if bad:
                raise Unprocessable(f"unknown accelerators.{field} {bad}; known: {sorted(known)}")
    for field, region in (("regions", None), ("data_region", where.data_region), ("users_region", where.users_region)):
        names = where.regions if field == "regions" else ([region] if region else [])
        bad = [r for r in names if r not in regions]
        if bad:
            raise Unprocessable(f"unknown placement.{field} {bad}; see GET /v1/regions on the registry")
    if where.max_latency_ms is not None and where.users_region is None:
        raise Unprocessable("placement.max_latency_ms needs placement.users_region")
    if where.data_gb > 0 and where.data_region is None:
        raise Unprocessable("placement.data_gb needs placement.data_region")
    if request.billing in TERM_MONTHS and request.duration_s is not None:
        raise Unprocessable(f"{request.billing} runs for its term; leave duration_s out")
    if request.max_price is not None and (why := price_problem(request.max_price)):
        raise Unprocessable(f"max_price {why}")
    if request.deadline_s is not None and not request.queue:
        raise Unprocessable("deadline_s applies to queued requests; it contradicts queue: false")
    if where.regions and where.countries and not any(regions[r] in where.countries for r in where.regions):
        raise Unprocessable("placement.regions and placement.countries exclude each other")
    if request.workload is not None:
        check_printable(request.workload, "workload", multiline=frozenset({"script"}))
    if request.workload is not None and len(msgspec.json.encode(request.workload)) > MAX_WORKLOAD_BYTES:
        raise BadRequest(f"workload is {len(msgspec.json.encode(request.workload))} bytes JSON-encoded; "
                         f"at most {MAX_WORKLOAD_BYTES} are accepted")
    gang = request.shape.kind == "gang"
    hours = Decimal(request.duration_s) / 3600 if request.duration_s else Decimal(1)
    share = request.share
    return Ask(
        units=units,
        min_tflops=request.performance.min_tflops if request.performance else None,
        metric=request.performance.metric if request.performance else "bf16",
        models=frozenset(acc.models), vendors=frozenset(acc.vendors), stacks=frozenset(acc.stacks),
        frameworks=frozenset(acc.frameworks), interconnects=frozenset(acc.interconnects),
        host_archs=frozenset(acc.host_arch), min_memory_gib=acc.min_memory_gib,
        gang=gang, max_pools=1 if gang else request.shape.max_pools,
        max_regions=1 if gang else request.shape.max_regions,
        regions=frozenset(where.regions), countries=frozenset(where.countries),
        data_region=where.data_region, data_gb=where.data_gb, users_region=where.users_region,
        max_latency_ms=where.max_latency_ms, billing=request.billing, hours=hours,
        max_price=request.max_price, currency=request.currency, objective=request.objective,
        exclude_pools=exclude_pools, delivery=workload_kind(request) or None,
        min_reliability=request.min_reliability,
        # capacity only (no workload): ranked by price alone (docs/reliability.md, "Ranking")
        failover_cost=FAILOVER_COST_FACTOR if request.workload is not None else 0.0,
        milli=share.milli if share is not None else 1000,
        share_memory_gib=(share.min_memory_gib or 0.0) if share is not None else 0.0,
    )
