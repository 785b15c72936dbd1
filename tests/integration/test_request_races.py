"""Issue 11, reproductions 3, 4 and 5, laid out exactly with two broker replicas in the
test's loop: one replica is stopped at a gate in its own code (just before it reserves)
while the other side acts, then let go.

* a cancel answered 200 while a queue pass was placing the same request;
* two queue passes (the first outlived its lock) placing one queued request twice;
* preemption ending its victims before it knows it can place, and two preemptors
  picking the same victims;
* a 202 "queued" whose only trace was an event JetStream never stored."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import pytest

from services.broker.domain.requests import ComputeRequest
from services.broker.access import AccessStore
from services.broker.leases import LeaseStore
from services.common.errors import BrokerError
from services.common.messages import AllocEvent, LeaseInfo, LeasePreempted, RequestEvent, RequestQueued
from services.common.nats_conn import ensure_streams, read_stream
from services.common.subjects import ACCESS

from ..helpers import EventTap, eventually
from .broker_replicas import REGION, Gate, reached, replicas, tenant

pytestmark = pytest.mark.asyncio
_request_event = msgspec.json.Decoder(RequestEvent)



async def _gone(rds, key: str) -> bool:  # noqa: ANN001
    return not await rds.exists(key)

def body(**fields: object) -> ComputeRequest:
    return msgspec.convert(fields, ComputeRequest)


async def place(broker, name: str, **fields: object) -> tuple[int, dict]:  # noqa: ANN001
    try:
        status, view = await broker.place(tenant(name), body(**fields))
    except BrokerError as exc:
        return exc.status, {"detail": exc.detail}
    return status, msgspec.to_builtins(view)


async def queued_behind_a_full_pool(rs) -> tuple[str, str]:  # noqa: ANN001
    """Pool ``p`` (8 units) full with t1's lease; t2's 4-unit request queued. Returns
    (the full lease, the queued request)."""
    a = rs.brokers[0]
    await rs.pool("p", 8)
    status, full = await place(a, "t1", units=8)
    assert status == 201, full
    status, queued = await place(a, "t2", units=4)
    assert status == 202, queued
    return full["leases"][0]["lease_id"], queued["request_id"]


async def test_a_cancel_answered_200_is_never_placed(settings, nc) -> None:
    async with replicas(settings, 1) as rs:
        a = rs.brokers[0]
        full, request_id = await queued_behind_a_full_pool(rs)
        await a.release(tenant("t1"), full)
        gate = Gate(a.leases, "reserve_many")
        passing = asyncio.create_task(a.run_queue())
        assert await reached(gate, passing), "the queue pass did not try to place the request"
        try:
            view = await a.cancel(tenant("t2"), request_id)
            cancelled = view.state == "cancelled"
        except BrokerError as exc:
            assert exc.status == 409 and "placing" in exc.detail, exc.detail
            cancelled = False
        gate.open.set()
        await passing
        record = await a.record(request_id)
        leases = await rs.leases_of(request_id)
        if cancelled:  # the caller was told it is cancelled: then it is, and holds nothing
            assert record.state == "cancelled" and leases == [], (record.state, leases)
        else:
            assert record.state == "placed" and len(leases) == 1


async def test_two_queue_passes_place_a_request_once(settings, nc, rds) -> None:
    """The first pass outlives its lock (made to expire here, as a slow pass would); a
    second replica's pass starts, and both reach the same queued request."""
    async with replicas(settings, 2) as rs:
        a, b = rs.brokers
        full, request_id = await queued_behind_a_full_pool(rs)
        await a.release(tenant("t1"), full)
        await rs.sees_free(b, "p", 8)
        gate = Gate(a.leases, "reserve_many")
        first = asyncio.create_task(a.run_queue())
        assert await reached(gate, first)
        await rds.pexpire(rs.keys.lock("queue"), 1)
        await eventually(lambda: _gone(rds, rs.keys.lock("queue")), every=0.005, what="the queue lock expired")
        await b.run_queue()
        gate.open.set()
        await first
        leases = await rs.leases_of(request_id)
        assert len(leases) == 1, [lease.lease_id for lease in leases]
        assert int(await rds.hget(rs.keys.pool(REGION, "p"), "leased")) == 4
        assert (await a.record(request_id)).state == "placed"


