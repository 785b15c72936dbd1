"""The meter's durable records (JSON by msgspec): ledger entries, period-close markers,
per-lease accounts, dead letters, budgets and invoices."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

from services.common.messages import MILLI, Billing, Currency

BudgetKind = Literal["prepaid", "limit"]


# --- the ledger stream ------------------------------------------------------------------------
class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="entry", gc=False):
    """One charge: a lease's usage within one calendar month, or one month of a reserved
    term. ``id`` is deterministic (lease id + what is charged + period) and is the entry's
    ``Nats-Msg-Id``: appending it twice is a no-op."""

    id: str
    tenant: str
    provider: str
    pool_id: str
    region: str
    model: str
    lease_id: str
    request_id: str = ""
    billing: Billing
    kind: Literal["usage", "reserved"]
    period: str  # the month the charge belongs to (service period)
    start: datetime
    end: datetime
    units: int
    milli: int = MILLI  # share of each unit (1000 = whole; docs/sharing.md)
    seconds: Decimal = Decimal(0)  # billed seconds (usage)
    quantity: Decimal  # unit-hours (usage) or unit-months (reserved), x milli/1000 for a share
    unit_price: Decimal
    price_basis: Literal["unit_hour", "unit_month"] = "unit_hour"
    currency: Currency
    amount: Decimal  # rounded to the currency's minor unit
    event_id: str = ""  # the allocation event that posted it
    seq: int = 0  # its per-lease seq
    posted_at: datetime  # when the meter appended it
    v: int = 1


class PeriodsClosed(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="periods.closed"):
    """Every period up to and including ``through`` is final. Entries after this marker
    in the stream that belong to a closed period are adjustments on a later invoice."""

    id: str
    at: datetime
    through: str
    v: int = 1


class UnchargedAttempt(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="attempt", gc=False):
    """A delivered lease that ended before the meter saw it ready: it costs nothing, and
    its tenant's invoice lists it as not charged. ``id`` is ``<lease>.x`` (appended
    create-only, like an entry). Should the lease's ``lease.ready`` still come (events of one
    lease may be applied out of order), the lease is billed after all and the fold drops
    the attempt from the invoice (``ReadyMark``)."""

    id: str
    tenant: str
    provider: str
    pool_id: str
    region: str
    model: str
    lease_id: str
    request_id: str = ""
    billing: Billing
    currency: Currency
    delivery: str = ""
    attempt: int = 1
    ended: str  # the ending event's type (lease.failed, lease.lost, ...)
    reason: str = ""
    granted_at: datetime
    ended_at: datetime  # the ending event's time
    period: str  # the month of ``ended_at``
    event_id: str = ""
    seq: int = 0
    posted_at: datetime
    v: int = 1


class ReadyMark(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="ready", gc=False):
    """A delivered lease became ready (``<lease>.ready``, create-only): an uncharged attempt
    of the same lease, folded before or after it, is not listed. (Two replicas may apply a
    lease's ready and its end at once; the one applying the end may post the attempt from
    an account that did not show the ready yet.)"""

    id: str
    tenant: str
    lease_id: str
    at: datetime  # the lease.ready's time: billing started here
    posted_at: datetime
    v: int = 1


LedgerRecord = LedgerEntry | PeriodsClosed | UnchargedAttempt | ReadyMark


class FoldedEntry(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="entry", gc=False):
    """What the aggregate and the budgets read of a ``LedgerEntry``: the follower decodes
    every entry of the ledger in every replica, and skipping the rest (ids, times of the
    interval, seconds) is a fifth of its decoding."""

    tenant: str
    provider: str
    pool_id: str
    region: str
    model: str
    lease_id: str
    billing: Billing
    kind: Literal["usage", "reserved"]
    period: str
    milli: int = MILLI
    quantity: Decimal
    unit_price: Decimal
    currency: Currency
    amount: Decimal
    posted_at: datetime


FoldedRecord = FoldedEntry | PeriodsClosed | UnchargedAttempt | ReadyMark


# --- per-lease accounts (KV, optimistic concurrency) -------------------------------------------
class Account(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    lease_id: str
    tenant: str
    billing: Billing
    seq: int  # the highest per-lease seq applied
    open: bool = True  # False once an ending event was applied
    reserved_billed: bool = False  # the term was posted
    usage_billed: bool = False  # the per-second usage was posted
    # delivered leases (``LeaseInfo.delivery``): billing starts at ready
    ready_at: datetime | None = None  # the ``at`` of its lease.ready, once applied
    ended: str = ""  # the ending event applied before any ready (its type) ...
    ended_at: datetime | None = None  # ... and where its billed interval ends, should a ready still come
    attempt_posted: bool = False  # the uncharged attempt was posted
    term_root: str = ""  # reserved replacements: the lease whose id names the term's entries
    units: int = 0  # the lease's units (a replacement of fewer units is a split: a term of its own)
    entries: tuple[str, ...] = ()  # ids of the ledger entries this lease posted
    billed: Decimal = Decimal(0)
    currency: str = "USD"
    updated_at: datetime | None = None


# --- dead letters -------------------------------------------------------------------------------
class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    at: datetime
    stream: str
    subject: str
    stream_seq: int
    attempts: int
    error: str
    data: str  # the original message (UTF-8, undecodable bytes replaced)


# --- budgets ------------------------------------------------------------------------------------
Amount = Annotated[Decimal, msgspec.Meta(description='decimal string, e.g. "1000.00"')]


class BudgetBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``PUT /v1/budgets/{tenant}``. ``prepaid``: credit bought so far (all-time spend is
    checked against it; top up by raising it). ``limit``: a spending limit per calendar
    month."""

    kind: BudgetKind
    amount: Amount
    currency: Annotated[str, msgspec.Meta(min_length=1, max_length=8)]


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    kind: BudgetKind
    amount: Decimal
    currency: str
    updated_at: datetime
    exhausted: bool = False  # the meter's verdict
    announced: bool = True  # the billing event for ``exhausted`` was published
    changed_at: datetime | None = None  # when ``exhausted`` last changed


