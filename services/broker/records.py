"""Request records and response bodies of the broker's HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal

import msgspec

from services.common.delivery import Access, Attempt, LeaseState, Workload
from services.common.messages import LeaseInfo

from .domain.requests import ComputeRequest
from .leases import LiveLease, provision_deadline
from .matching.model import Placement

# the request lifecycle (docs/lifecycle.md): accepted → queued → placing → placed | rejected | cancelled | expired;
# placed → replacing → placed | queued | failed (failover); "accepted" is never stored (a request is
# placed, queued or rejected before its call returns)
RequestState = Literal["queued", "placing", "placed", "replacing", "rejected", "cancelled", "expired", "failed"]


class Replacement(msgspec.Struct, kw_only=True):
    """A lease of the request that failed or was lost and waits in the queue for its
    replacement: what the queue pass places is its part of the request, away from the
    pools that failed it, carrying its place (attempt, replaces, fixed end)."""

    lease: LeaseInfo  # the lease that ended
    seq: int  # its ending event's seq: the lease.replaced events follow it
    whole: bool  # it was the request's only lease: the whole request is placed again


class RequestRecord(msgspec.Struct, kw_only=True):
    request_id: str
    tenant: str
    state: RequestState
    created_at: datetime
    updated_at: datetime
    body: ComputeRequest
    reasons: list[str] = []
    lease_ids: list[str] = []
    deadline_at: datetime | None = None
    attempts: list[Attempt] = []  # every lease tried, in grant order (failed ones too)
    excluded_pools: list[str] = []  # pools that failed this request: a replacement avoids them
    replacements: int = 0  # replacements started (placed or queued), against body.max_replacements
    replacing: Replacement | None = None  # queued: a replacement waiting for capacity


class LeaseView(msgspec.Struct, frozen=True, kw_only=True):
    lease_id: str
    request_id: str
    tenant: str
    state: LeaseState = "ready"
    pool_id: str
    provider: str
    region: str
    model: str
    units: int
    billing: str
    unit_price: Decimal
    price_basis: str
    currency: str
    granted_at: datetime
    expires_at: datetime
    renewable: bool
    delivery: str = ""  # the workload kind being delivered ("" = capacity only)
    provision_deadline: datetime | None = None  # provisioning: failed unless ready by then
    ready_at: datetime | None = None
    attempt: int = 1
    replaces: str | None = None
    access: Access | None = None  # the lease's tenant and admin only; ops sees it redacted
    milli: int = 1000  # of each device: < 1000 is a share (docs/sharing.md), billed unit_price x milli/1000
    devices: tuple[int, ...] = ()  # device indices in the pool (sharing pools; node = index // units_per_node)


class RequestView(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    tenant: str
    state: RequestState
    created_at: datetime
    reasons: list[str] = []
    leases: list[LeaseView] = []
    queue_position: int | None = None
    estimated_wait_s: float | None = None
    deadline_at: datetime | None = None
    placement: Placement | None = None
    attempts: list[Attempt] = []


class QuoteView(msgspec.Struct, frozen=True, kw_only=True):
    options: list[Placement]
    reasons: list[str] = []
    placeable_now: bool
    never: bool


class Assignment(msgspec.Struct, frozen=True, kw_only=True):
    """A lease on a provider's pool as its provider sees it (``GET /v1/assignments``):
    what to deliver (the request's workload) and by when."""

    lease_id: str
    request_id: str
    tenant: str
    pool_id: str
    provider: str
    region: str
    model: str
    units: int
    state: LeaseState
    delivery: str = ""  # "" = capacity only (nothing to deliver)
    workload: Workload | None = None
    granted_at: datetime
    expires_at: datetime
    provision_deadline: datetime | None = None
    ready_at: datetime | None = None
    attempt: int = 1
    replaces: str | None = None
    # shares (docs/sharing.md): the share of each device and which devices of the pool, for
    # the provider to enforce (1000 and no devices: whole units, the provider picks them)
    milli: int = 1000
    devices: tuple[int, ...] = ()


def _at(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def lease_view(lease: LeaseInfo, live: LiveLease | None = None, access: Access | None = None) -> LeaseView:
    """``live``: the lease's delivery state as Redis holds it; without it, the state of a
    fresh grant (provisioning when it delivers, else ready at grant). ``access``: what
    the caller may see of the access details (the caller decides: tenant, admin, ops)."""
    state = live.state if live is not None and live.state in ("provisioning", "ready") else \
        ("provisioning" if lease.delivery else "ready")
    deadline = ready_at = None
    if state == "provisioning":
        deadline = _at(live.deadline if live is not None and live.deadline else provision_deadline(lease))
    elif lease.delivery:
        ready_at = _at(live.ready_at if live is not None else None)
    else:
        ready_at = lease.granted_at  # capacity only: ready (and billed) from its grant
    return LeaseView(
        lease_id=lease.lease_id, request_id=lease.request_id, tenant=lease.tenant, pool_id=lease.pool_id,
        provider=lease.provider, region=lease.region, model=lease.model, units=lease.units, billing=lease.billing,
        unit_price=lease.unit_price, price_basis=lease.price_basis, currency=lease.currency,
        granted_at=lease.granted_at, expires_at=lease.expires_at,
        renewable=lease.ttl_s > 0, state=state, delivery=lease.delivery,  # type: ignore[arg-type]
        provision_deadline=deadline, ready_at=ready_at, attempt=lease.attempt, replaces=lease.replaces or None,
        access=access, milli=lease.milli, devices=lease.devices,
    )
