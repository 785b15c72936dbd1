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
    aliases: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()


class Region(msgspec.Struct, frozen=True, kw_only=True):
    id: Id
    name: str
    country: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")]
    lat: float
    lon: float
    kind: Literal["hub", "cloud", "edge"] = "cloud"


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
    ``interruptible`` is the floor per unit-hour for preemptible use."""

    currency: Currency = "USD"
    on_demand: Price
    reserved_month: Price | None = None
    reserved_year: Price | None = None
    interruptible: Price | None = None


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


class Pool(msgspec.Struct, frozen=True, kw_only=True):
    """A registered pool as the registry records it (durable record and events)."""

    pool_id: Id
    provider: Id
    spec: PoolSpec
    accelerator: Accelerator
    created_at: datetime
    updated_at: datetime
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


class PoolOnline(_CapacityEvent, tag="pool.online"):
    free: int = 0


class PoolDraining(_CapacityEvent, tag="pool.draining"):
    pass


class PoolRemoved(_CapacityEvent, tag="pool.removed"):
    leased: int = 0  # units still leased when removed: the broker marks them lost


CapacityEvent = PoolRegistered | PoolUpdated | PoolOffline | PoolOnline | PoolDraining | PoolRemoved

__all__ = [
    "Accelerator", "CapacityEvent", "Currency", "Decimal", "HostArch", "Id", "Link", "Pool",
    "PoolDraining", "PoolOffline", "PoolOnline", "PoolRegistered", "PoolRemoved", "PoolSpec",
    "PoolStatus", "PoolUpdated", "Price", "Prices", "Region", "Stack", "Topology", "Units", "Vendor",
]
