"""The lease transitions' outbox (docs/lifecycle.md, "Outbox") on real servers: a
transition whose broker dies right after its script (the script ran, nothing was
published) reaches the allocation stream anyway, once, from the broker's sweep, and the
meter bills it once, also when the same event comes again after JetStream's duplicate
window; in the normal path nothing stays in the outbox."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec

from services.broker.domain.requests import ComputeRequest
from services.broker.leases import Ended, LeaseStore
from services.broker.outbox import NEVER_COMPLETED, Notice, entry_event, iso, owed_event
from services.common.keys import Keys
from services.common.messages import (
    AllocEvent,
    LeaseExpired,
    LeaseFailed,
    LeaseInfo,
    LeaseLost,
    LeasePreempted,
    LeaseReady,
    LeaseReleased,
    LeaseRenewed,
)
from services.common.nats_conn import read_stream
from services.common.tracing import nats_headers
from services.meter.model import LedgerEntry
from services.meter.service import utcnow

from ..helpers import EventTap, eventually
from .broker_replicas import REGION as REPLICAS_REGION
from .broker_replicas import Gate, reached, replicas, tenant
from .broker_world import broker_world
from .test_meter_broker import DELIVERING, SSH, _ledger
from .test_meter_support import meter_world

REGION = "cn-gz"
ASK = {"units": 2, "placement": {"regions": [REGION]}, "workload": SSH}
_info = msgspec.json.Decoder(LeaseInfo)
_alloc = msgspec.json.Decoder(AllocEvent)


async def _stream(nc, subjects) -> list[AllocEvent]:
    return [_alloc.decode(data) async for _, data in read_stream(nc.jetstream(), subjects.stream("alloc"),
                                                                  subjects.events("alloc"))]


async def _lease(rds, keys: Keys, lease_id: str) -> LeaseInfo:
    return _info.decode(await rds.hget(keys.lease(REGION, lease_id), "info"))


async def test_transitions_whose_broker_died_after_the_script_are_published_once_and_billed_once(
        settings, nc, subjects, rds) -> None:
    """ready, renew and release each run as the broker runs them, up to and including the
    script, and nothing after (the broker died there). The running broker's sweep
    publishes the three events once each, exactly as they would have been; the meter
    bills the lease from that ready to that release, once, and again once when the
    release comes a second time under another message id (as after the duplicate window)."""
    settings = msgspec.structs.replace(settings, outbox_grace_s=0.5)
    keys = Keys(settings.prefix)
    store = LeaseStore(rds, keys)
    async with broker_world(settings, DELIVERING) as w, meter_world(settings, nc, clock=utcnow) as m, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        r = await w.request("t1", ASK)
        assert r.status_code == 201, r.text
        lease_id = r.json()["leases"][0]["lease_id"]
        lease = await _lease(rds, keys, lease_id)

        ready_at = datetime.now(UTC)
        assert await store.lease_ready(lease, ready_at.timestamp(), at=ready_at) == (2, lease)
        renewed_at = ready_at + timedelta(seconds=1)
        renewed = msgspec.structs.replace(lease, expires_at=renewed_at + timedelta(seconds=lease.ttl_s))
        assert await store.renew(renewed, renewed_at.timestamp(), at=renewed_at) == 3
        released_at = renewed_at + timedelta(seconds=1)
        notice = Notice(LeaseReleased, released_at)
        ended = await store.end(renewed, "release", released_at.timestamp(), notice)
        assert isinstance(ended, Ended) and ended.seq == 4 and ended.free_after == 16
        owed = await rds.hgetall(keys.lease_outbox(REGION))
        assert sorted(owed) == [f"{lease_id}.{seq}" for seq in (2, 3, 4)]
        # what the sweep will publish is what the broker would have published
        assert entry_event(owed[f"{lease_id}.4"]) == LeaseReleased(
            id=f"{lease_id}.4", at=released_at, lease=renewed, seq=4, free_after=16)

        await alloc.wait_for(lambda e: isinstance(e, LeaseReleased) and e.lease.lease_id == lease_id)
        await eventually(lambda: _empty(rds, keys), what="the outbox emptied")
        mine = [e for e in await _stream(nc, subjects) if e.lease.lease_id == lease_id]
        assert [(type(e), e.id, e.seq) for e in mine] == [
            (type(mine[0]), f"{lease_id}.1", 1),
            (LeaseReady, f"{lease_id}.2", 2), (LeaseRenewed, f"{lease_id}.3", 3), (LeaseReleased, f"{lease_id}.4", 4)]
        assert mine[1] == LeaseReady(id=f"{lease_id}.2", at=ready_at, lease=lease, seq=2)
        assert mine[2] == LeaseRenewed(id=f"{lease_id}.3", at=renewed_at, lease=renewed, seq=3)
        assert mine[3] == LeaseReleased(id=f"{lease_id}.4", at=released_at, lease=renewed, seq=4, free_after=16)
        assert await w.free("gz-ssh") == 16

        await m.settled()
        billed = [r for r in await _ledger(m) if isinstance(r, LedgerEntry) and r.lease_id == lease_id]
        [entry] = billed  # from the ready to the release: the 60 s minimum of 2 units at 1.20/unit-hour
        assert (entry.start, entry.end, entry.amount) == (ready_at, ready_at + timedelta(seconds=60), Decimal("0.04"))

        # the same release again after JetStream's duplicate window (another message id):
        # the meter skips it (seq at or below the lease's account's), nothing more is billed
        ack = await nc.jetstream().publish(subjects.alloc(REGION, "t1"), msgspec.json.encode(mine[3]),
                                           headers=nats_headers({"Nats-Msg-Id": f"{mine[3].id}-after-the-window"}))
        assert not ack.duplicate
        await m.settled()
        assert [r for r in await _ledger(m) if isinstance(r, LedgerEntry) and r.lease_id == lease_id] == billed


async def test_a_failure_whose_broker_died_after_the_script_is_failed_over(settings, nc, subjects, rds) -> None:
    """provisioning → failed, the broker dead right after the script: the swept
    lease.failed reaches the failover work queue too, and the request gets its
    replacement, once."""
    settings = msgspec.structs.replace(settings, outbox_grace_s=0.5)
    keys = Keys(settings.prefix)
    store = LeaseStore(rds, keys)
    pools = {**DELIVERING, "gz-ssh2": {**DELIVERING["gz-ssh"], "prices": {"on_demand": "1.50"}}}
    async with broker_world(settings, pools) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        r = await w.request("t1", ASK)
        assert r.status_code == 201, r.text
        request_id, lease_id = r.json()["request_id"], r.json()["leases"][0]["lease_id"]
        lease = await _lease(rds, keys, lease_id)
        now = datetime.now(UTC)
        notice = Notice(LeaseFailed, now, {"reason": "image pull failed"})
        assert isinstance(await store.end_from(lease, "fail", now.timestamp(), "provisioning", notice), Ended)

        failed = await alloc.wait_for(lambda e: isinstance(e, LeaseFailed) and e.lease.lease_id == lease_id)
        assert (failed.id, failed.seq, failed.reason, failed.at) == (f"{lease_id}.2", 2, "image pull failed", now)
        replacement = await alloc.wait_for(lambda e: e.lease.replaces == lease_id)
        assert replacement.lease.request_id == request_id and replacement.lease.pool_id != lease.pool_id
        await eventually(lambda: _empty(rds, keys), what="the outbox emptied")
        assert [e.id for e in await _stream(nc, subjects) if e.lease.replaces == lease_id] == [replacement.id]


async def test_the_normal_path_leaves_nothing_in_the_outbox(settings, nc, subjects, rds) -> None:
    """Through the API: ready, renew, release and failed each publish their event and
    clear its outbox entry before they answer."""
    keys = Keys(settings.prefix)
    async with broker_world(settings, DELIVERING) as w, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        good, bad = [(await w.request("t1", ASK)).json()["leases"][0]["lease_id"] for _ in range(2)]
        steps = [
            (w.broker.post(f"/v1/leases/{good}/ready", json={"access": {"host": "gpu-1.example"}},
                           headers=w.provider), LeaseReady, good),
            (w.broker.post(f"/v1/leases/{good}/renew", headers=w.tenants["t1"]), LeaseRenewed, good),
            (w.broker.post(f"/v1/leases/{good}/release", headers=w.tenants["t1"]), LeaseReleased, good),
            (w.broker.post(f"/v1/leases/{bad}/failed", json={"reason": "no capacity"}, headers=w.provider),
             LeaseFailed, bad),
        ]
        for call, kind, lease_id in steps:
            r = await call
            assert r.status_code == 200, r.text
            assert await rds.hgetall(keys.lease_outbox(REGION)) == {}, kind
            await alloc.wait_for(lambda e, k=kind, i=lease_id: isinstance(e, k) and e.lease.lease_id == i)


async def test_a_release_whose_broker_died_is_republished_once_by_two_sweeping_replicas(settings, nc, subjects,
                                                                                      rds) -> None:
    """The real release path of one replica stopped dead between its script and its
    publish (the task cancelled there); then both replicas sweep the same entry, one
    after the other has already published and removed it. The release reaches the stream
    once (the second copy is dropped by its message id) and the outbox is empty: nobody
    needs to claim an entry."""
    async with replicas(settings, 2) as rs, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        a, b = rs.brokers
        await rs.pool("p", 8)
        status, view = await a.place(tenant("t1"), msgspec.convert({"units": 2}, ComputeRequest))
        assert status == 201
        lease_id = view.leases[0].lease_id
        gate = Gate(a.core, "publish_alloc")
        dying = asyncio.create_task(a.release(tenant("t1"), lease_id))
        assert await reached(gate, dying), "the release did not get to its publish"
        dying.cancel()  # the broker dies: its script ran, its event was never sent
        with contextlib.suppress(asyncio.CancelledError):
            await dying
        gate.open.set()
        outbox = rs.keys.lease_outbox(REPLICAS_REGION)
        assert list(await rds.hgetall(outbox)) == [f"{lease_id}.2"]
        assert await a.core.leases.get(lease_id) is None  # Redis has the release

        assert await a.recovery.republish_owed() == 0  # within the grace: the broker may still be publishing
        for broker in (a, b):
            broker.core.outbox.grace_s = 0.0
        late = Gate(a.core, "publish_owed")  # a has read the entry, b sweeps it all meanwhile
        sweeping = asyncio.create_task(a.recovery.republish_owed())
        assert await reached(late, sweeping)
        assert await b.recovery.republish_owed() == 1
        late.open.set()
        assert await sweeping == 1  # republished again: the same id, dropped by JetStream
        released = await alloc.wait_for(lambda e: isinstance(e, LeaseReleased) and e.lease.lease_id == lease_id)
        assert (released.id, released.seq, released.free_after) == (f"{lease_id}.2", 2, 8)
        assert await rds.hgetall(outbox) == {}
        assert [e.id for e in await _stream(nc, subjects) if e.lease.lease_id == lease_id] == [
            f"{lease_id}.1", f"{lease_id}.2"]


async def test_a_preemption_whose_broker_died_after_its_script_publishes_the_victim_s_end(settings, nc, subjects,
                                                                                          rds) -> None:
    """preempt.lua ended the victim and reserved the new lease; the broker died before it
    announced the end (the task cancelled at its first publish). The victim's
    lease.preempted is in the outbox, and the other replica's sweep publishes it, with
    the request it was preempted for; in the normal path the outbox is left empty."""
    async with replicas(settings, 2) as rs, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        a, b = rs.brokers
        await rs.pool("p", 8)
        body = {"units": 8, "billing": "interruptible", "priority": 2}
        status, victim = await a.place(tenant("t1"), msgspec.convert(body, ComputeRequest))
        assert status == 201
        victim_id = victim.leases[0].lease_id
        gate = Gate(a.core, "publish_alloc")
        dying = asyncio.create_task(a.place(tenant("t2"), msgspec.convert({"units": 8, "queue": False},
                                                                           ComputeRequest)))
        assert await reached(gate, dying), "the preemption did not get to its publish"
        dying.cancel()  # the broker dies: the script ran, nothing was announced
        with contextlib.suppress(asyncio.CancelledError):
            await dying
        gate.open.set()
        outbox = rs.keys.lease_outbox(REPLICAS_REGION)
        assert list(await rds.hgetall(outbox)) == [f"{victim_id}.2"]
        b.core.outbox.grace_s = 0.0
        assert await b.recovery.republish_owed() == 1
        ended = await alloc.wait_for(lambda e: isinstance(e, LeasePreempted) and e.lease.lease_id == victim_id)
        assert (ended.id, ended.seq) == (f"{victim_id}.2", 2) and ended.by_request.startswith("req")
        assert await rds.hgetall(outbox) == {}

        # the normal path: the victim's event published and its entry gone before the answer
        await rs.pool("q", 4, region=REPLICAS_REGION)
        status, second = await a.place(tenant("t1"), msgspec.convert({**body, "units": 4}, ComputeRequest))
        assert status == 201 and second.leases[0].pool_id == "q"
        status, _ = await a.place(tenant("t2"), msgspec.convert({"units": 4, "queue": False}, ComputeRequest))
        assert status == 201
        assert await rds.hgetall(outbox) == {}
        await alloc.wait_for(lambda e: isinstance(e, LeasePreempted) and e.lease.lease_id == second.leases[0].lease_id)


async def _empty(rds, keys: Keys) -> bool:
    return await rds.hlen(keys.lease_outbox(REGION)) == 0


def test_an_unconfirmed_expiry_is_owed_as_a_loss_at_its_grant() -> None:
    """The sweep's expiry of a lease never confirmed (its broker died mid-grant) is owed,
    and republished, as ``lease.lost`` at the grant time: nothing is billed for it."""
    granted = datetime(2026, 1, 1, tzinfo=UTC)
    lease = LeaseInfo(lease_id="l1", request_id="r", tenant="t", pool_id="p", provider="acme", region=REGION,
                      model="m", units=1, billing="on_demand", unit_price=Decimal("1.20"), granted_at=granted,
                      expires_at=granted + timedelta(seconds=30))
    now = granted + timedelta(seconds=31)
    tag, at, extra = Notice(LeaseExpired, now).args()
    assert at == iso(now)
    raw = msgspec.json.encode(lease)
    assert owed_event(tag, at, extra, raw, 2, 5, pending=True) == LeaseLost(
        id="l1.2", at=granted, lease=lease, seq=2, free_after=5, reason=NEVER_COMPLETED)
    assert owed_event(tag, at, extra, raw, 2, 5, pending=False) == LeaseExpired(
        id="l1.2", at=now, lease=lease, seq=2, free_after=5)
