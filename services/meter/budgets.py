"""Budgets: a tenant's spend against its prepaid credit or monthly limit, and the billing
events that tell the broker when it runs out (``budget.exhausted``) or is topped up
(``budget.restored``).

Spend = posted ledger charges (the aggregate) + the accrued cost of the tenant's open
per-second leases up to now. Open leases are followed, for tenants that have a budget
only, straight from the allocation stream (the broker's durable record; a consumer
filtered to ``<prefix>.events.alloc.*.<tenant>``): the consumer does not write an account
for a grant, which posts nothing. A delivered lease accrues from its ``lease.ready``:
while it is provisioning it costs nothing.

Every replica evaluates every budget (periodically and when entries are posted); the
verdict is a field of the budget's KV record changed with optimistic concurrency, so one
replica wins each transition. It then publishes the event (id deterministic per record
revision, so a repeat is de-duplicated) and marks it announced; a crash in between is
repaired by the next evaluation, which finds the verdict unannounced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

import msgspec
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.common.jetstream import follow_bucket, unfollow
from services.common.lifecycle import forever, stop_tasks, wait_event
from services.common.messages import (
    ENDING_EVENTS,
    AllocEvent,
    BudgetExhausted,
    BudgetRestored,
    LeaseInfo,
    LeaseReady,
)
from services.common.nats_conn import publish_event
from services.common.subjects import ALLOC, Subjects

from .aggregate import Aggregate
from .ledger import encode
from .model import Budget, BudgetView, LedgerEntry
from .periods import period_of
from .pricing import PER_SECOND, accrued, billing_start, delivers, round_money

log = logging.getLogger("meter.budgets")
_budget = msgspec.json.Decoder(Budget)
_alloc = msgspec.json.Decoder(AllocEvent)


class Budgets:
    def __init__(self, js: JetStreamContext, kv: KeyValue, aggregate: Aggregate, subjects: Subjects,
                 min_bill_s: int, clock: Callable[[], datetime]) -> None:
        self.js, self.kv, self.aggregate = js, kv, aggregate
        self.subjects, self.min_bill_s, self.clock = subjects, min_bill_s, clock
        self.records: dict[str, tuple[int, Budget]] = {}
        self.open_leases: dict[str, dict[str, LeaseInfo]] = {}
        self.ready_at: dict[str, dict[str, datetime]] = {}  # tenant -> delivered lease -> its lease.ready
        self._watchers: dict[str, asyncio.Task] = {}
        self._loaded: dict[str, asyncio.Event] = {}
        # leases whose usage the ledger already holds: never accrued again (their account
        # may say "open" for a moment after the entry is folded)
        self._posted: dict[str, dict[str, None]] = {}
        self._budget_watch: JetStreamContext.PushSubscription | None = None
        self.kick = asyncio.Event()
        self.dirty: set[str] = set()
        self.ready = asyncio.Event()
        self._stopping = False

    # --- following the buckets -----------------------------------------------------------------
    async def start(self) -> None:
        """Returns once every budget of the bucket is in."""
        self._budget_watch = await follow_bucket(self.js, (await self.kv.status()).bucket, self._on_budget)
        self.ready.set()

    async def stop(self) -> None:
        self._stopping = True
        await unfollow(self._budget_watch)
        await stop_tasks(list(self._watchers.values()))

    def _on_budget(self, key: str, value: bytes | None, revision: int) -> None:
        if not value:
            self.records.pop(key, None)
        else:
            self._remember(revision, _budget.decode(value))

    def _remember(self, revision: int, budget: Budget) -> None:
        seen = self.records.get(budget.tenant)
        if seen is None or seen[0] < revision:
            self.records[budget.tenant] = (revision, budget)
        if budget.tenant not in self._watchers:
            self._loaded[budget.tenant] = asyncio.Event()
            self._watchers[budget.tenant] = asyncio.create_task(self._watch_leases(budget.tenant))
        self.kick.set()

    async def _watch_leases(self, tenant: str) -> None:
        """Open per-second leases of one tenant, from its allocation events; after an
        error followed again (``forever``) from the first event not seen."""
        stream = self.subjects.stream(ALLOC)
        leases: dict[str, LeaseInfo] = {}
        ready: dict[str, datetime] = {}
        seqs: dict[str, int] = {}  # lease -> highest seq seen (an ended lease: -1, for good)
        self.open_leases[tenant] = leases
        self.ready_at[tenant] = ready
        next_seq = 1

        async def follow() -> None:
            nonlocal next_seq
            sub = await self.js.pull_subscribe(
                self.subjects.alloc("*", tenant), stream=stream,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=next_seq,
                                      ack_policy=AckPolicy.NONE, inactive_threshold=60.0))
            try:
                while not self._stopping:
                    if not self._loaded[tenant].is_set() and (await sub.consumer_info()).num_pending == 0:
                        self._loaded[tenant].set()
                    try:
                        msgs = await sub.fetch(1000, timeout=1.0)
                    except TimeoutError:
                        continue
                    for msg in msgs:
                        next_seq = msg.metadata.sequence.stream + 1
                        try:
                            event = _alloc.decode(msg.data)
                        except (msgspec.DecodeError, msgspec.ValidationError):
                            continue
                        lease = event.lease
                        if lease.billing not in PER_SECOND or seqs.get(lease.lease_id, 0) < 0:
                            continue
                        if isinstance(event, ENDING_EVENTS) or lease.lease_id in self._posted.get(tenant, {}):
                            seqs[lease.lease_id] = -1
                            leases.pop(lease.lease_id, None)
                            ready.pop(lease.lease_id, None)
                            continue
                        if isinstance(event, LeaseReady) and delivers(lease):
                            ready.setdefault(lease.lease_id, event.at)
                        if event.seq > seqs.get(lease.lease_id, 0):
                            seqs[lease.lease_id] = event.seq
                            leases[lease.lease_id] = lease
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

        await forever(f"lease watch of {tenant}", follow, until=lambda: self._stopping, logger=log)

    async def leases_loaded(self, tenant: str, timeout: float = 5.0) -> None:
        loaded = self._loaded.get(tenant)
        if loaded is not None:
            await wait_event(loaded, timeout)

    # --- reading and changing -------------------------------------------------------------------
    async def get(self, tenant: str) -> tuple[int, Budget] | None:
        try:
            entry = await self.kv.get(tenant)
        except KeyNotFoundError:
            return None
        budget = _budget.decode(entry.value)
        self._remember(entry.revision, budget)
        return entry.revision, budget

    def spend(self, budget: Budget, now: datetime) -> tuple[Decimal, Decimal, str | None]:
        """(posted, accrued, period or None for all time)."""
        period = period_of(now) if budget.kind == "limit" else None
        posted = self.aggregate.spent(budget.tenant, budget.currency, period)
        ready = self.ready_at.get(budget.tenant, {})
        open_cost = Decimal(0)
        for lease in self.open_leases.get(budget.tenant, {}).values():
            start = billing_start(lease, ready.get(lease.lease_id))
            if start is not None and lease.currency == budget.currency:  # provisioning: nothing yet
                open_cost += accrued(lease, now, min_bill_s=self.min_bill_s, start=start, period=period)
        return posted, open_cost, period

    def view(self, budget: Budget) -> BudgetView:
        now = self.clock()
        posted, open_cost, period = self.spend(budget, now)
        spent = posted + open_cost

        def m(x: Decimal) -> Decimal:
            return round_money(x, budget.currency)

        return BudgetView(tenant=budget.tenant, kind=budget.kind, amount=m(budget.amount), currency=budget.currency,
                          spent=m(spent), posted=m(posted), accrued=m(open_cost), remaining=m(budget.amount - spent),
                          exhausted=budget.exhausted, window=period or "all time", updated_at=budget.updated_at)

    async def put(self, tenant: str, kind: str, amount: Decimal, currency: str) -> Budget:
        """Create or replace a budget; the verdict and its announcement carry over (the
        evaluation that follows decides whether the change restores or exhausts it)."""
        now = self.clock()
        while True:
            current = await self.get(tenant)
            if current is None:
                budget = Budget(tenant=tenant, kind=kind, amount=amount, currency=currency,  # type: ignore[arg-type]
                                updated_at=now, changed_at=now)
                try:
                    revision = await self.kv.create(tenant, encode(budget))
                except KeyWrongLastSequenceError:
                    continue
            else:
                revision, old = current
                budget = msgspec.structs.replace(old, kind=kind, amount=amount, currency=currency, updated_at=now)
                try:
                    revision = await self.kv.update(tenant, encode(budget), last=revision)
                except KeyWrongLastSequenceError:
                    continue
            self._remember(revision, budget)
            await self.leases_loaded(tenant)
            await self.evaluate(tenant)
            return self.records[tenant][1]

    # --- evaluating -----------------------------------------------------------------------------
    def mark(self, entries: list[LedgerEntry]) -> None:
        """Entries were folded into the aggregate: their tenants' budgets need a look, and
        a lease whose usage is posted stops accruing."""
        hit = False
        for e in entries:
            if e.tenant not in self.records:
                continue
            hit = True
            self.dirty.add(e.tenant)
            if e.kind == "usage":
                self.open_leases.get(e.tenant, {}).pop(e.lease_id, None)
                self.ready_at.get(e.tenant, {}).pop(e.lease_id, None)
                posted = self._posted.setdefault(e.tenant, {})
                posted[e.lease_id] = None
                if len(posted) > 100_000:
                    del posted[next(iter(posted))]
        if hit:
            self.kick.set()

    async def evaluate_all(self) -> None:
        self.dirty.clear()
        for tenant in list(self.records):
            try:
                await self.evaluate(tenant)
            except Exception:
                log.exception("budget of %s not evaluated", tenant)

    async def evaluate(self, tenant: str) -> None:
        for _ in range(5):
            seen = self.records.get(tenant)
            if seen is None:
                return
            revision, budget = seen
            now = self.clock()
            posted, open_cost, _ = self.spend(budget, now)
            spent = posted + open_cost
            exhausted = spent >= budget.amount
            try:
                if exhausted != budget.exhausted:
                    budget = msgspec.structs.replace(budget, exhausted=exhausted, announced=False, changed_at=now)
                    revision = await self.kv.update(tenant, encode(budget), last=revision)
                    self._remember(revision, budget)
                if not budget.announced:
                    kind = BudgetExhausted if budget.exhausted else BudgetRestored
                    event = kind(id=f"budget.{tenant}.{revision}.{'exhausted' if budget.exhausted else 'restored'}",
                                 at=budget.changed_at or now, tenant=tenant, currency=budget.currency,
                                 budget=budget.amount, spent=spent)
                    await publish_event(self.js, self.subjects.billing(tenant), event)
                    log.warning("budget of %s %s: spent %s of %s %s", tenant,
                                "exhausted" if budget.exhausted else "restored", spent, budget.amount,
                                budget.currency)
                    budget = msgspec.structs.replace(budget, announced=True)
                    revision = await self.kv.update(tenant, encode(budget), last=revision)
                    self._remember(revision, budget)
                return
            except KeyWrongLastSequenceError:
                await self.get(tenant)  # another replica (or a PUT) changed it: look again
