"""Per-lease accounts: what an allocation event does to a lease's account and which
ledger entries it posts. Pure.

A lease is billed at most once for its usage and at most once for its term, whatever
order its events arrive in: every event carries the whole ``LeaseInfo``, so the first
ending event applied bills per-second usage and the first event of any kind applied for
a capacity-only reserved lease posts its term. An event with ``seq`` at or below the
account's is a duplicate (or a replay) and changes nothing.

A delivered lease (``LeaseInfo.delivery``) is billed from its ``lease.ready``: the ready
posts a reserved term, a ready mark, and records ``ready_at``; the ending event bills
usage from it. An ending event applied before any ready posts an uncharged attempt and
keeps the end; a ready applied after that (the two were published by different broker
replicas) bills ``[ready, end)`` then, and its ready mark takes the attempt off the
invoice. A lease that never became ready costs nothing.

An account only ever records facts (billed, ready, ended: set once, never undone). So an
event that posts or records nothing on a fresh account — a grant, provisioning or renewal
— does so on no account, and the consumer neither reads nor writes an account for it:
accounts are written exactly when a lease posts entries or becomes ready.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from services.common.messages import ENDING_EVENTS, AllocEvent, LeaseInfo, LeaseReady

from .model import Account, LedgerEntry, LedgerRecord, ReadyMark, UnchargedAttempt
from .periods import period_of
from .pricing import (
    NO_MINIMUM,
    PER_SECOND,
    RESERVED,
    Charge,
    billed_end,
    billing_start,
    delivers,
    ending_charges,
    reserved_charges,
    usage_charges,
)


def event_kind(event: AllocEvent) -> str:
    return type(event).__struct_config__.tag  # type: ignore[return-value]


def account_key(tenant: str, lease_id: str) -> str:
    """KV key: tenant first, so the budget of one tenant can watch just its leases."""
    return f"{tenant}.{lease_id}"


def entry_id(lease_id: str, charge: Charge) -> str:
    """Deterministic: the same charge of the same lease always has the same id, whichever
    event (or replica, or retry) posts it: ``<lease>.u.<YYYY-MM>`` or ``<lease>.r<NN>``."""
    return f"{lease_id}.{charge.key}"


class MissingPredecessor(LookupError):
    """A reserved replacement whose term root is only known from the account of the lease it
    replaces, which the meter has not written yet: retried later (that lease's events come
    first in the stream)."""


def needs_account(event: AllocEvent) -> bool:
    """Whether ``transition(None, event)`` would post or record anything: a capacity-only
    reserved lease's first event (its term), an ending event (usage, or an uncharged
    attempt), a delivered lease's ready (billing starts). Everything else — grants,
    provisioning, renewals, replacements of per-second leases — changes no account."""
    lease = event.lease
    if isinstance(event, ENDING_EVENTS):
        return True
    if delivers(lease):
        return isinstance(event, LeaseReady)
    return lease.billing in RESERVED


def predecessor_key(event: AllocEvent) -> str | None:
    """The account a reserved replacement's term depends on (the lease it replaces)."""
    lease = event.lease
    if lease.billing in RESERVED and lease.replaces and lease.replaces != lease.lease_id:
        return account_key(lease.tenant, lease.replaces)
    return None


def term_root(lease: LeaseInfo, predecessor: Account | None) -> tuple[str, bool]:
    """(the lease whose id names this lease's term entries, whether that term is charged).

    A replacement of a reserved lease carries its term on (same request, the old
    ``expires_at``): its entries are named after the first lease of the chain, so that a
    term is in the ledger once whichever lease of the chain posts it (create-only
    appends), and it is not posted at all when the lease it replaces was charged. A
    replacement placed as several smaller leases (a split) names its term after itself:
    each part owes its own units' term if the replaced lease's was never charged."""
    if not lease.replaces or lease.replaces == lease.lease_id:
        return lease.lease_id, False
    if predecessor is not None:
        whole = predecessor.units in (0, lease.units)
        return (predecessor.term_root or predecessor.lease_id) if whole else lease.lease_id, \
            predecessor.reserved_billed
    if lease.attempt <= 2:  # it replaces the first lease of its chain
        return lease.replaces, False
    raise MissingPredecessor(f"lease {lease.lease_id} replaces {lease.replaces}, whose account is not written yet")


def is_duplicate(account: Account | None, event: AllocEvent) -> bool:
    """Applied before. A delivered lease's ready is judged by whether a ready was applied,
    not by ``seq``: it may come after its lease's ending event (published by another broker
    replica a moment earlier) and must still start billing."""
    if account is None:
        return False
    if isinstance(event, LeaseReady) and delivers(event.lease):
        return account.ready_at is not None
    return event.seq <= account.seq


def _reason(event: AllocEvent, kind: str) -> str:
    reason = getattr(event, "reason", "")
    return reason or f"{kind.removeprefix('lease.')} before it was ready"


