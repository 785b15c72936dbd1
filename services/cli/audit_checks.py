"""The auditor's checks: invariants 1-4 of the design over one observation of the system.

Pure: the observation (what Redis, JetStream and the meter said, read by
``services/cli/audit.py``) goes in, one result per check comes out, with the pools and
leases that break it. Nothing here reads a clock or a server, so every check is
unit-testable and fails on a hand-made broken world.

What each check reads (see docs/faults.md):

* invariant 1 (never overbook): each pool's ``leased`` counter against its capacity and
  against the units of the live leases that point at it; on a pool that shares its devices
  (docs/sharing.md) ``leased`` counts the devices with any milli taken, and each device's
  free milli is 1000 less the milli its live leases hold there, never below 0;
* invariant 2 (a 201 is durable): every live lease in Redis has its grant in the
  allocation stream, and every grant that has not ended (and not expired) is live in
  Redis;
* invariant 3 (billed exactly once): the ledger stream against the charges computed here,
  independently, from the allocation events with the meter's own pricing rules, to the
  minor unit; and the meter's API totals against the ledger;
* invariant 4 (nothing leaks): no expired lease still holds units; every expired lease
  has an ending event (else its usage would never be billed).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from services.common.messages import ENDING_EVENTS, GRANT_EVENTS, AllocEvent, LeaseReady, Pool
from services.meter.accounts import entry_id, event_kind
from services.meter.model import LedgerEntry
from services.meter.pricing import RESERVED, delivers, ending_charges, reserved_charges

SHOWN = 20  # violations listed per check (all are counted)


# --- what was observed -----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PoolLive:
    """One pool hash in Redis."""

    region: str
    pool_id: str
    capacity: int
    healthy: int
    leased: int
    free: int
    status: str
    generation: int = 0  # 0: written before generations were kept
    devices: dict[int, int] | None = None  # a pool that shares its devices: device -> free milli


@dataclass(frozen=True, slots=True)
class LeaseLive:
    """One lease hash in Redis (the units it holds are counted in its pool's ``leased``)."""

    region: str
    lease_id: str
    pool_id: str
    units: int
    expires: float
    seq: int
    generation: int = 0  # the pool generation it holds units of (0: from before generations)
    milli: int = 1000  # of each of its devices (docs/sharing.md)
    devices: tuple[int, ...] = ()  # on a pool that shares its devices: the devices it holds

    def holds_units_of(self, pool: PoolLive | None) -> bool:
        """Its units are counted in ``pool``'s ``leased``: the pool of its generation (a
        lease that outlived its pool's removal waits for the broker to end it as lost)."""
        return pool is not None and (self.generation == 0 or pool.generation == 0 or
                                     self.generation == pool.generation)


@dataclass(frozen=True, slots=True)
class MeterView:
    """What the meter's API said: its ledger position and its usage totals there."""

    ledger_seq: int
    totals: dict[tuple[str, str], Decimal]  # (tenant, currency) -> amount


@dataclass(slots=True)
class Observation:
    now: float  # unix seconds, when Redis was read
    alloc_seq_before: int  # the allocation stream's last sequence just before Redis was read
    pools: dict[str, PoolLive]
    leases: dict[str, LeaseLive]
    regions: set[str]  # regions with pools, leases or events
    ready_regions: set[str]  # regions whose leases-ready marker is set
    rebuilt: dict[str, bool]  # service -> its rebuilt marker is set
    events: list[tuple[int, AllocEvent]]  # (stream seq, event), the whole allocation stream
    records: dict[str, Pool] | None = None  # the registry's durable pool records (KV)
    ledger: list[tuple[int, LedgerEntry]] | None = None  # None: the meter has no ledger yet
    billed_through: int = 0  # the meter's durable consumer acked every event up to here
    meter: MeterView | None = None
    min_bill_s: int = 60
    grace_s: float = 5.0  # an expired lease may hold its units this long (sweep interval + slack)
    undecodable: int = 0  # allocation events that did not decode
    _folded: tuple[int, int, dict[str, History]] | None = None  # folded once, read by several checks

    def histories(self) -> dict[str, History]:
        key = (id(self.events), len(self.events))
        if self._folded is None or self._folded[:2] != key:
            self._folded = (*key, histories(self.events))
        return self._folded[2]


# --- what was found ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Violation:
    subject: str  # the pool, lease or tenant at fault
    detail: str


@dataclass(slots=True)
class CheckResult:
    name: str
    invariant: int
    checked: int = 0
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # counts that are not violations (pending, excused)

    @property
    def ok(self) -> bool:
        return not self.violations

    def fail(self, subject: str, detail: str) -> None:
        self.violations.append(Violation(subject, detail))

    def to_dict(self) -> dict[str, object]:
        return {"check": self.name, "invariant": self.invariant, "checked": self.checked, "ok": self.ok,
                "violations": len(self.violations),
                "examples": [{"subject": v.subject, "detail": v.detail} for v in self.violations[:SHOWN]],
                "notes": self.notes}


@dataclass(slots=True)
class Report:
    checks: list[CheckResult]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def violations(self) -> int:
        return sum(len(c.violations) for c in self.checks)

    def keys(self) -> set[tuple[str, str]]:
        return {(c.name, v.subject) for c in self.checks for v in c.violations}

    def only(self, keep: set[tuple[str, str]]) -> Report:
        """The same report with only the violations in ``keep`` (seen in an earlier look too)."""
        out = []
        for c in self.checks:
            out.append(CheckResult(c.name, c.invariant, c.checked,
                                   [v for v in c.violations if (c.name, v.subject) in keep], list(c.notes)))
        return Report(out)

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "violations": self.violations, "checks": [c.to_dict() for c in self.checks]}


