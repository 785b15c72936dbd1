"""Per-lease accounts: what an allocation event does to a lease's account and which
ledger entries it posts. Pure.

A lease is billed at most once for its usage and at most once for its term, whatever
order its events arrive in: every event carries the whole ``LeaseInfo``, so the first
ending event applied bills per-second usage and the first event of any kind applied for
a reserved lease posts its term. An event with ``seq`` at or below the account's is a
duplicate (or a replay) and changes nothing.

An account only ever records that something was billed (the flags go from False to True,
never back). So an event that posts nothing on a fresh account — a grant or renewal of a
per-second lease — posts nothing on any account, and the consumer neither reads nor
writes an account for it: accounts are written exactly when a lease posts entries.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from services.common.messages import ENDING_EVENTS, AllocEvent

from .model import Account, LedgerEntry
from .pricing import PER_SECOND, RESERVED, Charge, ending_charges, reserved_charges


def event_kind(event: AllocEvent) -> str:
    return type(event).__struct_config__.tag  # type: ignore[return-value]


def account_key(tenant: str, lease_id: str) -> str:
    """KV key: tenant first, so the budget of one tenant can watch just its leases."""
    return f"{tenant}.{lease_id}"


def entry_id(lease_id: str, charge: Charge) -> str:
    """Deterministic: the same charge of the same lease always has the same id, whichever
    event (or replica, or retry) posts it: ``<lease>.u.<YYYY-MM>`` or ``<lease>.r<NN>``."""
    return f"{lease_id}.{charge.key}"


def posts_on_fresh_account(event: AllocEvent) -> bool:
    """Whether ``transition(None, event)`` would post entries: a reserved lease's first
    event (its term) or a per-second lease's ending event (its usage). Everything else
    posts nothing on any account."""
    if event.lease.billing in RESERVED:
        return True
    return isinstance(event, ENDING_EVENTS)


def is_duplicate(account: Account | None, event: AllocEvent) -> bool:
    return account is not None and event.seq <= account.seq


def transition(account: Account | None, event: AllocEvent, *, min_bill_s: int,
               now: datetime) -> tuple[Account, list[LedgerEntry]]:
    """The account after ``event`` and the ledger entries it posts (``event`` must not be a
    duplicate: see ``is_duplicate``)."""
    lease = event.lease
    kind = event_kind(event)
    reserved_billed = account.reserved_billed if account else False
    usage_billed = account.usage_billed if account else False
    is_open = account.open if account else True
    charges: list[Charge] = []
    if lease.billing in RESERVED and not reserved_billed:
        charges += reserved_charges(lease)
        reserved_billed = True
    if isinstance(event, ENDING_EVENTS):
        if lease.billing in PER_SECOND and not usage_billed:
            charges += ending_charges(kind, event.at, lease, min_bill_s=min_bill_s)
            usage_billed = True
        is_open = False
    entries = [LedgerEntry(
        id=entry_id(lease.lease_id, c), tenant=lease.tenant, provider=lease.provider, pool_id=lease.pool_id,
        region=lease.region, model=lease.model, lease_id=lease.lease_id, request_id=lease.request_id,
        billing=lease.billing, kind=c.kind, period=c.period, start=c.start, end=c.end, units=lease.units,
        seconds=c.seconds, quantity=c.quantity, unit_price=lease.unit_price, price_basis=lease.price_basis,
        currency=lease.currency, amount=c.amount, event_id=event.id, seq=event.seq, posted_at=now,
    ) for c in charges]
    billed = (account.billed if account else Decimal(0)) + sum((e.amount for e in entries), Decimal(0))
    new = Account(
        lease_id=lease.lease_id, tenant=lease.tenant, billing=lease.billing, seq=event.seq, open=is_open,
        reserved_billed=reserved_billed, usage_billed=usage_billed,
        entries=(account.entries if account else ()) + tuple(e.id for e in entries), billed=billed,
        currency=lease.currency, updated_at=now)
    return new, entries
