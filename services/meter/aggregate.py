"""The in-memory aggregate of the ledger: a pure fold over the ledger stream, in stream order.

Every replica folds the same stream, so every replica holds the same aggregate (and a
fresh one rebuilt from zero gives the same totals). Entries are summed into cells, one
per (tenant, currency, invoice period, service period, billing, region, model, provider,
pool, unit price): an invoice or a usage query reads cells, never entries, so its cost
does not grow with the number of entries.

**Which invoice an entry lands on** is decided here, by stream order alone: a
``periods.closed`` marker closes every period up to ``through``. An entry for an open
period lands on that period's invoice. An entry for a closed period is a late charge: it
lands, as an adjustment, on the invoice of the period in which it was posted (or, if that
one is closed too, the first open one).

**Uncharged attempts** (delivered leases that ended before they were ready) are kept per
tenant and lease, on the invoice of the period they ended in (the same rule). A ready
mark of the same lease, folded before or after it, drops it: the lease became ready after
all (its ready and its end were applied out of order, or by two replicas at once). The
leases seen ready recently are remembered for that (the last ``READY_KEPT``, in stream
order: the same in every replica and rebuild).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal

from .model import FoldedEntry, LedgerEntry, LedgerRecord, PeriodsClosed, ReadyMark, UnchargedAttempt
from .periods import next_period, period_of

# tenant, currency, invoice period, service period, billing, region, model, provider, pool, unit price,
# share (milli of each unit: a share is its own invoice line)
CellKey = tuple[str, str, str, str, str, str, str, str, str, Decimal, int]
K_TENANT, K_CURRENCY, K_INVOICE, K_PERIOD, K_BILLING, K_REGION, K_MODEL, K_PROVIDER, K_POOL, K_PRICE, K_MILLI = range(11)
READY_KEPT = 100_000  # delivered leases seen ready, remembered to drop a late uncharged attempt


@dataclass(slots=True)
class Cell:
    amount: Decimal = Decimal(0)
    quantity: Decimal = Decimal(0)  # unit-hours, or unit-months for reserved terms
    entries: int = 0


@dataclass
class Aggregate:
    by_tenant: dict[str, dict[CellKey, Cell]] = field(default_factory=dict)
    closed_through: str | None = None  # every period <= this is final
    applied_seq: int = 0  # last ledger stream sequence folded
    entries: int = 0
    first_period: str | None = None  # earliest invoice period seen
    # tenant -> lease id -> (invoice period, the attempt): leases that were never charged
    uncharged: dict[str, dict[str, tuple[str, UnchargedAttempt]]] = field(default_factory=dict)
    ready_leases: OrderedDict[str, None] = field(default_factory=OrderedDict)

    # --- folding ------------------------------------------------------------------------------
    def invoice_period(self, entry: LedgerEntry | UnchargedAttempt) -> str:
        closed = self.closed_through
        if closed is None or entry.period > closed:
            return entry.period
        return max(next_period(closed), period_of(entry.posted_at))

    def apply(self, seq: int, record: LedgerRecord) -> list[str]:
        """Fold one record at stream sequence ``seq`` (records at or below the last folded
        sequence are ignored). Returns the periods this record closed (a marker) or []."""
        if seq <= self.applied_seq:
            return []
        self.applied_seq = seq
        if isinstance(record, PeriodsClosed):
            return self.close(record.through)
        if isinstance(record, UnchargedAttempt):
            self.add_attempt(record)
            return []
        if isinstance(record, ReadyMark):
            self.add_ready(record)
            return []
        self.add(record)
        return []

    def add_ready(self, r: ReadyMark) -> None:
        ready = self.ready_leases
        ready[r.lease_id] = None
        if len(ready) > READY_KEPT:
            ready.popitem(last=False)
        attempts = self.uncharged.get(r.tenant)
        if attempts and r.lease_id in attempts:  # ready after all (applied after its end)
            del attempts[r.lease_id]

    def add_attempt(self, a: UnchargedAttempt) -> None:
        if a.lease_id in self.ready_leases:
            return
        inv = self.invoice_period(a)
        self.uncharged.setdefault(a.tenant, {})[a.lease_id] = (inv, a)
        if self.first_period is None or inv < self.first_period:
            self.first_period = inv

    def add(self, e: LedgerEntry | FoldedEntry) -> str:
        inv = self.invoice_period(e)
        key = (e.tenant, e.currency, inv, e.period, e.billing, e.region, e.model, e.provider, e.pool_id,
               e.unit_price, e.milli)
        cells = self.by_tenant.get(e.tenant)
        if cells is None:
            cells = self.by_tenant[e.tenant] = {}
        cell = cells.get(key)
        if cell is None:
            cell = cells[key] = Cell()
        cell.amount += e.amount
        cell.quantity += e.quantity
        cell.entries += 1
        self.entries += 1
        if self.first_period is None or inv < self.first_period:
            self.first_period = inv
        return inv

    def close(self, through: str) -> list[str]:
        if self.closed_through is not None and through <= self.closed_through:
            return []
        start = next_period(self.closed_through) if self.closed_through else (self.first_period or through)
        self.closed_through = through
        out = []
        p = min(start, through)
        while p <= through:
            out.append(p)
            p = next_period(p)
        return out

    def is_final(self, period: str) -> bool:
        return self.closed_through is not None and period <= self.closed_through

    # --- reading ------------------------------------------------------------------------------
    def tenants(self) -> list[str]:
        return sorted(self.by_tenant)

    def knows_tenant(self, tenant: str) -> bool:
        return tenant in self.by_tenant or bool(self.uncharged.get(tenant))

    def cells(self, tenant: str | None = None) -> Iterator[tuple[CellKey, Cell]]:
        if tenant is not None:
            yield from self.by_tenant.get(tenant, {}).items()
            return
        for cells in self.by_tenant.values():
            yield from cells.items()

    def invoice_cells(self, tenant: str, period: str) -> list[tuple[CellKey, Cell]]:
        return [(k, c) for k, c in self.by_tenant.get(tenant, {}).items() if k[K_INVOICE] == period]

    def invoice_attempts(self, tenant: str, period: str) -> list[UnchargedAttempt]:
        """The tenant's uncharged attempts on the invoice of ``period``."""
        return [a for inv, a in self.uncharged.get(tenant, {}).values() if inv == period]

    def invoice_periods(self, tenant: str) -> list[str]:
        return sorted({k[K_INVOICE] for k in self.by_tenant.get(tenant, {})}
                      | {inv for inv, _ in self.uncharged.get(tenant, {}).values()})

    def tenants_with_invoice(self, period: str) -> list[str]:
        tenants = {t for t, cells in self.by_tenant.items() if any(k[K_INVOICE] == period for k in cells)}
        tenants |= {t for t, attempts in self.uncharged.items() if any(inv == period for inv, _ in attempts.values())}
        return sorted(tenants)

    def currencies(self, tenant: str) -> set[str]:
        return {k[K_CURRENCY] for k in self.by_tenant.get(tenant, {})}

    def spent(self, tenant: str, currency: str, period: str | None = None) -> Decimal:
        """Posted charges of a tenant in one currency: all of them, or one service period's."""
        return sum((c.amount for k, c in self.by_tenant.get(tenant, {}).items()
                    if k[K_CURRENCY] == currency and (period is None or k[K_PERIOD] == period)), Decimal(0))

    def totals(self) -> dict[tuple[str, str], Decimal]:
        """(tenant, currency) -> everything posted."""
        out: dict[tuple[str, str], Decimal] = {}
        for key, cell in self.cells():
            k = (key[K_TENANT], key[K_CURRENCY])
            out[k] = out.get(k, Decimal(0)) + cell.amount
        return out


def fold(records: Iterable[tuple[int, LedgerRecord]]) -> Aggregate:
    agg = Aggregate()
    for seq, record in records:
        agg.apply(seq, record)
    return agg
