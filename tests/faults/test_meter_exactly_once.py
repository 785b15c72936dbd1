"""Invariant 3: every leased second is billed exactly once, across redelivery, SIGKILLs and
replays.

The meter runs as a real process (uvicorn, ``python -m services.meter``). The test
publishes more than 10,000 allocation events (grants, renewals and every kind of end for
thousands of leases of every billing, across a month boundary, with duplicates; a quarter
of them delivered: billed from their ready, or failed or lost before it; a fifth of them
shares of one device, billed x milli/1000) to the
real stream, SIGKILLs the meter at seeded random points while it is busy, restarts it,
waits until its durable consumer has nothing pending, and checks the ledger — read
straight from the ledger stream — against the charges computed independently from the
test's own record of the events with the pure pricing functions: same entries, same
amounts, to the minor unit. A second test replays the whole stream into a fresh meter
(new state, new durable consumer) and gets identical totals. A third retries a dead letter
after the ledger's duplicate window has passed and finds nothing billed twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from services.cli.servers import free_port
from services.cli.supervisor import ServiceProcess
from services.common.messages import (
    ENDING_EVENTS,
    AllocEvent,
    LeaseFailed,
    LeaseInfo,
    LeaseLost,
    LeaseProvisioning,
    LeaseReady,
)
from services.common.nats_conn import read_stream
from services.common.settings import Settings, settings_to_env
from services.common.subjects import MeterNames, Subjects
from services.meter.accounts import entry_id, event_kind
from services.meter.model import LedgerEntry, LedgerRecord
from services.meter.pricing import RESERVED, ending_charges, reserved_charges

from ..helpers import eventually
from ..integration.test_meter_support import ENDS, granted, lease, publish_many, renewed

pytestmark = pytest.mark.timeout(170)

SEED = 20261125
MIN_BILL_S = 60
BASE = datetime(2026, 1, 27, tzinfo=UTC)  # leases straddle the January/February boundary
POOLS = [  # pool, provider, region, model, currency, on-demand price per unit-hour, reserved per unit-month
    ("p-use-h100", "skyforge", "us-east", "nvidia-h100-sxm-80gb", "USD", "3.1999", "1650"),
    ("p-usw-l40s", "skyforge", "us-west", "nvidia-l40s", "USD", "1.07", "520.50"),
    ("p-gz-910b", "ascend-west", "cn-gz", "huawei-ascend-910b", "CNY", "9.80", "5100"),
    ("p-yrd-h20", "pearl-river", "cn-yrd", "nvidia-h20-96gb", "CNY", "12.345678", "6000"),
    ("p-tyo-a100", "tidewater", "ap-northeast", "nvidia-a100-sxm-80gb", "JPY", "398", "190000"),
]
TENANTS = ["t1", "t2", "t3", "t4", "t5", "t6"]


@dataclass
class Scenario:
    events: list[AllocEvent]  # in publication order (by event time)
    msg_ids: list[str]  # Nats-Msg-Id of each publication (duplicates get another one)
    expected: dict[str, list[tuple[str, Decimal]]]  # lease -> [(entry id, amount)]


def deliver(events: list[AllocEvent], drng: random.Random) -> tuple[list[AllocEvent], datetime | None]:
    """The same lease delivered by its provider: provisioning at grant, then a ready a few
    seconds later before anything else happens (later events' seq +1); or a failure (or a
    loss) before ready instead of everything. Returns the events and the ready's time."""
    first = events[0]
    info = msgspec.structs.replace(first.lease, delivery="ssh", provision_timeout_s=300)
    start = info.granted_at
    out: list[AllocEvent] = [LeaseProvisioning(id=f"{info.lease_id}.1", at=start, lease=info, seq=1)]
    if drng.random() < 0.2:
        kind = drng.choice([LeaseFailed, LeaseLost])
        out.append(kind(id=f"{info.lease_id}.2", at=start + timedelta(seconds=drng.uniform(1, 300)), lease=info,
                        seq=2, reason="not ready within 300 s" if kind is LeaseFailed else "pool offline"))
        return out, None
    nxt = events[1].at if len(events) > 1 else info.expires_at
    ready_at = start + min(timedelta(seconds=drng.uniform(0.5, 30)), (nxt - start) / 2)
    out.append(LeaseReady(id=f"{info.lease_id}.2", at=ready_at, lease=info, seq=2))
    for e in events[1:]:
        out.append(msgspec.structs.replace(e, id=f"{info.lease_id}.{e.seq + 1}", seq=e.seq + 1,
                                           lease=msgspec.structs.replace(e.lease, delivery="ssh",
                                                                         provision_timeout_s=300)))
    return out, ready_at