# --- the lease record, folded from the allocation stream ---------------------------------------
@dataclass(slots=True)
class History:
    """One lease as the allocation stream tells it."""

    grant: tuple[int, AllocEvent] | None = None  # (stream seq, event)
    first: tuple[int, AllocEvent] | None = None  # lowest per-lease seq seen
    latest: AllocEvent | None = None  # highest per-lease seq seen
    ends: list[tuple[int, AllocEvent]] = field(default_factory=list)
    ready: tuple[int, AllocEvent] | None = None  # a delivered lease's lease.ready (billing starts)

    @property
    def end(self) -> tuple[int, AllocEvent] | None:
        return min(self.ends, key=lambda x: x[1].seq) if self.ends else None

    @property
    def expires(self) -> float:
        """Latest known expiry (renewals move it)."""
        assert self.latest is not None
        return max(e.lease.expires_at.timestamp() for e in
                   [self.latest] + ([self.grant[1]] if self.grant else []))


def histories(events: Iterable[tuple[int, AllocEvent]]) -> dict[str, History]:
    out: dict[str, History] = defaultdict(History)
    for seq, event in events:
        h = out[event.lease.lease_id]
        if isinstance(event, GRANT_EVENTS) and h.grant is None:
            h.grant = (seq, event)
        if h.first is None or event.seq < h.first[1].seq:
            h.first = (seq, event)
        if h.latest is None or event.seq >= h.latest.seq:
            h.latest = event
        if isinstance(event, ENDING_EVENTS) and all(e.seq != event.seq for _, e in h.ends):
            h.ends.append((seq, event))
        if isinstance(event, LeaseReady) and h.ready is None:
            h.ready = (seq, event)
    return dict(out)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


# --- invariant 1 -----------------------------------------------------------------------------
def device_takes(o: Observation) -> dict[str, dict[int, int]]:
    """Sharing pools: device -> the milli the live leases holding units of the pool take on it."""
    out: dict[str, dict[int, int]] = {}
    for lease in o.leases.values():
        pool = o.pools.get(lease.pool_id)
        if pool is None or pool.devices is None or not lease.devices or not lease.holds_units_of(pool):
            continue
        taken = out.setdefault(pool.pool_id, {})
        for d in lease.devices:
            taken[d] = taken.get(d, 0) + lease.milli
    return out


def held_units(o: Observation) -> dict[str, int]:
    """What each pool's ``leased`` should say from its live leases: their units, or on a
    pool that shares its devices, the devices they take any milli of (a lease there that
    names no device counts its units)."""
    held: dict[str, int] = defaultdict(int)
    for lease in o.leases.values():
        pool = o.pools.get(lease.pool_id)
        if pool is not None and not lease.holds_units_of(pool):
            continue
        if pool is None or pool.devices is None or not lease.devices:
            held[lease.pool_id] += lease.units
    for pool_id, taken in device_takes(o).items():
        held[pool_id] += sum(1 for milli in taken.values() if milli > 0)
    return held