async def test_preemption_ends_its_victims_only_for_its_own_placement(settings, nc, rds) -> None:
    """While a preemptor has made room, a concurrent request (straight to the reservation
    script) reaches for the same units: the victim must not end for nothing."""
    async with replicas(settings, 1) as rs:
        a = rs.brokers[0]
        await rs.pool("p", 8)
        status, victim = await place(a, "t1", units=8, billing="interruptible", priority=2)
        assert status == 201
        victim_id = victim["leases"][0]["lease_id"]
        gate = Gate(a.leases, "reserve_many")
        preempting = asyncio.create_task(place(a, "t2", units=8, queue=False))
        now = datetime.now(UTC)
        other = LeaseInfo(lease_id="lease-other", request_id="req-other", tenant="t3", pool_id="p",
                          provider="acme", region=REGION, model="m", units=8, billing="on_demand",
                          unit_price=Decimal(1), granted_at=now, expires_at=now + timedelta(hours=1))
        await reached(gate, preempting)  # the old code stops here with its victim already ended
        took, _ = await LeaseStore(a.redis, rs.keys).reserve(REGION, [other], (now + timedelta(hours=1)).timestamp())
        gate.open.set()
        status, placed = await preempting
        victim_alive = await rds.exists(rs.keys.lease(REGION, victim_id))
        assert victim_alive or status == 201, f"victim ended, yet the preemptor got {status}: {placed}"
        assert not (took and status == 201)
        assert int(await rds.hget(rs.keys.pool(REGION, "p"), "leased")) <= 8


async def test_two_preemptors_never_end_a_victim_for_nothing(settings, nc, rds, subjects) -> None:
    """Two replicas preempt at once on one pool held by two interruptible leases: one
    wants both, the other one of them. Whatever the order, a preempted lease was ended
    for a request that got placed."""
    async with replicas(settings, 2) as rs, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        a, b = rs.brokers
        for attempt in range(4):
            pool = f"p{attempt}"
            await rs.pool(pool, 8)
            region_pool = {"accelerators": {"models": ["nvidia-a100-sxm-80gb"]}}
            for _ in range(2):
                status, _ = await place(a, "t1", units=4, billing="interruptible", priority=2, **region_pool)
                assert status == 201
            await rs.sees_free(b, pool, 0)
            barrier, arrived = asyncio.Event(), []
            for broker in (a, b):  # both read the same victims before either acts
                original = broker.leases.interruptible

                async def read_then_wait(region: str, original=original) -> list:
                    found = await original(region)
                    arrived.append(1)
                    if len(arrived) >= 2:
                        barrier.set()
                    await asyncio.wait_for(barrier.wait(), 5)
                    return found

                broker.leases.interruptible = read_then_wait
            (s_a, v_a), (s_b, v_b) = await asyncio.gather(place(a, "t2", units=8, queue=False),
                                                          place(b, "t2", units=4, queue=False))
            for broker in (a, b):
                del broker.leases.interruptible
            placed = {v["request_id"] for s, v in ((s_a, v_a), (s_b, v_b)) if s == 201}
            with contextlib.suppress(AssertionError):
                await alloc.wait_for(lambda e: False, timeout=0.3)  # the preemption notices arrive
            for event in alloc.events:
                if isinstance(event, LeasePreempted) and event.lease.pool_id == pool:
                    assert event.by_request in placed, f"attempt {attempt}: {event.lease.lease_id} ended for " \
                                                       f"{event.by_request}, which got {s_a}/{s_b}"
            assert int(await rds.hget(rs.keys.pool(REGION, pool), "leased")) <= 8
            # the next attempt on a fresh pool: this one is left full
            for name in ("t1", "t2"):
                for lease in await a.leases.of_tenant(name):
                    await a.release(tenant(name), lease.lease_id)
            await rs.registry.delete(f"/v1/pools/{pool}", headers=rs.provider)