def scenario(rng: random.Random, leases: int, duplicates: float = 0.03, delivered: float = 0.0,
             shares: float = 0.0) -> Scenario:
    """``delivered``: the fraction of leases a provider delivers (billed from their ready;
    drawn from a random stream of their own, so the rest of the scenario is the same).
    ``shares``: the fraction of leases that are a share of one device (docs/sharing.md:
    billed x milli/1000; their own random stream too)."""
    drng = random.Random(rng.random()) if delivered else None
    srng = random.Random(rng.random()) if shares else None
    timeline: list[tuple[datetime, int, AllocEvent]] = []
    expected: dict[str, list[tuple[str, Decimal]]] = {}
    for i in range(leases):
        pool, provider, region, model, currency, hourly, monthly = rng.choice(POOLS)
        billing = rng.choices(["on_demand", "interruptible", "reserved_month", "reserved_year"],
                              weights=[60, 28, 8, 4])[0]
        start = BASE + timedelta(seconds=rng.randrange(0, 10 * 86400), microseconds=rng.randrange(0, 10**6))
        units = rng.choice([1, 1, 2, 4, 8])
        common = dict(lease_id=f"lease_{i:05d}_{rng.getrandbits(32):08x}", request_id=f"req_{i}",
                      tenant=rng.choice(TENANTS), pool_id=pool, provider=provider, region=region, model=model,
                      units=units, billing=billing, currency=currency, granted_at=start)
        if srng is not None and srng.random() < shares:
            common.update(units=1, milli=srng.choice([100, 125, 250, 333, 500, 750]), devices=(srng.randrange(64),))
        events: list[AllocEvent] = []
        if billing in RESERVED:
            months = 1 if billing == "reserved_month" else 12
            info = LeaseInfo(**common, unit_price=Decimal(monthly), price_basis="unit_month", term_months=months,
                             expires_at=start + timedelta(hours=730 * months))
            events.append(granted(info))
            if rng.random() < 0.6:
                events.append(ENDS["released"](id=f"{info.lease_id}.2", at=start + timedelta(hours=rng.randrange(1, 700)),
                                               lease=info, seq=2))
            expected[info.lease_id] = [(entry_id(info.lease_id, c), c.amount) for c in reserved_charges(info)]
        else:
            price = Decimal(hourly) * (Decimal("0.35") if billing == "interruptible" else 1)
            price = price.quantize(Decimal("0.000001"))
            if rng.random() < 0.5:  # an open lease kept by renewals
                info = LeaseInfo(**common, unit_price=price, expires_at=start + timedelta(seconds=300), ttl_s=300)
                events.append(granted(info))
                at = start
                for seq in range(2, 2 + rng.randrange(0, 4)):
                    at = at + timedelta(seconds=rng.randrange(30, 290))
                    events.append(renewed(info, seq, at))
                    info = events[-1].lease
            else:  # a fixed duration
                info = LeaseInfo(**common, unit_price=price,
                                 expires_at=start + timedelta(seconds=rng.randrange(10, 3 * 86400)))
                events.append(granted(info))
            if rng.random() < 0.95:
                kind = rng.choices(["released", "expired", "preempted", "lost", "revoked"],
                                   weights=[50, 25, 10 if billing == "interruptible" else 0, 8, 7])[0]
                last = events[-1].at
                if kind == "expired":
                    at = info.expires_at + timedelta(seconds=rng.uniform(0, 2))
                else:
                    at = last + (info.expires_at - last) * rng.random()
                events.append(ENDS[kind](id=f"{info.lease_id}.{len(events) + 1}", at=at, lease=info,
                                         seq=len(events) + 1))
            expected[info.lease_id] = []
            ends = [e for e in events if isinstance(e, ENDING_EVENTS)]
            if ends:
                e = ends[0]
                expected[info.lease_id] = [(entry_id(info.lease_id, c), c.amount) for c in
                                           ending_charges(event_kind(e), e.at, e.lease, min_bill_s=MIN_BILL_S)]
        if drng is not None and drng.random() < delivered:
            events, ready_at = deliver(events, drng)
            info = events[-1].lease
            if ready_at is None:
                expected[info.lease_id] = []
            elif billing in RESERVED:
                expected[info.lease_id] = [(entry_id(info.lease_id, c), c.amount)
                                           for c in reserved_charges(info, ready_at)]
            else:
                ends = [e for e in events if isinstance(e, ENDING_EVENTS)]
                expected[info.lease_id] = [
                    (entry_id(info.lease_id, c), c.amount) for e in ends[:1]
                    for c in ending_charges(event_kind(e), e.at, e.lease, min_bill_s=MIN_BILL_S, start=ready_at)]
        for e in events:
            timeline.append((e.at, len(timeline), e))
    timeline.sort(key=lambda x: (x[0], x[1]))
    ordered = [e for _, _, e in timeline]
    msg_ids = [e.id for e in ordered]
    for k in rng.sample(range(len(ordered)), int(len(ordered) * duplicates)):  # replays of earlier events
        j = rng.randrange(k, len(ordered) + 1)
        ordered.insert(j, ordered[k])
        msg_ids.insert(j, f"dup{k}-{ordered[k].id}")
    return Scenario(ordered, msg_ids, expected)