def check_capacity(o: Observation) -> CheckResult:
    """``leased`` never above capacity. A provider may cut capacity under live leases
    (the registry records the pool as overcommitted): that is excused when those leases
    account for every leased unit and the pool's record changed after the newest of them
    was granted, and only then."""
    r = CheckResult("pool leased <= capacity", 1)
    newest: dict[str, float] = {}
    held = held_units(o)
    grants = {lease_id: h.grant[1].lease.granted_at.timestamp() for lease_id, h in o.histories().items()
              if h.grant}
    for lease in o.leases.values():
        if not lease.holds_units_of(o.pools.get(lease.pool_id)):
            continue
        at = grants.get(lease.lease_id, o.now)
        newest[lease.pool_id] = max(newest.get(lease.pool_id, 0.0), at)
    excused = 0
    for pool in o.pools.values():
        r.checked += 1
        if pool.leased <= pool.capacity:
            continue
        record = (o.records or {}).get(pool.pool_id)
        if record is not None and record.spec.units == pool.capacity and held.get(pool.pool_id, 0) == pool.leased and \
                record.updated_at.timestamp() >= newest.get(pool.pool_id, 0.0):
            excused += 1
            continue
        r.fail(pool.pool_id, f"{pool.leased} units leased on a capacity of {pool.capacity} (region {pool.region})")
    if excused:
        r.notes.append(f"{excused} pool(s) overcommitted by a capacity cut after their leases were granted")
    return r


def check_leased_counter(o: Observation) -> CheckResult:
    """Each pool's ``leased`` equals the units of the live leases on it: more is leaked
    capacity, less is units handed out twice."""
    r = CheckResult("pool leased = units of its live leases", 1)
    held = held_units(o)
    for pool in o.pools.values():
        r.checked += 1
        if pool.leased != held.get(pool.pool_id, 0):
            r.fail(pool.pool_id, f"leased counter {pool.leased}, live leases hold {held.get(pool.pool_id, 0)}")
    for pool_id, units in held.items():
        if pool_id not in o.pools:
            r.checked += 1
            r.fail(pool_id, f"live leases hold {units} units of a pool that is not in Redis")
    return r


def check_device_shares(o: Observation) -> CheckResult:
    """On a pool that shares its devices, each device's free milli is 1000 less what the
    live leases hold there: never more than 1000 taken on a device, nothing leaked, nothing
    handed out twice."""
    r = CheckResult("device free milli = 1000 - shares of its live leases", 1)
    takes = device_takes(o)
    for pool in o.pools.values():
        if pool.devices is None:
            continue
        taken = takes.get(pool.pool_id, {})
        for d in sorted(set(pool.devices) | set(taken)):
            r.checked += 1
            held, free = taken.get(d, 0), pool.devices.get(d)
            if held > 1000:
                r.fail(pool.pool_id, f"device {d}: live leases hold {held} milli of it")
            elif free is None:
                r.fail(pool.pool_id, f"device {d}: live leases hold {held} milli of a device not in its state")
            elif free + held != 1000:
                r.fail(pool.pool_id, f"device {d}: {free} milli free, live leases hold {held}")
    return r


# --- invariant 2 -----------------------------------------------------------------------------
def check_live_leases_durable(o: Observation) -> CheckResult:
    """Every lease live in Redis was granted in the allocation stream (the durable
    record), on the same pool with the same units, and has not ended there."""
    r = CheckResult("live lease has its grant in the stream", 2)
    hs = o.histories()
    for lease in o.leases.values():
        r.checked += 1
        h = hs.get(lease.lease_id)
        if h is None or h.grant is None:
            r.fail(lease.lease_id, f"holds {lease.units} units of {lease.pool_id} with no grant event")
            continue
        granted = h.grant[1].lease
        if (granted.pool_id, granted.units) != (lease.pool_id, lease.units):
            r.fail(lease.lease_id, f"Redis says {lease.units} units of {lease.pool_id}, the grant "
                                   f"{granted.units} units of {granted.pool_id}")
        elif h.end is not None:
            r.fail(lease.lease_id, f"ended in the stream ({event_kind(h.end[1])}) but still holds "
                                   f"{lease.units} units of {lease.pool_id}")
    return r