async def test_a_202_queued_survives_a_redis_loss(settings, nc, rds) -> None:
    """JetStream does not store the request's events (its stream is gone for a moment):
    a 202 may only be answered once the queued request is durable."""
    async with replicas(settings, 1) as rs:
        a = rs.brokers[0]
        await rs.pool("p", 8)
        assert (await place(a, "t1", units=8))[0] == 201
        js = nc.jetstream()
        await js.delete_stream(rs.subjects.stream("request"))
        status, view = await place(a, "t2", units=4)
        await ensure_streams(js, rs.subjects)
        assert status in (202, 503), view
        if status == 503:  # told to retry: nothing of it may stay queued to be placed later
            assert await rds.zcard(rs.keys.queue()) == 0
            return
        request_id = view["request_id"]
        # the broker's request records lost (as in a Redis loss), then the rebuild
        await rds.delete(rs.keys.request(request_id), rs.keys.queue(), rs.keys.rebuilt_marker("broker"))
        await a.rebuild_if_lost()
        record = await a.record(request_id)
        assert record is not None and record.state == "queued", "the 202 queued request was lost"


async def test_a_queued_request_s_event_carries_no_workload_and_the_rebuild_finds_it(settings, nc, rds) -> None:
    """Ops and the tenant read request.queued on the event stream: a workload's env (its
    secrets) and script are not in it. The rebuild after a Redis loss takes the workload
    from the access bucket, where intake stored it."""
    async with replicas(settings, 1) as rs:
        a = rs.brokers[0]
        a.core.access = await AccessStore.open(nc, rs.subjects.bucket(ACCESS))
        await rs.pool("p", 8, delivery=["process"])
        assert (await place(a, "t1", units=8))[0] == 201
        workload = {"kind": "process", "command": ["train.sh"], "env": {"HF_TOKEN": "hf_s3cret_value"}}
        status, view = await place(a, "t2", units=4, workload=workload)
        assert status == 202, view
        request_id = view["request_id"]
        events = [data async for _, data in read_stream(nc.jetstream(), rs.subjects.stream("request"),
                                                        rs.subjects.events("request"))]
        [queued] = [e for e in map(_request_event.decode, events)
                    if isinstance(e, RequestQueued) and e.request_id == request_id]
        assert queued.workload_stored and b"s3cret" not in queued.body and b"train.sh" not in queued.body
        assert not any(b"s3cret" in data for data in events)
        await rds.delete(rs.keys.request(request_id), rs.keys.queue(), rs.keys.rebuilt_marker("broker"))
        await a.rebuild_if_lost()
        record = await a.record(request_id)
        assert record is not None and record.state == "queued"
        assert msgspec.to_builtins(record.body.workload) == workload  # env and command back


async def test_a_queued_request_whose_workload_is_lost_is_rejected_not_placed_bare(settings, nc, rds) -> None:
    async with replicas(settings, 1) as rs:
        a = rs.brokers[0]
        a.core.access = await AccessStore.open(nc, rs.subjects.bucket(ACCESS))
        await rs.pool("p", 8, delivery=["process"])
        full = (await place(a, "t1", units=8))[1]["leases"][0]["lease_id"]
        status, view = await place(a, "t2", units=4, workload={"kind": "process", "command": ["x"]})
        assert status == 202, view
        request_id = view["request_id"]
        await a.core.access.kv.purge(f"workload.{request_id}")  # the bucket lost it
        await rds.delete(rs.keys.request(request_id), rs.keys.queue(), rs.keys.rebuilt_marker("broker"))
        await a.rebuild_if_lost()
        record = await a.record(request_id)
        assert record is not None and record.state == "rejected" and "workload was lost" in record.reasons[0]
        assert await rds.zcard(rs.keys.queue()) == 0
        await a.release(tenant("t1"), full)
        assert await a.run_queue() == 0 and await rs.leases_of(request_id) == []


