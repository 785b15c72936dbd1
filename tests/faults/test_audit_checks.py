"""The auditor's pure checks on hand-made observations: each check passes on a
consistent world and fails, naming the pool or lease, on a world broken its way."""

from __future__ import annotations

import dataclasses

import msgspec
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from services.cli.audit_checks import (
    LeaseLive,
    MeterView,
    Observation,
    PoolLive,
    audit,
    confirmed,
)
from services.common.messages import (
    Accelerator,
    LeaseExpired,
    LeaseFailed,
    LeaseGranted,
    LeaseInfo,
    LeaseLost,
    LeaseProvisioning,
    LeaseReady,
    LeaseReleased,
    LeaseRenewed,
    Pool,
    PoolSpec,
    Prices,
)
from services.meter.accounts import entry_id
from services.meter.model import LedgerEntry
from services.meter.pricing import ending_charges, reserved_charges

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
T = NOW.timestamp()


def info(lease_id: str, pool_id: str = "p1", units: int = 2, granted: float = -600, expires: float = 300,
         billing: str = "on_demand") -> LeaseInfo:
    reserved = billing.startswith("reserved")
    return LeaseInfo(lease_id=lease_id, request_id="r", tenant="t1", pool_id=pool_id, provider="acme",
                     region="cn-gz", model="m", units=units, billing=billing,  # type: ignore[arg-type]
                     unit_price=Decimal("1100" if reserved else "2.1234"),
                     price_basis="unit_month" if reserved else "unit_hour",
                     granted_at=NOW + timedelta(seconds=granted), expires_at=NOW + timedelta(seconds=expires),
                     term_months=1 if reserved else 0, ttl_s=0 if reserved else 300)


def record(pool_id: str, units: int, updated: float = -3600) -> Pool:
    acc = Accelerator(model="m", vendor="nvidia", name="M", memory_gib=80, memory_bandwidth_gbs=1, bf16_tflops=1,
                      fp16_tflops=1, interconnect="x", interconnect_gbs=1, stack="cuda")
    spec = PoolSpec(region="cn-gz", model="m", units=units, prices=Prices(on_demand=Decimal(2)))
    at = NOW + timedelta(seconds=updated)
    return Pool(pool_id=pool_id, provider="acme", spec=spec, accelerator=acc, created_at=at, updated_at=at)


def entries_for(event, seq_kind: str = "end") -> list[LedgerEntry]:  # noqa: ANN001
    lease = event.lease
    charges = reserved_charges(lease) if seq_kind == "reserved" else \
        ending_charges(type(event).__struct_config__.tag, event.at, lease, min_bill_s=60)
    return [LedgerEntry(id=entry_id(lease.lease_id, c), tenant=lease.tenant, provider=lease.provider,
                        pool_id=lease.pool_id, region=lease.region, model=lease.model, lease_id=lease.lease_id,
                        billing=lease.billing, kind=c.kind, period=c.period, start=c.start, end=c.end,
                        units=lease.units, seconds=c.seconds, quantity=c.quantity, unit_price=lease.unit_price,
                        price_basis=lease.price_basis, currency=lease.currency, amount=c.amount, posted_at=NOW)
            for c in charges]


def world() -> Observation:
    """Pool p1 (capacity 8) holds live lease a (2 units, renewed); lease b was released and
    billed; lease c (reserved) is live and its term billed."""
    a, b, c = info("a"), info("b", units=3, granted=-900), info("c", units=1, billing="reserved_month",
                                                                   expires=86400)
    renewed_a = msgspec.structs.replace(a, expires_at=NOW + timedelta(seconds=290))
    released_b = LeaseReleased(id="b.2", at=NOW - timedelta(seconds=100), lease=b, seq=2)
    events = [(1, LeaseGranted(id="a.1", at=a.granted_at, lease=a)),
              (2, LeaseGranted(id="b.1", at=b.granted_at, lease=b)),
              (3, LeaseGranted(id="c.1", at=c.granted_at, lease=c)),
              (4, LeaseRenewed(id="a.2", at=NOW - timedelta(seconds=10), lease=renewed_a, seq=2)),
              (5, released_b)]
    ledger = [(i + 1, e) for i, e in enumerate(entries_for(released_b) + entries_for(events[2][1], "reserved"))]
    totals = {("t1", "USD"): sum((e.amount for _, e in ledger), Decimal(0))}
    return Observation(
        now=T, alloc_seq_before=5,
        pools={"p1": PoolLive("cn-gz", "p1", capacity=8, healthy=-1, leased=3, free=5, status="online")},
        leases={"a": LeaseLive("cn-gz", "a", "p1", 2, T + 290, 2), "c": LeaseLive("cn-gz", "c", "p1", 1, T + 86400, 1)},
        regions={"cn-gz"}, ready_regions={"cn-gz"}, rebuilt={"registry": True, "broker": True}, events=events,
        records={"p1": record("p1", 8)}, ledger=ledger, billed_through=5, meter=MeterView(len(ledger), totals))


