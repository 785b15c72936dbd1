"""Request records and response bodies of the broker's HTTP API."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

import msgspec

from services.common.delivery import Access, Attempt, LeaseState
from services.common.messages import LeaseInfo

from .domain.requests import ComputeRequest
from .matching.model import Placement

# the request lifecycle (docs/lifecycle.md): accepted → queued → placing → placed | rejected | cancelled | expired;
# "accepted" is never stored (a request is placed, queued or rejected before its call returns)
RequestState = Literal["queued", "placing", "placed", "rejected", "cancelled", "expired"]


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


def lease_view(lease: LeaseInfo) -> LeaseView:
    return LeaseView(
        lease_id=lease.lease_id, request_id=lease.request_id, tenant=lease.tenant, pool_id=lease.pool_id,
        provider=lease.provider, region=lease.region, model=lease.model, units=lease.units, billing=lease.billing,
        unit_price=lease.unit_price, price_basis=lease.price_basis, currency=lease.currency,
        granted_at=lease.granted_at, expires_at=lease.expires_at,
        renewable=lease.ttl_s > 0,
    )