async def test_the_rebuild_restores_the_queued_requests_and_only_those(settings, nc, rds) -> None:
    """After the request records are lost: a queued request comes back; a cancelled one
    and one a queue pass placed do not (their events are acknowledged too)."""
    async with replicas(settings, 1) as rs:
        a = rs.brokers[0]
        full, placed_later = await queued_behind_a_full_pool(rs)
        cancelled = (await place(a, "t2", units=4))[1]["request_id"]
        waiting = (await place(a, "t2", units=8))[1]["request_id"]
        await a.cancel(tenant("t2"), cancelled)
        await a.release(tenant("t1"), full)
        assert await a.run_queue() == 1  # the 4-unit request; the 8-unit one waits behind it
        assert (await a.record(placed_later)).state == "placed"
        lost = [rs.keys.request(i) for i in (placed_later, cancelled, waiting)]
        await rds.delete(*lost, rs.keys.queue(), rs.keys.rebuilt_marker("broker"))
        await a.rebuild_if_lost()
        assert (await a.record(waiting)).state == "queued"
        assert await a.record(cancelled) is None and await a.record(placed_later) is None
        assert await rds.zrange(rs.keys.queue(), 0, -1) == [waiting]


async def test_cancel_answers_409_with_the_state_and_changes_nothing(settings, nc) -> None:
    async with replicas(settings, 1) as rs:
        a = rs.brokers[0]
        await rs.pool("p", 8)
        status, view = await place(a, "t1", units=2)
        assert status == 201
        with pytest.raises(BrokerError) as refused:
            await a.cancel(tenant("t1"), view["request_id"])
        assert refused.value.status == 409 and refused.value.extra["state"] == "placed"
        assert (await a.record(view["request_id"])).state == "placed"
        assert len(await rs.leases_of(view["request_id"])) == 1


async def test_a_lock_outlived_by_its_holder_is_not_released_by_it(settings, rds) -> None:
    from services.broker.locks import OwnedLock

    key = f"{settings.prefix}:lock:queue"
    first, second = OwnedLock(rds, key, 10_000), OwnedLock(rds, key, 10_000)
    slow = await first.acquire()
    assert slow and await second.acquire() is None
    await rds.pexpire(key, 1)  # the first holder's pass outlives its lock
    await eventually(lambda: _gone(rds, key), every=0.005, what="the lock expired")
    fresh = await second.acquire()
    assert fresh and not await first.release(slow)  # the late holder cannot delete the new lock
    assert await rds.get(key) == fresh
    assert await second.release(fresh) and not await rds.exists(key)


async def test_a_request_durable_but_not_written_to_redis_is_taken_back(settings, nc, rds) -> None:
    """Redis refuses the queue's writes (here: its fair-share key holds a wrong type)
    after the queued event was acknowledged: 503, and the record takes it back, so a
    rebuild does not place it for a client that was told to retry."""
    async with replicas(settings, 1) as rs:
        a = rs.brokers[0]
        await rs.pool("p", 8)
        assert (await place(a, "t1", units=8))[0] == 201
        await rds.set(rs.keys.tenant_vtime(), "not a hash")
        status, _ = await place(a, "t2", units=4)
        assert status == 503
        await rds.delete(rs.keys.tenant_vtime(), rs.keys.queue(), rs.keys.rebuilt_marker("broker"))
        for key in [k async for k in rds.scan_iter(match=f"{settings.prefix}:req:*", count=10_000)]:
            await rds.delete(key)
        await a.rebuild_if_lost()
        assert await rds.zcard(rs.keys.queue()) == 0