def check_grants_live(o: Observation) -> CheckResult:
    """Every grant in the stream (before Redis was read) that has not ended and not
    expired is live in Redis: nothing a client was told about is lost."""
    r = CheckResult("granted lease is live until it ends", 2)
    for lease_id, h in o.histories().items():
        if h.grant is None or h.grant[0] > o.alloc_seq_before or h.end is not None:
            continue
        if h.expires <= o.now:
            continue  # expired: invariant 4's business
        r.checked += 1
        if lease_id in o.leases:
            continue
        lease = h.grant[1].lease
        why = "" if lease.region in o.ready_regions else f" (region {lease.region} not restored yet)"
        r.fail(lease_id, f"granted {lease.units} units of {lease.pool_id} until {_when(h.expires)}, "
                         f"not in Redis{why}")
    return r


def check_restored(o: Observation) -> CheckResult:
    """Redis holds what it must after a loss: both rebuild markers, and the leases-ready
    marker of every region that has pools or leases (else the broker refuses to book)."""
    r = CheckResult("Redis rebuilt after a loss", 2)
    for service in ("registry", "broker"):
        r.checked += 1
        if not o.rebuilt.get(service, False):
            r.fail(f"rebuilt:{service}", f"the {service} has not (re)loaded Redis from its durable record")
    need = {p.region for p in o.pools.values()} | {lease.region for lease in o.leases.values()}
    for region in sorted(need):
        r.checked += 1
        if region not in o.ready_regions:
            r.fail(f"region:{region}", "leases-ready marker missing: placements there are refused")
    return r


def check_records(o: Observation) -> CheckResult:
    """Redis pools match the registry's durable records (the source a rebuild uses)."""
    r = CheckResult("Redis pool matches its durable record", 2)
    if o.records is None:
        r.notes.append("pool records not read")
        return r
    for pool_id, record in o.records.items():
        r.checked += 1
        live = o.pools.get(pool_id)
        if live is None:
            r.fail(pool_id, "in the registry's record but not in Redis")
        elif live.capacity != record.spec.units:
            r.fail(pool_id, f"capacity {live.capacity} in Redis, {record.spec.units} in the record")
    for pool_id in o.pools:
        if pool_id not in o.records:
            r.checked += 1
            r.fail(pool_id, "in Redis but not in the registry's record")
    return r


# --- invariant 4 -----------------------------------------------------------------------------
def check_expired_released(o: Observation) -> CheckResult:
    """No lease past its expiry (plus a sweep's grace) still holds units."""
    r = CheckResult("no expired lease holds units", 4)
    for lease in o.leases.values():
        r.checked += 1
        if lease.expires < o.now - o.grace_s:
            r.fail(lease.lease_id, f"expired at {_when(lease.expires)}, still holds {lease.units} units of "
                                   f"{lease.pool_id}")
    return r


def check_expired_ended(o: Observation) -> CheckResult:
    """Every lease past its expiry (plus grace) has an ending event: without one the
    meter never bills its usage."""
    r = CheckResult("expired lease has an ending event", 4)
    for lease_id, h in o.histories().items():
        if h.grant is None or h.end is not None:
            continue
        r.checked += 1
        if h.expires < o.now - o.grace_s and lease_id not in o.leases:
            r.fail(lease_id, f"expired at {_when(h.expires)}; no ending event in the stream, so it is "
                             "never billed")
    return r


# --- invariant 3 -----------------------------------------------------------------------------
def term_of(lease_id: str, hs: dict[str, History]) -> tuple[str, bool]:
    """(the lease whose id names a reserved lease's term entries, whether an earlier lease
    of its replacement chain was charged the term): the chain is followed back through
    ``replaces``; a capacity-only lease is charged at grant, a delivered one at ready. The
    name is the chain's first lease, back to where the units changed (a split replacement
    names its own term)."""
    root, covered, whole, seen = lease_id, False, True, {lease_id}
    h = hs.get(lease_id)
    while h is not None and h.first is not None and h.first[1].lease.replaces:
        prev = h.first[1].lease.replaces
        if prev in seen:
            break
        seen.add(prev)
        units = h.first[1].lease.units
        h = hs.get(prev)
        if h is None or h.first is None:
            root = prev if whole else root
            break
        whole = whole and h.first[1].lease.units == units
        if whole:
            root = prev
        if not delivers(h.first[1].lease) or h.ready is not None:
            covered = True
    return root, covered


