"""Pure rules for pools: what a valid registration is, who may touch it, how a patch
applies. No I/O; ``now``, the catalogue and the topology are passed in."""

from __future__ import annotations

from collections.abc import Container, Mapping
from datetime import datetime
from typing import Annotated

import msgspec

from services.common.auth import Principal
from services.common.messages import MAX_SHARED_UNITS, MILLI, Accelerator, Pool, PoolSpec, Prices, Units
from services.common.money import price_problem

from .errors import Conflict, Forbidden, Unprocessable, UnknownModel, UnknownRegion


class PoolPatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``PATCH /v1/pools/{id}``: capacity and prices may change; placement may not."""

    units: Units | None = None
    units_per_node: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None
    prices: Prices | None = None
    egress_gbps: Annotated[float, msgspec.Meta(gt=0, le=100_000)] | None = None
    storage_gb: Annotated[int, msgspec.Meta(ge=0, le=10**9)] | None = None


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    healthy_units: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = None


class BatchHeartbeat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One provider agent reporting many pools in one call."""

    pools: Annotated[list[str], msgspec.Meta(min_length=1, max_length=10_000)]
    healthy_units: dict[str, Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]] = {}


_PRICE_FIELDS = ("on_demand", "reserved_month", "reserved_year", "interruptible")


def check_prices(prices: Prices) -> None:
    """Every given price is sane, and at least one is given: a mode without a price is
    not sold (``on_demand`` may be left out for a pool sold as interruptible only)."""
    if all(getattr(prices, name) is None for name in _PRICE_FIELDS):
        raise Unprocessable("prices: give at least one of " + ", ".join(_PRICE_FIELDS)
                            + " (a pool sold as spot only gives interruptible)")
    for name in _PRICE_FIELDS:
        value = getattr(prices, name)
        if value is not None and (why := price_problem(value)):
            raise Unprocessable(f"prices.{name} {why}")


def check_sharing(spec: PoolSpec, existing: Pool | None = None) -> None:
    """A sharing pool's per-device state is read whole by one reservation script, so it
    has at most ``MAX_SHARED_UNITS`` devices. Whether a pool shares cannot change while
    it is registered: its live leases were taken as whole units or as device shares, and
    the live state would no longer say which (docs/sharing.md)."""
    if spec.sharing.mode != "none" and spec.units > MAX_SHARED_UNITS:
        raise Unprocessable(f"a pool that shares its devices has at most {MAX_SHARED_UNITS} units "
                            f"(got {spec.units}); register the rest as another pool")
    if spec.sharing.mode == "none" and spec.sharing.max_milli < MILLI:
        raise Unprocessable("sharing.max_milli is the largest share of a pool that shares its devices; "
                            "this pool does not (sharing.mode 'none')")
    if spec.sharing.max_milli < spec.sharing.min_milli:
        raise Unprocessable(f"sharing.max_milli {spec.sharing.max_milli} is below sharing.min_milli "
                            f"{spec.sharing.min_milli}: no share would fit")
    if existing is not None and (existing.spec.sharing.mode == "none") != (spec.sharing.mode == "none"):
        raise Conflict(f"pool {existing.pool_id} {'does not share' if existing.spec.sharing.mode == 'none' else 'shares'}"
                       " its devices; remove it and register it again to change that")


def owner_for(principal: Principal, spec_provider: str | None) -> str:
    """Who owns a pool being registered: a provider key registers for itself only."""
    if principal.role == "provider":
        if spec_provider not in (None, principal.subject):
            raise Forbidden("a provider key registers pools for its own provider id only")
        return principal.subject
    if principal.role == "admin":
        if not spec_provider:
            raise Unprocessable("admin must name the provider (spec.provider) the pool belongs to")
        return spec_provider
    raise Forbidden(f"role {principal.role} may not register pools")


def check_owner(principal: Principal, pool_provider: str) -> None:
    if not principal.may_act_for("provider", pool_provider):
        raise Forbidden("this pool belongs to another provider")


def build_pool(pool_id: str, spec: PoolSpec, owner: str, catalogue: Mapping[str, Accelerator],
               regions: Container[str], now: datetime, existing: Pool | None) -> Pool:
    accelerator = catalogue.get(spec.model)
    if accelerator is None:
        raise UnknownModel(f"unknown accelerator model {spec.model!r}; see GET /v1/accelerators")
    if spec.region not in regions:
        raise UnknownRegion(f"unknown region {spec.region!r}; see GET /v1/regions")
    check_prices(spec.prices)
    if spec.units_per_node > spec.units:
        raise Unprocessable(f"units_per_node ({spec.units_per_node}) exceeds units ({spec.units})")
    check_sharing(spec, existing)
    if existing is not None:
        if existing.provider != owner:
            raise Forbidden("this pool belongs to another provider")
        if existing.spec.region != spec.region:
            raise Conflict(f"pool {pool_id} is in region {existing.spec.region}; remove it and register "
                           "a new pool to move capacity to another region")
    spec = msgspec.structs.replace(spec, provider=owner,
                                   interconnect=spec.interconnect or accelerator.interconnect)
    return Pool(pool_id=pool_id, provider=owner, spec=spec, accelerator=accelerator,
                created_at=existing.created_at if existing else now, updated_at=now,
                generation=existing.generation if existing else 0)  # 0: the record's create decides it


def apply_patch(pool: Pool, patch: PoolPatch, now: datetime) -> Pool:
    changes = {f: getattr(patch, f) for f in patch.__struct_fields__ if getattr(patch, f) is not None}
    if not changes:
        raise Unprocessable("empty patch: give at least one of " + ", ".join(PoolPatch.__struct_fields__))
    if patch.prices is not None:
        check_prices(patch.prices)
    spec = msgspec.structs.replace(pool.spec, **changes)
    if spec.units_per_node > spec.units:
        raise Unprocessable(f"units_per_node ({spec.units_per_node}) exceeds units ({spec.units})")
    check_sharing(spec)
    return msgspec.structs.replace(pool, spec=spec, updated_at=now)