def expected_totals(s: Scenario) -> dict[tuple[str, str], Decimal]:
    info = {}
    for e in s.events:
        info[e.lease.lease_id] = e.lease
    out: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for lease_id, charges in s.expected.items():
        lease = info[lease_id]
        for _, amount in charges:
            out[(lease.tenant, lease.currency)] += amount
    return dict(out)


_record = msgspec.json.Decoder(LedgerRecord)


async def read_ledger(js: JetStreamContext, names: MeterNames) -> list[LedgerEntry]:
    out = []
    async for _, data in read_stream(js, names.ledger_stream, names.ledger_subjects, batch=5000):
        record = _record.decode(data)
        if isinstance(record, LedgerEntry):
            out.append(record)
    return out


def ledger_totals(entries: list[LedgerEntry]) -> dict[tuple[str, str], Decimal]:
    out: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for e in entries:
        out[(e.tenant, e.currency)] += e.amount
    return dict(out)


def meter_process(settings: Settings, log: Path) -> ServiceProcess:
    env = {**settings_to_env(settings), "CB_LOG_LEVEL": "warning"}
    return ServiceProcess("meter", free_port(), env, log)


async def settled(js: JetStreamContext, settings: Settings, names: MeterNames, svc: ServiceProcess,
                  timeout: float = 60.0) -> None:
    """The durable consumer has nothing pending or unacked, and the meter folded its ledger."""
    stream = Subjects(settings.prefix).stream("alloc")
    headers = {"Authorization": f"Bearer {settings.admin_key}"}
    async with httpx.AsyncClient(base_url=svc.url, timeout=5) as http:
        async def done() -> bool:
            info = await js.consumer_info(stream, names.durable)
            if info.num_pending or info.num_ack_pending:
                return False
            ledger = await js.stream_info(names.ledger_stream)
            try:
                status = (await http.get("/v1/meter/status", headers=headers)).json()
            except httpx.HTTPError:
                return False
            return status.get("ledger_seq", -1) >= ledger.state.last_seq

        await eventually(done, timeout=timeout, every=0.1, what=f"meter settled (see {svc.log_path})")


async def api_totals(svc: ServiceProcess, settings: Settings) -> dict[tuple[str, str], Decimal]:
    async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
        body = (await http.get("/v1/usage", params={"group_by": "tenant"},
                               headers={"Authorization": f"Bearer {settings.admin_key}"})).json()
    return {(r["tenant"], r["currency"]): Decimal(r["amount"]) for r in body["rows"]}


def check_ledger(entries: list[LedgerEntry], s: Scenario) -> None:
    ids = Counter(e.id for e in entries)
    assert [i for i, n in ids.items() if n > 1] == [], "an entry was appended twice"
    got: dict[str, list[tuple[str, Decimal]]] = defaultdict(list)
    for e in entries:
        got[e.lease_id].append((e.id, e.amount))
    missing = [k for k, v in s.expected.items() if v and sorted(got.get(k, [])) != sorted(v)]
    assert missing == [], f"{len(missing)} leases billed wrongly, e.g. {missing[:3]}: " \
                          f"{[(s.expected[k], got.get(k)) for k in missing[:3]]}"
    assert set(got) <= {k for k, v in s.expected.items() if v}, "entries for leases that owe nothing"


