"""Structs in and out of the matching engine. Pure data: no I/O, no clocks.

The engine sees pools as ``PoolState`` (a flattened, matching-ready view of the
registry's ``Pool`` plus live free units) and requests as ``Ask`` (a validated
``ComputeRequest`` with its defaults resolved). It answers with a ``Decision``: ranked
``Placement`` options, or the reasons nothing fits.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import msgspec

Billing = Literal["on_demand", "reserved_month", "reserved_year", "interruptible"]
Objective = Literal["cost", "time"]
Metric = Literal["bf16", "fp16", "fp8"]

HOURS_PER_MONTH = Decimal(730)  # 8,760 h / 12, the usual cloud billing month


class PoolState(msgspec.Struct, kw_only=True):
    """One pool as the engine indexes it. ``free`` changes; the rest changes only
    when the registry updates the pool (the engine then replaces the whole state)."""

    pool_id: str
    provider: str
    region: str
    country: str
    zone: str = ""
    model: str
    vendor: str
    stack: str
    frameworks: tuple[str, ...] = ()
    memory_gib: float
    interconnect: str
    host_arch: str = "x86_64"
    bf16_tflops: float
    fp16_tflops: float
    fp8_tflops: float | None = None
    units_per_node: int = 8
    capacity: int
    free: int
    listed: bool = False  # availability from a public catalogue, not reported live
    currency: str = "USD"
    on_demand: Decimal | None  # per unit-hour; None: sold as interruptible only
    reserved_month: Decimal | None = None  # per unit-month, month term
    reserved_year: Decimal | None = None  # per unit-month, year term
    interruptible: Decimal | None = None  # per unit-hour
    egress_gbps: float = 10.0
    # workload kinds the provider delivers here (empty: capacity only); a part of the
    # pool's cell, so that an ask for a kind is pruned per cell, never per pool
    delivery: frozenset[str] = frozenset()
    provision_timeout_s: int = 300  # a delivering lease not ready by then fails
    # shares (docs/sharing.md): "none" leases whole devices only; otherwise the engine
    # keeps free milli per device (``Engine.set_devices``) and ``free`` counts the
    # devices with all 1000 free
    sharing: Literal["none", "time_slice", "memory"] = "none"
    min_milli: int = 100  # smallest share placed here
    max_milli: int = 1000  # largest share placed here; below 1000: slices only, no whole device


class Ask(msgspec.Struct, frozen=True, kw_only=True):
    """A request as the engine sees it: every default resolved, already validated
    against the catalogue and topology (unknown models/regions never reach here)."""

    units: int | None = None  # exactly one of units / min_tflops is set
    min_tflops: float | None = None
    metric: Metric = "bf16"
    # accelerator constraints (empty = anything)
    models: frozenset[str] = frozenset()
    vendors: frozenset[str] = frozenset()
    stacks: frozenset[str] = frozenset()
    frameworks: frozenset[str] = frozenset()
    interconnects: frozenset[str] = frozenset()
    host_archs: frozenset[str] = frozenset()
    min_memory_gib: float = 0.0
    # shape
    gang: bool = True
    max_pools: int = 1
    max_regions: int = 1
    # placement (empty = anywhere)
    regions: frozenset[str] = frozenset()
    countries: frozenset[str] = frozenset()
    data_region: str | None = None
    data_gb: float = 0.0
    users_region: str | None = None
    max_latency_ms: float | None = None
    # billing
    billing: Billing = "on_demand"
    hours: Decimal = Decimal(1)  # duration the cost is computed over (open leases: 1 h)
    max_price: Decimal | None = None  # per unit-hour (reserved: the term fee / 730 h)
    currency: str = "USD"
    objective: Objective = "cost"
    exclude_pools: frozenset[str] = frozenset()  # pools another broker just won
    # reliability (docs/reliability.md): pools scored below min_reliability are pruned;
    # failover_cost > 0 ranks by expected cost, cost x (1 + (1 - score) x failover_cost)
    min_reliability: float | None = None
    failover_cost: float = 0.0
    delivery: str | None = None  # the workload's kind: only pools that deliver it (None: any pool)
    # a share of one device (units 1): 1000 = whole devices. share_memory_gib: the memory
    # the share needs (on "memory" pools its slice, milli/1000 of the device's memory)
    milli: int = 1000
    share_memory_gib: float = 0.0


class Allocation(msgspec.Struct, frozen=True, kw_only=True):
    pool_id: str
    region: str
    provider: str
    model: str
    units: int
    unit_price: Decimal  # per unit-hour (on-demand / interruptible) or per unit-month (reserved)
    price_basis: Literal["unit_hour", "unit_month"] = "unit_hour"
    availability: Literal["live", "listed"] = "live"  # "listed": from a public catalogue, not reported live
    location: Literal["known", "unknown"] = "known"  # "unknown": the provider says nothing about where the pool is
    reliability: float | None = None  # the pool's score (docs/reliability.md); a pool with no record: the prior
    milli: int = 1000  # of each device: < 1000 is a share of one device, billed unit_price x milli/1000
    devices: tuple[int, ...] = ()  # on sharing pools: the engine's device hint (indices in the pool)


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    allocations: tuple[Allocation, ...]
    units: int
    tflops: float  # delivered, in the ask's metric
    compute_cost: Decimal
    transfer_cost: Decimal
    total_cost: Decimal
    currency: str
    unit_hour_price: Decimal  # effective average per unit-hour
    transfer_s: float  # time to move the data to the placement (0 without data)
    expected_start_s: float = 0.0
    stranded_units: int = 0  # free units left in the chosen pools (fragmentation tiebreak)
    reliability: float | None = None  # its pools' scores, weighted by units
    expected_cost: Decimal | None = None  # what ranked it: total_cost with the expected cost of failing over
    milli: int = 1000  # a share of one device (< 1000): tflops and costs are that share's
    share_hour_price: Decimal | None = None  # a share: what it costs per hour (unit_hour_price x milli/1000)


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    options: tuple[Placement, ...] = ()  # best first
    reasons: tuple[str, ...] = ()  # why nothing (or nothing better) fits, per constraint
    never: bool = False  # True: not even the registered capacity (ignoring what is leased) could fit

    @property
    def placed(self) -> bool:
        return bool(self.options)