def expected_charges(h: History, min_bill_s: int, term: tuple[str, bool] | None = None
                     ) -> list[tuple[str, Decimal, int]]:
    """``(entry id, amount, stream seq of the event that posts it)`` the meter owes for
    one lease, priced with the meter's pricing rules: a capacity-only lease's reserved term
    at its first event and per-second usage at its (first) ending event; a delivered
    lease's the same from its ready (nothing if it never became ready). ``term``: a
    reserved replacement's ``term_of``."""
    out: list[tuple[str, Decimal, int]] = []
    if h.first is None:
        return out
    seq, first = h.first
    lease = first.lease
    start = None
    if delivers(lease):
        if h.ready is None:
            return out  # never ready: an uncharged attempt
        seq, ready = h.ready
        start = ready.at
    if lease.billing in RESERVED:
        root, covered = term or (lease.lease_id, False)
        if not covered:
            out += [(entry_id(root, c), c.amount, seq) for c in reserved_charges(lease, start)]
    elif h.end is not None:
        end_seq, end = h.end
        out += [(entry_id(lease.lease_id, c), c.amount, max(seq, end_seq) if start else end_seq)
                for c in ending_charges(event_kind(end), end.at, end.lease, min_bill_s=min_bill_s, start=start)]
    return out


def check_ledger(o: Observation) -> CheckResult:
    """The ledger holds each charge owed for the events the meter has acknowledged,
    once, with the amount computed here, and nothing else."""
    r = CheckResult("ledger = leased seconds x locked price", 3)
    if o.ledger is None:
        r.notes.append("no ledger stream (meter never ran)")
        return r
    got: dict[str, list[LedgerEntry]] = defaultdict(list)
    for _, entry in o.ledger:
        got[entry.id].append(entry)
    pending = 0
    owed: dict[str, tuple[Decimal, str]] = {}
    hs = o.histories()
    for lease_id, h in hs.items():
        term = term_of(lease_id, hs) if h.first is not None and h.first[1].lease.replaces else None
        for eid, amount, seq in expected_charges(h, o.min_bill_s, term):
            owed[eid] = (amount, lease_id)
            r.checked += 1
            entries = got.get(eid, [])
            if not entries:
                if seq <= o.billed_through:
                    r.fail(lease_id, f"charge {eid} ({amount}) missing: its event (stream seq {seq}) was "
                                     "acknowledged by the meter")
                else:
                    pending += 1
            elif entries[0].amount != amount:
                r.fail(lease_id, f"charge {eid} is {entries[0].amount}, the lease owes {amount}")
    for eid, entries in got.items():
        if len(entries) > 1:
            r.fail(entries[0].lease_id, f"charge {eid} is in the ledger {len(entries)} times")
        if eid not in owed:
            r.fail(entries[0].lease_id, f"charge {eid} ({entries[0].amount}) is owed by no event")
    if pending:
        r.notes.append(f"{pending} charge(s) of events the meter has not acknowledged yet")
    if o.undecodable:
        r.notes.append(f"{o.undecodable} undecodable allocation event(s) skipped")
    return r


def check_meter_totals(o: Observation) -> CheckResult:
    """The meter's API (its folded aggregate) says what its ledger says, per tenant and
    currency, at the ledger position it reported."""
    r = CheckResult("meter API totals = ledger", 3)
    if o.meter is None or o.ledger is None:
        r.notes.append("meter API not asked (give --meter-url and --key)")
        return r
    want: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for seq, entry in o.ledger:
        if seq <= o.meter.ledger_seq:
            want[(entry.tenant, entry.currency)] += entry.amount
    for key in sorted(set(want) | set(o.meter.totals)):
        r.checked += 1
        a, b = o.meter.totals.get(key, Decimal(0)), want.get(key, Decimal(0))
        if a != b:
            r.fail(f"{key[0]}/{key[1]}", f"meter API says {a}, its ledger {b}")
    return r


CHECKS = (check_capacity, check_leased_counter, check_device_shares, check_live_leases_durable, check_grants_live,
          check_restored, check_records, check_ledger, check_meter_totals, check_expired_released, check_expired_ended)


def audit(o: Observation) -> Report:
    return Report([check(o) for check in CHECKS])


def confirmed(first: Report, second: Report) -> Report:
    """Violations seen in two looks a moment apart: a lease caught between its Redis
    write and its event (or a pool between its record and Redis) is in one look only."""
    return second.only(first.keys() & second.keys())