async def test_sigkill_at_random_points_bills_exactly_once(settings, nc, tmp_path) -> None:
    rng = random.Random(SEED)
    s = scenario(rng, leases=5200, delivered=0.25, shares=0.2)
    assert len(s.events) >= 10_000
    assert sum(1 for e in s.events if e.lease.milli < 1000) > 1000  # shares of one device among them
    assert sum(isinstance(e, LeaseReady) for e in s.events) > 800
    js = nc.jetstream()
    settings = msgspec.structs.replace(settings, min_bill_s=MIN_BILL_S, meter_ack_wait_s=2.0, meter_batch=400)
    names = MeterNames.of(settings)
    svc = meter_process(settings, tmp_path / "meter.log")
    svc.start()
    await asyncio.to_thread(svc.wait_healthy)
    published = 0
    stream = Subjects(settings.prefix).stream("alloc")

    async def publisher() -> None:
        nonlocal published
        for i in range(0, len(s.events), 250):
            await publish_many(js, Subjects(settings.prefix), s.events[i:i + 250], msg_ids=s.msg_ids[i:i + 250])
            published = i + 250
            # a steady flow rather than one burst: at most ~1,000 events ahead of the meter

            async def caught_up(ahead: int = published - 1000) -> bool:
                info = await js.consumer_info(stream, names.durable)
                return (info.delivered.stream_seq if info.delivered else 0) >= ahead

            await eventually(caught_up, timeout=60, every=0.02, what="the meter keeping up")

    kills = []

    async def killer() -> None:
        for _ in range(6):
            # kill while busy: after a random number of ledger entries since the (re)start
            target = (await js.stream_info(names.ledger_stream)).state.last_seq + rng.randrange(20, 600)
            async def busy(target: int = target) -> bool:
                return (await js.stream_info(names.ledger_stream)).state.last_seq >= target

            try:
                await eventually(busy, timeout=20, every=0.01)
            except AssertionError:
                pass  # the flow ended first: kill it anyway
            assert svc.proc is not None
            os.kill(svc.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(svc.proc.wait)
            # what the dead meter held unacked will be redelivered to the next one
            info = await js.consumer_info(Subjects(settings.prefix).stream("alloc"), names.durable)
            kills.append((published, info.num_ack_pending))
            svc.start()
            await asyncio.to_thread(svc.wait_healthy)

    try:
        await asyncio.gather(publisher(), killer())
        await settled(js, settings, names, svc)
        assert len(kills) == 6
        interrupted = [k for k in kills if k[1] > 0]
        assert len(interrupted) >= 3, f"kills did not interrupt work, the test proved little: {kills}"
        entries = await read_ledger(js, names)
        check_ledger(entries, s)
        want = expected_totals(s)
        assert ledger_totals(entries) == want
        assert await api_totals(svc, settings) == want
        dlq = await js.stream_info(names.dlq_stream)
        assert dlq.state.messages == 0
    finally:
        svc.stop()


async def test_replay_into_a_fresh_meter_gives_identical_totals(settings, nc, tmp_path) -> None:
    rng = random.Random(SEED + 1)
    s = scenario(rng, leases=2500)
    js = nc.jetstream()
    await publish_many(js, Subjects(settings.prefix), s.events, msg_ids=s.msg_ids)
    first_ms = msgspec.structs.replace(settings, min_bill_s=MIN_BILL_S, meter_ack_wait_s=5.0)
    fresh_ms = msgspec.structs.replace(first_ms, meter_state=f"{settings.prefix}replay")
    first, fresh = MeterNames.of(first_ms), MeterNames.of(fresh_ms)
    assert (fresh.durable, fresh.ledger_stream, fresh.accounts) != (first.durable, first.ledger_stream, first.accounts)
    a = meter_process(first_ms, tmp_path / "first.log")
    b = meter_process(fresh_ms, tmp_path / "fresh.log")
    try:
        a.start()
        await asyncio.to_thread(a.wait_healthy)
        await settled(js, settings, first, a)
        first_entries = await read_ledger(js, first)
        check_ledger(first_entries, s)
        b.start()
        await asyncio.to_thread(b.wait_healthy)
        await settled(js, settings, fresh, b)
        fresh_entries = await read_ledger(js, fresh)
        assert ledger_totals(fresh_entries) == ledger_totals(first_entries) == expected_totals(s)
        assert sorted((e.id, e.amount) for e in fresh_entries) == sorted((e.id, e.amount) for e in first_entries)
        assert await api_totals(b, settings) == await api_totals(a, settings)
    finally:
        a.stop()
        b.stop()
        for name in (fresh.ledger_stream, fresh.dlq_stream, f"KV_{fresh.accounts}", f"KV_{fresh.invoices}",
                     f"KV_{fresh.budgets}"):
            try:
                await js.delete_stream(name)
            except Exception:  # noqa: BLE001 - not created
                pass


async def _set_max_msg_size(js: JetStreamContext, stream: str, size: int) -> None:
    config = (await js.stream_info(stream)).config
    await js.update_stream(msgspec.structs.replace(config, max_msg_size=size) if isinstance(config, msgspec.Struct)
                           else dataclasses.replace(config, max_msg_size=size))


async def test_a_dead_letter_retried_after_the_duplicate_window_bills_nothing_twice(settings, nc, tmp_path) -> None:
    """The ledger's de-duplication must not rest on a time window: an event whose ledger
    entries were appended but whose account write was refused is dead-lettered; retried
    once the ledger's ``Nats-Msg-Id`` window (here 1 s, in production 7 days) has passed,
    it appends the same entries again, and they must not be stored (or billed) twice."""
    js = nc.jetstream()
    settings = msgspec.structs.replace(settings, ledger_dup_window_s=1.0, meter_max_attempts=1,
                                       meter_ack_wait_s=2.0)
    names = MeterNames.of(settings)
    svc = meter_process(settings, tmp_path / "meter.log")
    svc.start()
    try:
        await asyncio.to_thread(svc.wait_healthy)
        # the accounts bucket refuses every write (a real refusal by the server: too big)
        await _set_max_msg_size(js, f"KV_{names.accounts}", 16)
        info = lease(billing="reserved_month", unit_price=Decimal("1650"), tenant="t-window")
        await publish_many(js, Subjects(settings.prefix), [granted(info)])

        async def dead_letter() -> int:
            return (await js.stream_info(names.dlq_stream)).state.messages

        await eventually(dead_letter, timeout=30, what=f"the event dead-lettered (see {svc.log_path})")
        entries = await read_ledger(js, names)
        assert [e.id for e in entries] == [entry_id(info.lease_id, c) for c in reserved_charges(info)]
        await _set_max_msg_size(js, f"KV_{names.accounts}", -1)

        # The ledger's duplicate window has passed once that of a scratch stream with the
        # same window has: JetStream forgets a message id when its window has passed since
        # it was stored, and the scratch id is stored after the entries' ids were.
        scratch = f"{settings.prefix.upper()}_WINDOW"
        await js.add_stream(StreamConfig(name=scratch, subjects=[f"{settings.prefix}.window"], duplicate_window=1.0,
                                         storage=StorageType.MEMORY))

        async def window_passed() -> bool:
            ack = await js.publish(f"{settings.prefix}.window", b"", headers={"Nats-Msg-Id": "probe"})
            return ack.seq > 1

        await eventually(window_passed, timeout=30, every=0.1, what="the duplicate window passed")
        alloc_seq = (await js.stream_info(Subjects(settings.prefix).stream("alloc"))).state.last_seq
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as http:
            r = await http.post(f"/v1/deadletters/{alloc_seq}/retry",
                                headers={"Authorization": f"Bearer {settings.admin_key}"})
        assert r.status_code == 200 and r.json()["outcome"] == "applied", r.text
        await settled(js, settings, names, svc)
        again = await read_ledger(js, names)
        check_ledger(again, Scenario([granted(info)], [], {info.lease_id: [(e.id, e.amount) for e in entries]}))
        assert await api_totals(svc, settings) == {("t-window", "USD"): sum(e.amount for e in entries)}
    finally:
        svc.stop()