def failures(o: Observation) -> dict[str, set[str]]:
    return {c.name: {v.subject for v in c.violations} for c in audit(o).checks if c.violations}


def test_consistent_world_passes_every_check() -> None:
    report = audit(world())
    assert report.ok, report.to_dict()
    checked = {c.name: c.checked for c in report.checks}
    assert checked["pool leased <= capacity"] == 1
    assert checked["ledger = leased seconds x locked price"] >= 2
    assert checked["meter API totals = ledger"] == 1


def test_overbooked_pool_is_named() -> None:
    o = world()
    o.pools["p1"] = dataclasses.replace(o.pools["p1"], leased=11)
    assert failures(o) == {"pool leased <= capacity": {"p1"}, "pool leased = units of its live leases": {"p1"}}


def test_capacity_cut_under_live_leases_is_excused_but_not_a_later_grant() -> None:
    o = world()
    o.pools["p1"] = dataclasses.replace(o.pools["p1"], capacity=2)
    o.records = {"p1": record("p1", 2, updated=-1)}  # the provider cut capacity after the grants
    report = audit(o)
    assert report.ok and any("capacity cut" in n for c in report.checks for n in c.notes)
    o.records = {"p1": record("p1", 2, updated=-2000)}  # cut before lease a was granted: an overbooking
    assert failures(o) == {"pool leased <= capacity": {"p1"}}


def test_a_lease_of_a_removed_generation_holds_nothing_of_the_next() -> None:
    """The pool was removed and registered again (generation 9) while leases of generation
    5 wait for the broker to end them: their units are no part of the new pool's count."""
    o = world()
    o.pools["p1"] = dataclasses.replace(o.pools["p1"], generation=9, leased=0, free=8)
    o.leases = {i: dataclasses.replace(lease, generation=5) for i, lease in o.leases.items()}
    assert "pool leased = units of its live leases" not in failures(o)
    o.pools["p1"] = dataclasses.replace(o.pools["p1"], leased=3)  # counted on the new pool: units handed out twice
    assert failures(o)["pool leased = units of its live leases"] == {"p1"}


def test_lease_without_grant_and_lost_grant() -> None:
    o = world()
    o.leases["x"] = LeaseLive("cn-gz", "x", "p1", 4, T + 100, 1)
    o.pools["p1"] = dataclasses.replace(o.pools["p1"], leased=7)
    assert failures(o) == {"live lease has its grant in the stream": {"x"}}
    o = world()
    del o.leases["a"]
    o.pools["p1"] = dataclasses.replace(o.pools["p1"], leased=1)
    assert failures(o) == {"granted lease is live until it ends": {"a"}}
    o.ready_regions = set()
    assert failures(o)["Redis rebuilt after a loss"] == {"region:cn-gz"}


def test_expired_lease_holding_units_and_expired_lease_never_ended() -> None:
    o = world()
    o.now = T + 400  # lease a expired at T + 290; grace 5 s
    assert failures(o) == {"no expired lease holds units": {"a"}}
    del o.leases["a"]
    o.pools["p1"] = dataclasses.replace(o.pools["p1"], leased=1)
    assert failures(o) == {"expired lease has an ending event": {"a"}}
    end = LeaseExpired(id="a.3", at=NOW + timedelta(seconds=300), lease=o.events[3][1].lease, seq=3)
    o.events.append((6, end))
    # ended now; the meter has not acknowledged seq 6 yet, so its charge is pending, not missing
    report = audit(o)
    assert report.ok and any("not acknowledged" in n for c in report.checks for n in c.notes)
    o.billed_through = 6
    assert failures(o) == {"ledger = leased seconds x locked price": {"a"}}
    o.ledger.append((99, entries_for(end)[0]))
    o.meter = None
    assert audit(o).ok