class BudgetView(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    kind: BudgetKind
    amount: Decimal
    currency: str
    spent: Decimal  # posted ledger + accrued cost of open per-second leases
    posted: Decimal
    accrued: Decimal
    remaining: Decimal
    exhausted: bool
    window: str  # "all time" (prepaid) or the period (limit)
    updated_at: datetime


# --- invoices -----------------------------------------------------------------------------------
class InvoiceLine(msgspec.Struct, frozen=True, kw_only=True):
    billing: str
    region: str
    model: str
    provider: str
    pool_id: str
    unit_price: Decimal
    unit: Literal["unit-hour", "unit-month"]
    quantity: Decimal  # whole-unit equivalents: a 250-milli share for an hour is 0.25 unit-hours
    milli: int = MILLI  # the share of each unit its leases held (1000: whole units)
    share: str = "whole"  # the same for people: "whole" or "250/1000"
    amount: Decimal
    entries: int
    period: str  # the service period (differs from the invoice's on adjustment lines)


class CurrencySection(msgspec.Struct, frozen=True, kw_only=True):
    currency: str
    lines: list[InvoiceLine]
    adjustments: list[InvoiceLine]  # late charges of periods already final (debit notes)
    subtotal: Decimal
    adjustments_total: Decimal
    total: Decimal


class UnchargedLine(msgspec.Struct, frozen=True, kw_only=True):
    """An attempt that was not charged: a delivered lease that never became ready."""

    lease_id: str
    request_id: str
    pool_id: str
    provider: str
    region: str
    model: str
    billing: str
    delivery: str
    attempt: int
    reason: str
    ended: str  # lease.failed, lease.lost, ...
    granted_at: datetime
    ended_at: datetime
    currency: str
    amount: Decimal = Decimal(0)
    charge: Literal["not charged"] = "not charged"


class Invoice(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    period: str
    status: Literal["draft", "final"]
    final_after: datetime  # when a draft becomes final (end of period + grace)
    issued_at: datetime | None = None
    currencies: list[CurrencySection]
    totals: dict[str, Decimal]
    entries: int
    uncharged: list[UnchargedLine] = []  # attempts that never became ready: listed, not charged


class StoredInvoice(msgspec.Struct, frozen=True, kw_only=True):
    invoice: Invoice
    issued: bool = False  # the invoice.issued event was published