def transition(account: Account | None, event: AllocEvent, *, min_bill_s: int, now: datetime,
               predecessor: Account | None = None) -> tuple[Account, list[LedgerRecord]]:
    """The account after ``event`` and the ledger records it posts (``event`` must not be a
    duplicate: see ``is_duplicate``). ``predecessor``: the account of the lease a reserved
    replacement replaces (``predecessor_key``), if there is one."""
    lease = event.lease
    kind = event_kind(event)
    old = account or Account(lease_id=lease.lease_id, tenant=lease.tenant, billing=lease.billing, seq=0,
                             currency=lease.currency)
    reserved_billed, usage_billed, attempt_posted = old.reserved_billed, old.usage_billed, old.attempt_posted
    ready_at, ended, ended_at, root = old.ready_at, old.ended, old.ended_at, old.term_root
    if isinstance(event, LeaseReady) and delivers(lease) and ready_at is None:
        ready_at = event.at
    start = billing_start(lease, ready_at)
    ending = isinstance(event, ENDING_EVENTS)
    charges: list[Charge] = []
    if lease.billing in RESERVED and lease.replaces and not root:
        # a replacement: its term is its chain's; charged already if the lease it replaces
        # had it charged (or carried it, charged, from an earlier one)
        root, covered = term_root(lease, predecessor)
        reserved_billed = reserved_billed or covered
    if lease.billing in RESERVED and not reserved_billed and start is not None:
        charges += reserved_charges(lease, start)
        reserved_billed = True
    if lease.billing in PER_SECOND and not usage_billed and start is not None:
        if ending:
            charges += ending_charges(kind, event.at, lease, min_bill_s=min_bill_s, start=start)
            usage_billed = True
        elif ended:  # it ended before this ready was applied: bill [ready, the recorded end)
            charges += usage_charges(lease, ended_at or start, min_bill_s=min_bill_s, start=start,
                                     apply_minimum=ended not in NO_MINIMUM)
            usage_billed = True
    records: list[LedgerRecord] = [LedgerEntry(
        id=entry_id(root or lease.lease_id if c.kind == "reserved" else lease.lease_id, c), tenant=lease.tenant,
        provider=lease.provider, pool_id=lease.pool_id,
        region=lease.region, model=lease.model, lease_id=lease.lease_id, request_id=lease.request_id,
        billing=lease.billing, kind=c.kind, period=c.period, start=c.start, end=c.end, units=lease.units,
        milli=lease.milli,
        seconds=c.seconds, quantity=c.quantity, unit_price=lease.unit_price, price_basis=lease.price_basis,
        currency=lease.currency, amount=c.amount, event_id=event.id, seq=event.seq, posted_at=now,
    ) for c in charges]
    if ready_at is not None and old.ready_at is None:
        records.append(ReadyMark(id=f"{lease.lease_id}.ready", tenant=lease.tenant, lease_id=lease.lease_id,
                                 at=ready_at, posted_at=now))
    if ending and start is None and not ended:
        # ended while provisioning (as far as the meter knows): nothing is billed, the
        # invoice lists the attempt; the end is kept should its ready still come
        ended, ended_at = kind, billed_end(kind, event.at, lease)
        if not attempt_posted:
            records.append(UnchargedAttempt(
                id=f"{lease.lease_id}.x", tenant=lease.tenant, provider=lease.provider, pool_id=lease.pool_id,
                region=lease.region, model=lease.model, lease_id=lease.lease_id, request_id=lease.request_id,
                billing=lease.billing, currency=lease.currency, delivery=lease.delivery, attempt=lease.attempt,
                ended=kind, reason=_reason(event, kind)[:500], granted_at=lease.granted_at, ended_at=event.at,
                period=period_of(event.at), event_id=event.id, seq=event.seq, posted_at=now))
            attempt_posted = True
    amount = sum((r.amount for r in records if isinstance(r, LedgerEntry)), Decimal(0))
    new = Account(
        lease_id=lease.lease_id, tenant=lease.tenant, billing=lease.billing, seq=max(old.seq, event.seq),
        open=old.open and not ending, reserved_billed=reserved_billed, usage_billed=usage_billed,
        ready_at=ready_at, ended=ended, ended_at=ended_at, attempt_posted=attempt_posted, term_root=root,
        units=lease.units,
        entries=old.entries + tuple(r.id for r in records), billed=old.billed + amount,
        currency=lease.currency, updated_at=now)
    return new, records


def changed(old: Account | None, new: Account) -> bool:
    """Whether ``new`` records something ``old`` did not (and so must be written): what was
    billed or posted, a ready, an end kept for a late ready. (Not ``open`` nor ``seq`` alone:
    the end of a reserved lease whose term is posted writes nothing, as before.)"""
    if old is None:
        return (new.reserved_billed or new.usage_billed or new.attempt_posted or new.ready_at is not None
                or bool(new.ended) or bool(new.term_root))
    return ((old.reserved_billed, old.usage_billed, old.attempt_posted, old.ready_at, old.ended, old.term_root)
            != (new.reserved_billed, new.usage_billed, new.attempt_posted, new.ready_at, new.ended, new.term_root))