async def test_a_preempted_grant_in_progress_is_billed_nothing(settings, nc, rds, subjects) -> None:
    """The victim is an interruptible lease still being granted (reserved, its grant not
    yet durable nor confirmed). Preempted then, its placement fails (503: its lease is
    gone by confirmation), so the record must end it at its grant time, billed nothing,
    not as a lease.preempted billed from grant to preemption."""
    from services.broker.recovery import RETRACTED
    from services.common.messages import LeaseGranted, LeaseLost

    async with replicas(settings, 1) as rs, \
            EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        a = rs.brokers[0]
        await rs.pool("p", 8)
        entered, release = asyncio.Event(), asyncio.Event()
        original = a.placement.make_durable

        async def first_waits(*args: object, **kwargs: object) -> None:  # only the victim's grant stops
            if not entered.is_set():
                entered.set()
                await release.wait()
            await original(*args, **kwargs)

        a.placement.make_durable = first_waits
        granting = asyncio.create_task(place(a, "t1", units=8, billing="interruptible", priority=2))
        await asyncio.wait_for(entered.wait(), 15)
        status, preemptor = await place(a, "t2", units=8, queue=False)
        release.set()
        victim_status, _ = await granting
        assert status == 201, preemptor
        assert victim_status == 503  # its lease was gone when it came to confirm it
        victim = (await alloc.wait_for(lambda e: isinstance(e, LeaseGranted) and e.lease.tenant == "t1")).lease
        ends = await alloc.wait_for(lambda e: e.lease.lease_id == victim.lease_id and e.seq > 1)
        assert isinstance(ends, LeaseLost) and ends.reason in RETRACTED, ends
        assert ends.at == victim.granted_at, "a grant its client never had is billed"


async def test_a_placement_cancelled_while_its_reservation_waits_for_a_batch_takes_nothing(
        settings, nc, rds) -> None:
    """placement_timeout_s cancels a placement whose reservation is still waiting in the
    coalescer behind a batch in flight: its rollback runs at once (and finds nothing), so
    the reservation must not run after it: the units would stay taken, unconfirmed, until
    the sweep 30 s later."""
    async with replicas(settings, 1) as rs:
        a = rs.brokers[0]
        await rs.pool("p", 8)
        gate = Gate(a.leases, "reserve_many")
        first = asyncio.create_task(place(a, "t1", units=2))
        assert await reached(gate, first)
        late = asyncio.create_task(place(a, "t2", units=3))
        await eventually(lambda: a.placement._reservations._pending, timeout=5, every=0.01,
                         what="the second reservation queued behind the first")
        late.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await late
        await asyncio.gather(*a.placement._rollbacks)
        gate.open.set()
        status, _ = await first
        assert status == 201
        if (draining := a.placement._reservations._task) is not None:
            await draining  # the coalescer has sent whatever it still held
        assert int(await rds.hget(rs.keys.pool(REGION, "p"), "leased")) == 2, "a cancelled placement took units"


async def test_a_request_queued_for_a_client_that_heard_503_is_taken_back(settings, nc, rds) -> None:
    """placement_timeout_s cancels a placement after its RequestQueued was acknowledged,
    while it is written to Redis: the client hears 503 ("nothing was granted: retry"),
    so the request must not stay queued, now or after a rebuild from the record."""
    async with replicas(settings, 1) as rs:
        a = rs.brokers[0]
        await rs.pool("p", 8)
        assert (await place(a, "t1", units=8))[0] == 201
        gate = Gate(a.core.requests, "queue")
        placing = asyncio.create_task(place(a, "t2", units=4))
        assert await reached(gate, placing)
        placing.cancel()  # the deadline passes here: the event is durable, Redis not written yet
        with contextlib.suppress(asyncio.CancelledError):
            await placing
        del a.core.requests.queue  # the gate: the rebuild below queues for real
        await asyncio.gather(*a.queue._taking_back)
        await rds.delete(rs.keys.queue(), rs.keys.rebuilt_marker("broker"))
        for key in [k async for k in rds.scan_iter(match=f"{settings.prefix}:req:*", count=10_000)]:
            await rds.delete(key)
        await a.rebuild_if_lost()
        assert await rds.zcard(rs.keys.queue()) == 0, "a request whose client heard 503 came back queued"