def test_ledger_off_by_a_minor_unit_twice_or_unowed() -> None:
    o = world()
    seq, e = o.ledger[0]
    o.ledger[0] = (seq, msgspec.structs.replace(e, amount=e.amount + Decimal("0.01")))
    o.meter = None
    assert failures(o) == {"ledger = leased seconds x locked price": {"b"}}
    o = world()
    o.ledger.append((50, o.ledger[0][1]))
    o.meter = None
    assert failures(o) == {"ledger = leased seconds x locked price": {"b"}}
    o = world()
    o.ledger.append((51, msgspec.structs.replace(o.ledger[0][1], id="zz.u.2026-03", lease_id="zz")))
    o.meter = None
    assert failures(o) == {"ledger = leased seconds x locked price": {"zz"}}


def test_meter_totals_differ_from_its_ledger() -> None:
    o = world()
    assert o.meter is not None
    o.meter = MeterView(o.meter.ledger_seq, {("t1", "USD"): Decimal("1.00")})
    assert failures(o) == {"meter API totals = ledger": {"t1/USD"}}
    o.meter = MeterView(0, {})  # the meter had folded nothing yet: compared at its position
    assert audit(o).ok


def test_records_and_confirmation() -> None:
    o = world()
    o.records = {}
    assert failures(o) == {"Redis pool matches its durable record": {"p1"}}
    first = audit(o)
    o.records = {"p1": record("p1", 8)}
    assert confirmed(first, audit(o)).ok  # gone at the second look: in flight, not a fault
    o.records = {}
    assert not confirmed(first, audit(o)).ok


def test_delivered_leases_are_owed_from_ready_and_never_ready_ones_nothing() -> None:
    o = world()
    d = msgspec.structs.replace(info("d", granted=-900), delivery="ssh")
    f = msgspec.structs.replace(info("f", granted=-900), delivery="ssh")
    ready_d = LeaseReady(id="d.2", at=NOW - timedelta(seconds=800), lease=d, seq=2)
    released_d = LeaseReleased(id="d.3", at=NOW - timedelta(seconds=200), lease=d, seq=3)
    o.events += [(6, LeaseProvisioning(id="d.1", at=d.granted_at, lease=d)), (7, ready_d), (8, released_d),
                 (9, LeaseProvisioning(id="f.1", at=f.granted_at, lease=f)),
                 (10, LeaseFailed(id="f.2", at=NOW - timedelta(seconds=600), lease=f, seq=2, reason="no"))]
    o.billed_through = o.alloc_seq_before = 10
    owed = [LedgerEntry(**{**msgspec.structs.asdict(e), "start": ready_d.at, "seconds": Decimal(600),
                           "amount": c.amount, "quantity": c.quantity})
            for e, c in zip(entries_for(released_d),
                            ending_charges("lease.released", released_d.at, d, min_bill_s=60, start=ready_d.at),
                            strict=True)]
    base = list(o.ledger or [])
    o.ledger = base + [(len(base) + 1, owed[0])]
    o.meter = MeterView(len(o.ledger), {("t1", "USD"): sum((e.amount for _, e in o.ledger), Decimal(0))})
    assert audit(o).ok, audit(o).to_dict()
    # billed from the grant instead: a wrong amount, named
    o.ledger = base + [(len(base) + 1, entries_for(released_d)[0])]
    o.meter = MeterView(len(o.ledger), {("t1", "USD"): sum((e.amount for _, e in o.ledger), Decimal(0))})
    assert failures(o) == {"ledger = leased seconds x locked price": {"d"}}


