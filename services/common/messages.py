"""The wire contract: every message that crosses a process boundary.

Rules: tagged, frozen msgspec Structs; JSON on the wire; one Struct per message type;
new fields only with defaults so old and new readers accept each other; every event
carries an ``id`` (JetStream de-duplicates on it as ``Nats-Msg-Id``) and ``at``, the
time it happened.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

from .delivery import DEFAULT_PROVISION_TIMEOUT_S, DeliveryKind
from .ids import ID_PATTERN
from .money import Currency, Price

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, description="lower-case id: a-z 0-9 _ -")]
Units = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]

Vendor = Literal[
    "nvidia", "amd", "intel", "huawei", "cambricon", "hygon", "kunlunxin", "moore-threads",
    "iluvatar", "biren", "metax", "enflame", "aws", "google",
]
Stack = Literal["cuda", "rocm", "cann", "neuware", "dtk", "xpu", "synapseai", "musa", "corex",
                "suppa", "maca", "topsrider", "neuron", "xla"]
HostArch = Literal["x86_64", "aarch64"]
FormFactor = Literal["sxm", "pcie", "nvl", "oam", "superchip", "other"]
PoolStatus = Literal["online", "offline", "draining"]


# --- catalogue and topology ----------------------------------------------------------
class Accelerator(msgspec.Struct, frozen=True, kw_only=True):
    """One accelerator model. Figures are per card, dense (no sparsity)."""

    model: Id
    vendor: Vendor
    name: str
    memory_gib: float
    memory_bandwidth_gbs: float
    bf16_tflops: float
    fp16_tflops: float
    fp8_tflops: float | None = None
    interconnect: str
    interconnect_gbs: float
    stack: Stack
    frameworks: tuple[str, ...] = ("pytorch",)
    form_factor: FormFactor | None = None  # how the card is built: SXM and PCIe parts differ in power and links
    aliases: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()


class Region(msgspec.Struct, frozen=True, kw_only=True):
    """A place capacity runs in. ``located=False``: the provider says nothing about where
    (a catalogue's ``default``, ``earth`` or empty region); ``country``, ``lat`` and
    ``lon`` are then placeholders no reader may use (``docs/topology.md``, "Regions of
    unknown location"): no link is derived to or from it, and only asks without a
    location constraint are placed there."""

    id: Id
    name: str
    country: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$(?!\n)")]
    lat: Annotated[float, msgspec.Meta(ge=-90, le=90)]  # bounded: links are derived from the location,
    lon: Annotated[float, msgspec.Meta(ge=-180, le=180)]  # and lat 1e7 made the region list a 500 (fuzzing)
    kind: Literal["hub", "cloud", "edge"] = "cloud"
    located: bool = True


class Link(msgspec.Struct, frozen=True, kw_only=True):
    """Directed network path between two regions."""

    src: Id
    dst: Id
    latency_ms: float
    bandwidth_gbps: float
    egress_per_gb: Price
    currency: Currency = "USD"
    derived: bool = True  # True when computed from the distance model, not published


class Topology(msgspec.Struct, frozen=True, kw_only=True):
    regions: tuple[Region, ...]
    links: tuple[Link, ...]
    model: str = ""  # how derived figures were computed


# --- pools ------------------------------------------------------------------------------
class Prices(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-unit prices. ``reserved_*`` are per unit-month for a month- or year-long term;
    ``interruptible`` is the floor per unit-hour for preemptible use. A mode without a
    price is not sold: ``on_demand`` None is a pool sold as interruptible (spot) only.
    At least one price is given (the registry says so with a 422)."""

    currency: Currency = "USD"
    on_demand: Price | None = None
    reserved_month: Price | None = None
    reserved_year: Price | None = None
    interruptible: Price | None = None


MILLI = 1000  # a whole device, in milli-devices
SharingMode = Literal["none", "time_slice", "memory"]
MAX_SHARED_UNITS = 1024  # devices of one sharing pool: its per-device state is read whole by one script


class Sharing(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Whether and how a pool shares its devices (docs/sharing.md). The broker accounts
    free milli per device; the provider enforces the share with its vendor's mechanism.
    ``time_slice``: a share is a fraction of the device's time (NVIDIA time-slicing or an
    MPS active-thread percentage; memory is not partitioned). ``memory``: a share of m
    milli also gets m/1000 of the device's memory (Ascend vNPU templates, HAMi's memory
    limit, MIG-like partitions). A share is never below ``min_milli`` nor above
    ``max_milli``; a pool whose ``max_milli`` is below 1000 sells slices only, never a
    whole device (a catalogue's fixed-size partitions: an AWS g6f sells 1/8 of an L4)."""

    mode: SharingMode = "none"
    min_milli: Annotated[int, msgspec.Meta(ge=1, le=MILLI)] = 100
    max_milli: Annotated[int, msgspec.Meta(ge=1, le=MILLI)] = MILLI


class PoolSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a provider registers (``PUT /v1/pools/{id}``)."""

    region: Id
    zone: Annotated[str, msgspec.Meta(max_length=64)] = ""
    model: Id
    units: Units
    units_per_node: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    interconnect: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    host_arch: HostArch = "x86_64"
    storage_gb: Annotated[int, msgspec.Meta(ge=0, le=10**9)] = 0
    egress_gbps: Annotated[float, msgspec.Meta(gt=0, le=100_000)] = 10.0
    prices: Prices
    provider: Id | None = None  # admin may register on behalf of a provider
    # "listed": imported from a public catalogue; its availability is what the catalogue
    # lists, not what a provider agent reports live (quotes say so)
    availability: Literal["live", "listed"] = "live"
    # workload kinds the provider delivers on this pool; () = capacity only (leases are
    # ready at grant, as for imported catalogue pools). Leases that deliver must be
    # answered ready within provision_timeout_s or they fail (docs/lifecycle.md, "Lease").
    delivery: Annotated[tuple[DeliveryKind, ...], msgspec.Meta(max_length=4)] = ()
    provision_timeout_s: Annotated[int, msgspec.Meta(ge=5, le=86_400)] = DEFAULT_PROVISION_TIMEOUT_S
    # shares (docs/sharing.md): mode "none" (the default) leases whole devices only; a
    # sharing pool has at most MAX_SHARED_UNITS devices and keeps free milli per device
    sharing: Sharing = Sharing()


class Pool(msgspec.Struct, frozen=True, kw_only=True):
    """A registered pool as the registry records it (durable record and events)."""

    pool_id: Id
    provider: Id
    spec: PoolSpec
    accelerator: Accelerator
    created_at: datetime
    updated_at: datetime
    # One registration of this pool id, from creation to removal: the revision of the
    # record's creating write in the registry's bucket (so a pool removed and registered
    # again is a new, higher generation). 0 in a stored record means "the revision of this
    # entry" (a create cannot name its own revision). Leases hold the generation they were
    # granted on and never touch another (docs/lifecycle.md, "Pool").
    generation: int = 1


# --- capacity events -------------------------------------------------------------------
class _CapacityEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    id: str
    at: datetime
    pool_id: Id
    provider: Id
    region: Id
    v: int = 1


class PoolRegistered(_CapacityEvent, tag="pool.registered"):
    pool: Pool
    free: int = 0


class PoolUpdated(_CapacityEvent, tag="pool.updated"):
    pool: Pool
    free: int = 0
    overcommit: int = 0  # units leased beyond the new capacity


class PoolOffline(_CapacityEvent, tag="pool.offline"):
    reason: str = "heartbeat missed"
    generation: int = 0  # the pool generation that went offline (0: not said)
    lease_ids: tuple[str, ...] = ()  # its leases at that moment: the broker marks them lost


class PoolOnline(_CapacityEvent, tag="pool.online"):
    free: int = 0


class PoolDraining(_CapacityEvent, tag="pool.draining"):
    pass


class PoolRemoved(_CapacityEvent, tag="pool.removed"):
    leased: int = 0  # units still leased when removed: the broker marks them lost
    generation: int = 0  # the pool generation removed (0: not said)
    lease_ids: tuple[str, ...] = ()  # its leases at that moment


CapacityEvent = PoolRegistered | PoolUpdated | PoolOffline | PoolOnline | PoolDraining | PoolRemoved

__all__ = [
    "MAX_SHARED_UNITS", "MILLI", "Sharing", "SharingMode",
    "Accelerator", "CapacityEvent", "Currency", "Decimal", "HostArch", "Id", "Link", "Pool",
    "PoolDraining", "PoolOffline", "PoolOnline", "PoolRegistered", "PoolRemoved", "PoolSpec",
    "PoolStatus", "PoolUpdated", "Price", "Prices", "Region", "Stack", "Topology", "Units", "Vendor",
]


# --- allocation events (broker -> all; the meter bills from these) ----------------------
Billing = Literal["on_demand", "reserved_month", "reserved_year", "interruptible"]


class LeaseInfo(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What the meter needs to bill one lease: everything is locked at grant time."""

    lease_id: str
    request_id: str
    tenant: Id
    pool_id: Id
    provider: Id
    region: Id
    model: Id
    units: int
    billing: Billing
    unit_price: Decimal  # per unit-hour, or per unit-month for reserved terms
    price_basis: Literal["unit_hour", "unit_month"] = "unit_hour"
    currency: Currency = "USD"
    granted_at: datetime
    expires_at: datetime  # TTL end for open leases; duration or term end otherwise
    term_months: int = 0  # reserved terms: 1 or 12
    ttl_s: int = 0  # open leases: each renewal moves expires_at to now + ttl_s; 0 = fixed end
    priority: int = 5
    pool_generation: int = 0  # the pool generation granted on (0: from before generations were kept)
    # delivery (issue 12): the workload kind the provider must deliver ("" = capacity only:
    # ready at grant, billed from grant); such a lease starts "provisioning", is billed
    # from its lease.ready, and fails if not ready by granted_at + provision_timeout_s
    delivery: str = ""
    provision_timeout_s: int = 0
    attempt: int = 1  # 1 for the first lease of a request's slot, +1 per replacement
    replaces: str = ""  # the failed or lost lease this one replaces
    # shares (docs/sharing.md): ``milli`` of each device in ``devices`` (indices in the
    # pool; node = index // units_per_node). 1000 = whole devices. ``devices`` is empty on
    # pools that do not share (the provider picks the devices, as before). Billed at
    # unit_price x units x milli / 1000.
    milli: int = MILLI
    devices: tuple[int, ...] = ()


class _AllocEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    id: str
    at: datetime
    lease: LeaseInfo
    seq: int = 1  # per-lease sequence: granted 1, then +1 per event of that lease
    free_after: int = -1  # pool's free units right after (replicas' engines follow it)
    devices_free_after: tuple[int, ...] = ()  # free milli of each of lease.devices right after
    v: int = 1


class LeaseGranted(_AllocEvent, tag="lease.granted"):
    pass


class LeaseProvisioning(_AllocEvent, tag="lease.provisioning"):
    """The grant of a lease that must be delivered: units are held, nothing is billed
    until its lease.ready."""


class LeaseReady(_AllocEvent, tag="lease.ready"):
    """The provider delivered: billing starts at ``at``. Carries no access details."""


class LeaseFailed(_AllocEvent, tag="lease.failed"):
    """provisioning → failed (the provider said so, or no ready by the deadline): the
    units go back, nothing is billed."""

    reason: str = ""


class LeaseReplaced(_AllocEvent, tag="lease.replaced"):
    """A failed or lost lease (``lease``, already ended) was replaced by ``by_lease`` on
    another pool, under the same request."""

    by_lease: str = ""
    by_pool: str = ""


class LeaseRenewed(_AllocEvent, tag="lease.renewed"):
    pass


class LeaseReleased(_AllocEvent, tag="lease.released"):
    """Given back by its tenant, or (``by == "provider"``) ended by its delivered
    workload finishing by itself, with the workload's ``exit_code`` when known."""

    by: Literal["tenant", "provider"] = "tenant"
    exit_code: int | None = None


class LeaseExpired(_AllocEvent, tag="lease.expired"):
    pass


class LeasePreempted(_AllocEvent, tag="lease.preempted"):
    by_request: str = ""


class LeaseLost(_AllocEvent, tag="lease.lost"):
    reason: str = ""


class LeaseRevoked(_AllocEvent, tag="lease.revoked"):
    reason: str = ""


AllocEvent = (LeaseGranted | LeaseProvisioning | LeaseReady | LeaseRenewed | LeaseReleased | LeaseExpired
              | LeasePreempted | LeaseLost | LeaseRevoked | LeaseFailed | LeaseReplaced)
GRANT_EVENTS = (LeaseGranted, LeaseProvisioning)  # seq 1 of every lease: the units are held from here
ENDING_EVENTS = (LeaseReleased, LeaseExpired, LeasePreempted, LeaseLost, LeaseRevoked, LeaseFailed)


# --- request events (broker -> all) ------------------------------------------------------
class _RequestEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    id: str
    at: datetime
    request_id: str
    tenant: Id
    v: int = 1


class RequestAccepted(_RequestEvent, tag="request.accepted"):
    units: int = 0


class RequestQueued(_RequestEvent, tag="request.queued"):
    reasons: tuple[str, ...] = ()
    body: bytes = b""  # the request as the client sent it (JSON), to rebuild the queue
    # the body's workload (its env, its script) is not in the event, which ops and the
    # tenant read on the event stream: it is in the access bucket under the request id
    workload_stored: bool = False


class RequestPlaced(_RequestEvent, tag="request.placed"):
    lease_ids: tuple[str, ...] = ()


class RequestRejected(_RequestEvent, tag="request.rejected"):
    reasons: tuple[str, ...] = ()


class RequestCancelled(_RequestEvent, tag="request.cancelled"):
    pass


RequestEvent = RequestAccepted | RequestQueued | RequestPlaced | RequestRejected | RequestCancelled


# --- billing events (meter -> all) ---------------------------------------------------------
class _BillingEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    id: str
    at: datetime
    tenant: Id
    v: int = 1


class BudgetExhausted(_BillingEvent, tag="budget.exhausted"):
    """The tenant's spend reached its budget: the broker stops placing for it and
    revokes its pay-as-you-go leases after a grace period."""

    currency: Currency = "USD"
    budget: Decimal = Decimal(0)
    spent: Decimal = Decimal(0)


class BudgetRestored(_BillingEvent, tag="budget.restored"):
    currency: Currency = "USD"
    budget: Decimal = Decimal(0)
    spent: Decimal = Decimal(0)


class InvoiceIssued(_BillingEvent, tag="invoice.issued"):
    period: str = ""
    totals: dict[str, Decimal] = {}  # currency -> amount


BillingEvent = BudgetExhausted | BudgetRestored | InvoiceIssued
