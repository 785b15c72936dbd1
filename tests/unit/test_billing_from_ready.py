"""Billing from ready (issue 12), pure: a delivered lease is billed from its lease.ready, an
attempt that never became ready costs nothing and is listed on the invoice, events of
one lease applied in any order bill the same, and a reserved term carried on by a
replacement is charged once."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import pytest

from services.common.messages import (
    AllocEvent,
    LeaseFailed,
    LeaseGranted,
    LeaseInfo,
    LeaseLost,
    LeaseProvisioning,
    LeaseReady,
    LeaseReleased,
    LeaseRenewed,
)
from services.meter.accounts import (
    MissingPredecessor,
    changed,
    is_duplicate,
    needs_account,
    predecessor_key,
    transition,
)
from services.meter.aggregate import Aggregate
from services.meter.invoices import build_invoice
from services.meter.model import LedgerEntry, ReadyMark, UnchargedAttempt
from services.meter.pricing import accrued, billing_start, ending_charges, reserved_charges, usage_charges

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=1)


def lease(**over: object) -> LeaseInfo:
    base: dict = dict(lease_id="lease_1", request_id="req_1", tenant="t1", pool_id="p1", provider="acme",
                      region="cn-yrd", model="nvidia-a100-sxm-80gb", units=1, billing="on_demand",
                      unit_price=Decimal("36"), price_basis="unit_hour", currency="USD", granted_at=T0,
                      expires_at=T0 + timedelta(days=30), term_months=0, ttl_s=0, delivery="ssh",
                      provision_timeout_s=300)
    if over.get("billing") == "reserved_month":
        base.update(price_basis="unit_month", term_months=1, unit_price=Decimal("1000"),
                    expires_at=T0 + timedelta(hours=730))
    base.update(over)
    return LeaseInfo(**base)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ev(kind: type, info: LeaseInfo, seq: int, when: datetime, **extra: object) -> AllocEvent:
    return kind(id=f"{info.lease_id}.{seq}", at=when, lease=info, seq=seq, **extra)


def run(events: list[AllocEvent], account=None, predecessor=None):
    """Apply events as the consumer does (duplicates skipped); (account, records)."""
    records = []
    for event in events:
        if is_duplicate(account, event):
            continue
        account, posted = transition(account, event, min_bill_s=60, now=NOW, predecessor=predecessor)
        records += posted
    return account, records


def charges(records) -> list[LedgerEntry]:
    return [r for r in records if isinstance(r, LedgerEntry)]


def amounts(records) -> Decimal:
    return sum((r.amount for r in records if isinstance(r, LedgerEntry)), Decimal(0))


# --- pricing --------------------------------------------------------------------------------------
def test_billing_starts_at_grant_for_capacity_only_and_at_ready_when_delivered() -> None:
    assert billing_start(lease(delivery=""), None) == T0
    assert billing_start(lease(), None) is None
    assert billing_start(lease(), at(90)) == at(90)
    # 36/unit-hour = 0.01/s: 100 s from ready, not 190 s from grant
    assert sum(c.amount for c in usage_charges(lease(), at(190), min_bill_s=60, start=at(90))) == Decimal("1.00")
    assert sum(c.amount for c in ending_charges("lease.released", at(190), lease(), min_bill_s=60,
                                               start=at(90))) == Decimal("1.00")
    # the minimum counts from ready too
    assert sum(c.amount for c in usage_charges(lease(), at(100), min_bill_s=60, start=at(90))) == Decimal("0.60")
    assert accrued(lease(), at(190), min_bill_s=60, start=at(90)) == Decimal("1.00")


def test_a_reserved_term_runs_from_its_start() -> None:
    month = lease(billing="reserved_month", granted_at=datetime(2026, 3, 31, 23, 0, tzinfo=UTC))
    [c] = reserved_charges(month)
    assert c.period == "2026-03"
    [c] = reserved_charges(month, datetime(2026, 4, 1, 0, 30, tzinfo=UTC))  # ready in April
    assert c.period == "2026-04" and c.amount == Decimal("1000.00")


# --- accounts ------------------------------------------------------------------------------------
def test_provisioning_then_ready_then_released_is_billed_from_ready() -> None:
    info = lease()
    events = [ev(LeaseProvisioning, info, 1, T0), ev(LeaseReady, info, 2, at(120)),
              ev(LeaseReleased, info, 3, at(420))]
    assert [needs_account(e) for e in events] == [False, True, True]
    account, records = run(events)
    [entry] = charges(records)
    assert [r.id for r in records if isinstance(r, ReadyMark)] == ["lease_1.ready"]
    assert entry.amount == Decimal("3.00") and entry.start == at(120) and entry.id == "lease_1.u.2026-03"
    assert account.ready_at == at(120) and account.usage_billed and not account.attempt_posted


def test_failed_before_ready_costs_nothing_and_posts_one_uncharged_attempt() -> None:
    info = lease()
    events = [ev(LeaseProvisioning, info, 1, T0), ev(LeaseFailed, info, 2, at(300), reason="not ready within 300 s")]
    account, records = run(events)
    [attempt] = records
    assert isinstance(attempt, UnchargedAttempt) and attempt.id == "lease_1.x"
    assert attempt.reason == "not ready within 300 s" and attempt.ended == "lease.failed"
    assert attempt.pool_id == "p1" and attempt.provider == "acme" and attempt.period == "2026-03"
    assert account.billed == 0 and account.attempt_posted and changed(None, account)
    # a redelivery of either event posts nothing
    assert run(events, account)[1] == []


@pytest.mark.parametrize("kind,reason", [(LeaseLost, "pool offline"), (LeaseReleased, "released before it was ready")])
def test_any_end_while_provisioning_costs_nothing(kind: type, reason: str) -> None:
    info = lease(billing="reserved_month")  # no minimum, no term
    extra = {"reason": reason} if kind is LeaseLost else {}
    account, records = run([ev(LeaseProvisioning, info, 1, T0), ev(kind, info, 2, at(30), **extra)])
    assert [type(r) for r in records] == [UnchargedAttempt] and records[0].reason == reason
    assert not account.reserved_billed and account.billed == 0


def test_ready_applied_after_its_end_bills_ready_to_end_and_only_once() -> None:
    info = lease()
    ready, released = ev(LeaseReady, info, 2, at(120)), ev(LeaseReleased, info, 3, at(420))
    account, first = run([released])
    assert [type(r) for r in first] == [UnchargedAttempt]  # as far as the meter knew
    assert not is_duplicate(account, ready)  # a lower seq, yet not applied before
    account, late = run([ready], account)
    assert amounts(late) == Decimal("3.00") and charges(late)[0].start == at(120) and charges(late)[0].end == at(420)
    assert is_duplicate(account, ready) and run([ready, released], account)[1] == []


def test_every_order_and_every_redelivery_bills_the_same() -> None:
    """Whatever order the stream (or a replay) hands a delivered lease's events in, and
    whatever is delivered twice, the charges posted are the same."""
    for billing, expect in (("on_demand", Decimal("3.00")), ("reserved_month", Decimal("1000.00"))):
        info = lease(billing=billing)
        events = [ev(LeaseProvisioning, info, 1, T0), ev(LeaseRenewed, info, 2, at(60)),
                  ev(LeaseReady, info, 3, at(120)), ev(LeaseReleased, info, 4, at(420))]
        for order in itertools.permutations(events + [events[2]]):
            _, records = run(list(order))
            charged = {r.id: r.amount for r in records if isinstance(r, LedgerEntry)}
            assert sum(charged.values()) == expect, (billing, [type(e).__name__ for e in order])


def test_capacity_only_leases_bill_as_before() -> None:
    info = lease(delivery="")
    account, records = run([ev(LeaseGranted, info, 1, T0), ev(LeaseReleased, info, 2, at(300))])
    assert amounts(records) == Decimal("3.00") and records[0].start == T0
    month = lease(delivery="", billing="reserved_month")
    assert needs_account(ev(LeaseGranted, month, 1, T0))
    assert amounts(run([ev(LeaseGranted, month, 1, T0)])[1]) == Decimal("1000.00")


def test_delivered_reserved_term_is_charged_at_ready() -> None:
    info = lease(billing="reserved_month")
    assert run([ev(LeaseProvisioning, info, 1, T0)])[1] == []
    _, records = run([ev(LeaseProvisioning, info, 1, T0), ev(LeaseReady, info, 2, at(600))])
    [entry] = charges(records)
    assert entry.id == "lease_1.r01" and entry.start == at(600) and entry.amount == Decimal("1000.00")


def test_replacement_of_a_charged_term_is_not_charged_again() -> None:
    old = lease(billing="reserved_month")
    old_account, old_records = run([ev(LeaseProvisioning, old, 1, T0), ev(LeaseReady, old, 2, at(60)),
                                    ev(LeaseLost, old, 3, at(3600), reason="unhealthy")])
    assert amounts(old_records) == Decimal("1000.00")
    new = lease(billing="reserved_month", lease_id="lease_2", pool_id="p2", attempt=2, replaces="lease_1",
                granted_at=at(3601), expires_at=old.expires_at)
    assert predecessor_key(ev(LeaseReady, new, 2, at(3700))) == "t1.lease_1"
    account, records = run([ev(LeaseProvisioning, new, 1, at(3601)), ev(LeaseReady, new, 2, at(3700))],
                           predecessor=old_account)
    assert charges(records) == [] and account.reserved_billed and account.term_root == "lease_1"
    # and a third attempt after it, covered through the chain
    third = lease(billing="reserved_month", lease_id="lease_3", pool_id="p3", attempt=3, replaces="lease_2",
                  granted_at=at(7200), expires_at=old.expires_at)
    later, records = run([ev(LeaseReady, third, 2, at(7300))], predecessor=account)
    assert charges(records) == [] and later.term_root == "lease_1"


def test_replacement_of_a_term_never_charged_is_charged_under_the_first_lease_id() -> None:
    old = lease(billing="reserved_month")
    old_account, old_records = run([ev(LeaseProvisioning, old, 1, T0), ev(LeaseFailed, old, 2, at(300))])
    assert amounts(old_records) == 0
    new = lease(billing="reserved_month", lease_id="lease_2", pool_id="p2", attempt=2, replaces="lease_1",
                granted_at=at(301), expires_at=old.expires_at)
    _, records = run([ev(LeaseReady, new, 2, at(400))], predecessor=old_account)
    [entry] = charges(records)
    assert entry.amount == Decimal("1000.00") and entry.lease_id == "lease_2"
    # the id is the first lease's: had lease_1 charged it, the ledger would refuse this one
    assert entry.id == "lease_1.r01"
    # without the predecessor's account (not applied yet) the second attempt still knows
    # its root; a third one must wait for it
    assert charges(run([ev(LeaseReady, new, 2, at(400))])[1])[0].id == "lease_1.r01"
    third = lease(billing="reserved_month", lease_id="lease_3", attempt=3, replaces="lease_2")
    with pytest.raises(MissingPredecessor):
        run([ev(LeaseReady, third, 2, at(500))])


def test_a_term_carried_through_an_attempt_that_never_became_ready_is_charged_once() -> None:
    def attempt(n: int, **over: object) -> LeaseInfo:
        return lease(billing="reserved_month", lease_id=f"lease_{n}", pool_id=f"p{n}", attempt=n,
                     replaces=f"lease_{n - 1}" if n > 1 else "", granted_at=at(1000 * n), **over)

    # charged, then a replacement that failed, then one that became ready: charged once
    a, _ = run([ev(LeaseReady, attempt(1), 2, at(60)), ev(LeaseLost, attempt(1), 3, at(900))])
    b, records = run([ev(LeaseFailed, attempt(2), 2, at(2100))], predecessor=a)
    assert [type(r) for r in records] == [UnchargedAttempt] and b.term_root == "lease_1" and b.reserved_billed
    c, records = run([ev(LeaseReady, attempt(3), 2, at(3100))], predecessor=b)
    assert charges(records) == [] and c.term_root == "lease_1"
    # never charged twice over: the third is charged, under the first lease's id
    a, _ = run([ev(LeaseFailed, attempt(1), 2, at(300))])
    b, _ = run([ev(LeaseFailed, attempt(2), 2, at(2100))], predecessor=a)
    assert not b.reserved_billed and b.term_root == "lease_1"
    [entry] = charges(run([ev(LeaseReady, attempt(3), 2, at(3100))], predecessor=b)[1])
    assert entry.id == "lease_1.r01" and entry.lease_id == "lease_3" and entry.start == at(3100)


def test_a_split_replacement_of_a_term_never_charged_charges_each_part_its_own_term() -> None:
    old = lease(billing="reserved_month", units=8)
    old_account, _ = run([ev(LeaseFailed, old, 2, at(300))])
    parts = [lease(billing="reserved_month", units=4, lease_id=f"lease_1{p}", pool_id=f"p{p}", attempt=2,
                   replaces="lease_1", expires_at=old.expires_at) for p in "ab"]
    posted = [charges(run([ev(LeaseReady, part, 2, at(400))], predecessor=old_account)[1]) for part in parts]
    assert [[(e.id, e.amount) for e in p] for p in posted] == [[("lease_1a.r01", Decimal("4000.00"))],
                                                              [("lease_1b.r01", Decimal("4000.00"))]]
    # had the replaced lease been charged, neither part would be
    paid, _ = run([ev(LeaseReady, old, 2, at(60)), ev(LeaseLost, old, 3, at(300))])
    assert [charges(run([ev(LeaseReady, part, 2, at(400))], predecessor=paid)[1]) for part in parts] == [[], []]


def test_per_second_replacement_is_billed_from_its_own_ready() -> None:
    new = lease(lease_id="lease_2", attempt=2, replaces="lease_1", granted_at=at(400))
    assert predecessor_key(ev(LeaseReady, new, 2, at(500))) is None
    _, records = run([ev(LeaseProvisioning, new, 1, at(400)), ev(LeaseReady, new, 2, at(500)),
                      ev(LeaseReleased, new, 3, at(800))])
    assert amounts(records) == Decimal("3.00") and charges(records)[0].id == "lease_2.u.2026-03"


# --- aggregate and invoices ---------------------------------------------------------------------
def _entry(lease_id: str, amount: str) -> LedgerEntry:
    return LedgerEntry(id=f"{lease_id}.u.2026-03", tenant="t1", provider="acme", pool_id="p1", region="cn-yrd",
                       model="nvidia-a100-sxm-80gb", lease_id=lease_id, billing="on_demand", kind="usage",
                       period="2026-03", start=T0, end=at(100), units=1, quantity=Decimal("0.1"),
                       unit_price=Decimal("36"), currency="USD", amount=Decimal(amount), posted_at=NOW)


def test_invoice_lists_uncharged_attempts_beside_the_charges() -> None:
    failed = lease(lease_id="lease_f", pool_id="p9", provider="flaky")
    _, [attempt] = run([ev(LeaseFailed, failed, 2, at(300), reason="image pull failed")])
    agg = Aggregate()
    agg.apply(1, _entry("lease_ok", "1.00"))
    agg.apply(2, attempt)
    agg.apply(3, attempt)  # a replayed stream sequence: once
    inv = build_invoice("t1", "2026-03", agg.invoice_cells("t1", "2026-03"), final=False, final_after=NOW,
                        attempts=agg.invoice_attempts("t1", "2026-03"))
    assert inv.totals == {"USD": Decimal("1.00")} and inv.entries == 1
    [line] = inv.uncharged
    assert (line.lease_id, line.pool_id, line.provider, line.reason, line.charge, line.amount) == (
        "lease_f", "p9", "flaky", "image pull failed", "not charged", 0)
    assert agg.invoice_periods("t1") == ["2026-03"] and agg.tenants_with_invoice("2026-03") == ["t1"]
    body = msgspec.json.decode(msgspec.json.encode(inv))
    assert body["uncharged"][0]["charge"] == "not charged"
    # its ready mark folded later (its ready was applied after its end): no longer listed
    _, records = run([ev(LeaseReady, failed, 1, at(100))])
    [mark] = [r for r in records if isinstance(r, ReadyMark)]
    agg.apply(4, mark)
    assert agg.invoice_attempts("t1", "2026-03") == []


def test_an_attempt_folded_after_its_lease_was_ready_is_not_listed() -> None:
    """Two replicas applied the lease's ready and its end at once: the end's replica posted
    the attempt (from an account that did not show the ready yet) after the ready's replica
    posted the ready mark."""
    _, [attempt] = run([ev(LeaseReleased, lease(), 3, at(300))])
    _, [mark] = run([ev(LeaseReady, lease(), 2, at(100))])
    assert isinstance(mark, ReadyMark) and mark.id == "lease_1.ready"
    agg = Aggregate()
    agg.apply(1, mark)
    agg.apply(2, attempt)
    assert agg.invoice_attempts("t1", "2026-03") == [] and list(agg.ready_leases) == ["lease_1"]


def test_a_tenant_with_only_uncharged_attempts_has_an_invoice() -> None:
    _, [attempt] = run([ev(LeaseFailed, lease(tenant="t9"), 2, at(300))])
    agg = Aggregate()
    agg.apply(1, attempt)
    assert agg.knows_tenant("t9") and agg.invoice_periods("t9") == ["2026-03"]
    inv = build_invoice("t9", "2026-03", agg.invoice_cells("t9", "2026-03"), final=False, final_after=NOW,
                        attempts=agg.invoice_attempts("t9", "2026-03"))
    assert inv.totals == {} and [x.reason for x in inv.uncharged] == ["failed before it was ready"]