def test_a_reserved_term_moved_by_failover_is_owed_once() -> None:
    o = world()
    a = info("ra", units=1, billing="reserved_month", expires=86400)
    b = msgspec.structs.replace(info("rb", pool_id="p1", units=1, billing="reserved_month", granted=-100,
                                     expires=86400), attempt=2, replaces="ra", expires_at=a.expires_at)
    o.events += [(6, LeaseGranted(id="ra.1", at=a.granted_at, lease=a)),
                 (7, LeaseLost(id="ra.2", at=NOW - timedelta(seconds=200), lease=a, seq=2, reason="pool offline")),
                 (8, LeaseGranted(id="rb.1", at=b.granted_at, lease=b))]
    o.billed_through = o.alloc_seq_before = 8
    o.leases["rb"] = LeaseLive("cn-gz", "rb", "p1", 1, T + 86400, 1)
    o.pools["p1"] = dataclasses.replace(o.pools["p1"], leased=4, free=4)
    base = list(o.ledger or [])
    o.ledger = base + [(len(base) + i + 1, e) for i, e in enumerate(entries_for(o.events[-3][1], "reserved"))]
    o.meter = MeterView(len(o.ledger), {("t1", "USD"): sum((e.amount for _, e in o.ledger), Decimal(0))})
    assert audit(o).ok, audit(o).to_dict()
    # the replacement charged a term of its own too: owed by nothing
    o.ledger += [(len(o.ledger) + 1, e) for e in entries_for(o.events[-1][1], "reserved")]
    o.meter = MeterView(len(o.ledger), {("t1", "USD"): sum((e.amount for _, e in o.ledger), Decimal(0))})
    assert failures(o) == {"ledger = leased seconds x locked price": {"rb"}}


def test_a_delivering_lease_is_granted_by_its_lease_provisioning() -> None:
    """The grant (seq 1) of a lease that must be delivered is lease.provisioning: a live
    one has its grant in the stream, and a granted one missing from Redis is still named."""
    o = world()
    d = msgspec.structs.replace(info("d", units=1), delivery="ssh", provision_timeout_s=300)
    o.events.append((6, LeaseProvisioning(id="d.1", at=d.granted_at, lease=d)))
    o.alloc_seq_before = o.billed_through = 6
    o.leases["d"] = LeaseLive("cn-gz", "d", "p1", 1, T + 300, 1)
    o.pools["p1"] = dataclasses.replace(o.pools["p1"], leased=4, free=4)
    assert audit(o).ok, audit(o).to_dict()
    del o.leases["d"]
    o.pools["p1"] = dataclasses.replace(o.pools["p1"], leased=3, free=5)
    assert failures(o) == {"granted lease is live until it ends": {"d"}}


def sharing_world() -> Observation:
    """The world above on a pool that shares its devices (docs/sharing.md): lease a holds
    devices 0 and 1 whole, c and e a quarter of device 2 each. ``leased`` counts the devices
    with any milli taken (3), not the leases' units (4)."""
    o = world()
    e = msgspec.structs.replace(info("e", units=1, granted=-60), milli=250, devices=(2,))
    o.events = [*o.events, (6, LeaseGranted(id="e.1", at=e.granted_at, lease=e))]
    o.alloc_seq_before = o.billed_through = 6
    devices = {0: 0, 1: 0, 2: 500, **{d: 1000 for d in range(3, 8)}}
    o.pools["p1"] = dataclasses.replace(o.pools["p1"], devices=devices)
    o.leases = {"a": dataclasses.replace(o.leases["a"], devices=(0, 1)),
                "c": dataclasses.replace(o.leases["c"], milli=250, devices=(2,)),
                "e": LeaseLive("cn-gz", "e", "p1", 1, T + 240, 1, milli=250, devices=(2,))}
    return o


def test_a_sharing_pool_counts_devices_taken_and_each_device_adds_up() -> None:
    report = audit(sharing_world())
    assert report.ok, report.to_dict()
    assert {c.name: c.checked for c in report.checks}["device free milli = 1000 - shares of its live leases"] == 8


def test_a_device_overbooked_leaked_or_missing_is_named() -> None:
    check = "device free milli = 1000 - shares of its live leases"
    o = sharing_world()
    o.pools["p1"].devices[2] = 750  # a share's milli never taken (or given back twice)
    assert failures(o) == {check: {"p1"}}
    o = sharing_world()
    o.leases["a"] = dataclasses.replace(o.leases["a"], devices=(0, 2))  # a whole lease on a shared device
    found = failures(o)
    assert found[check] == {"p1"}
    assert any("1500 milli" in v.detail for c in audit(o).checks for v in c.violations)
    o = sharing_world()
    del o.pools["p1"].devices[2]  # the device state lost under live shares
    assert failures(o)[check] == {"p1"}
    o = sharing_world()
    o.pools["p1"] = dataclasses.replace(o.pools["p1"], leased=4, free=4)  # the leases' units, not devices
    assert failures(o) == {"pool leased = units of its live leases": {"p1"}}