async def test_the_tenant_queue_cap_counts_the_requests_a_rebuild_queued_again(settings, nc, rds) -> None:
    """After a Redis loss the rebuild puts the queued requests back: they still count
    against their tenant's cap (docs/overload.md)."""
    async with replicas(settings, 1) as rs:
        a = rs.brokers[0]
        a.queue_cap.cap = 1
        await rs.pool("p", 8)
        assert (await place(a, "t1", units=8))[0] == 201
        assert (await place(a, "t2", units=4))[0] == 202
        assert (await place(a, "t2", units=2))[0] == 429  # at its cap
        lost = [k async for k in rds.scan_iter(match=f"{settings.prefix}:req:*", count=10_000)]
        await rds.delete(*lost, rs.keys.queue(), rs.keys.tenant_queued("t2"), rs.keys.rebuilt_marker("broker"))
        await a.rebuild_if_lost()
        assert await rds.zcard(rs.keys.queue()) == 1
        status, view = await place(a, "t2", units=2)
        assert status == 429, f"the tenant queued past its cap after a rebuild: {status} {view}"


@pytest.mark.parametrize("landed", [False, True], ids=["answer-lost", "ack-lost"])
async def test_an_answer_the_key_could_not_record_is_never_a_grant_its_client_does_not_hear(
        settings, nc, landed: bool) -> None:
    """The placement granted its lease, then recording the key's answer in the durable
    record failed (NATS did not answer: the write was lost, or it landed and its
    acknowledgement was lost). The client must hear either the 201, or an error with
    nothing granted, never an error while the lease stands and is billed."""
    import uuid

    import nats

    from services.broker.idempotency import Keyring
    from services.broker.key_grants import LeaseGrants
    from services.common.subjects import IDEMPOTENCY

    async with replicas(settings, 1) as rs:
        a = rs.brokers[0]
        await rs.pool("p", 8)
        kv = await Keyring.open_bucket(nc, rs.subjects.bucket(IDEMPOTENCY))
        keyring = Keyring(a.redis, rs.keys, kv, LeaseGrants(a), stale_s=6.0)
        update, failed = kv.update, []

        async def done_write_fails(key: str, value: bytes, last: int | None = None) -> int:
            if b'"state":"done"' in value and not failed:
                failed.append(key)
                if landed:
                    await update(key, value, last=last)
                raise nats.errors.TimeoutError
            return await update(key, value, last=last)

        kv.update = done_write_fails
        data = body(units=2)

        async def run(request_id: str) -> tuple[int, bytes]:
            status, view = await a.place(tenant("t1"), data, request_id)
            return status, msgspec.json.encode(view)

        try:
            status, _ = await keyring.run("t1", uuid.uuid4().hex, msgspec.json.encode(data), run,
                                          lambda *_: None)  # type: ignore[arg-type,return-value]
        except Exception as exc:  # noqa: BLE001 - what the client would hear
            status = getattr(exc, "status", type(exc).__name__)
        assert failed, "the answer was never written"
        live = await a.leases.of_tenant("t1")
        if status == 201:
            assert len(live) == 1
        else:
            assert status == 503 and live == [], f"the client heard {status} while {len(live)} lease(s) stand"
            assert int(await a.redis.hget(rs.keys.pool(REGION, "p"), "leased")) == 0


async def test_a_late_pool_offline_that_named_no_leases_ends_none(settings, nc) -> None:
    """The pool went offline holding no lease (the event names none), came back, and a
    lease was granted on it; the broker handles that offline event only now (it was
    down, or the event was retried): the new lease is not the event's to end."""
    async with replicas(settings, 1) as rs:
        a = rs.brokers[0]
        await rs.pool("p", 8)
        generation = a.world.generations["p"]
        assert generation > 0
        status, view = await place(a, "t1", units=2)
        assert status == 201
        ended = await a.pool_lost(REGION, "p", "pool offline", generation=generation, lease_ids=())
        assert ended == 0 and len(await a.leases.of_tenant("t1")) == 1, "a lease granted after the outage was lost"
