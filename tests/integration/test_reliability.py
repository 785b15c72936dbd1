"""Reliability measured from real allocation events (docs/reliability.md): published to
JetStream, read by the meter's durable consumer, aggregated by the Lua script in Redis."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import pytest
import redis.asyncio as aioredis

from services.meter.reliability import ReliabilityFeed, ReliabilityRecord
from services.meter.reliability.record import RecordLost
from services.common.keys import Keys
from services.common.messages import (
    LeaseFailed,
    LeaseGranted,
    LeaseInfo,
    LeaseLost,
    LeaseProvisioning,
    LeaseReady,
    LeaseReleased,
)
from services.common.reliability import POOL, PROVIDER, read_reliability, read_scores
from services.common.subjects import Subjects

from ..helpers import eventually

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)


def info(lease_id: str, pool: str = "p1", provider: str = "acme", delivery: str = "ssh") -> LeaseInfo:
    return LeaseInfo(lease_id=lease_id, request_id="r-" + lease_id, tenant="t1", pool_id=pool, provider=provider,
                     region="cn-yrd", model="nvidia-a100-sxm-80gb", units=1, billing="on_demand",
                     unit_price=Decimal("2"), granted_at=T0, expires_at=T0 + timedelta(hours=1), delivery=delivery)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def delivered(lease_id: str, ready_s: float, end_s: float | None = None, lost: bool = False, **kw) -> list:
    lease = info(lease_id, **kw)
    events = [LeaseProvisioning(id=f"{lease_id}.1", at=T0, lease=lease),
              LeaseReady(id=f"{lease_id}.2", at=at(ready_s), lease=lease, seq=2)]
    if end_s is not None:
        end = LeaseLost if lost else LeaseReleased
        events.append(end(id=f"{lease_id}.3", at=at(end_s), lease=lease, seq=3))
    return events


def failed(lease_id: str, **kw) -> list:
    lease = info(lease_id, **kw)
    return [LeaseProvisioning(id=f"{lease_id}.1", at=T0, lease=lease),
            LeaseFailed(id=f"{lease_id}.2", at=at(30), lease=lease, seq=2, reason="no")]


async def publish(nc, subjects: Subjects, events: list, *, msg_id_suffix: str = "") -> None:
    js = nc.jetstream()
    for event in events:
        await js.publish(subjects.alloc(event.lease.region, event.lease.tenant), msgspec.json.encode(event),
                         headers={"Nats-Msg-Id": event.id + msg_id_suffix})


@pytest.fixture
async def broker_redis(settings):
    """A client like the broker's (bytes, not decoded): the record must read both."""
    client = aioredis.Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


async def test_counts_from_the_stream_once_each(nc, settings, subjects, broker_redis):
    keys = Keys(settings.prefix)
    events = (delivered("a", 10, 3600 + 10) + delivered("b", 20) + delivered("c", 30, 1800 + 30, lost=True)
              + failed("d")
              # lost while still provisioning: a failure, not a loss
              + [LeaseProvisioning(id="e.1", at=T0, lease=info("e")),
                 LeaseLost(id="e.2", at=at(5), lease=info("e"), seq=2, reason="pool offline")]
              # capacity only: granted is no delivery; its loss is a loss; hours from grant
              + [LeaseGranted(id="f.1", at=T0, lease=info("f", delivery="")),
                 LeaseLost(id="f.2", at=at(7200), lease=info("f", delivery=""), seq=2, reason="pool offline")]
              # another pool of the same provider
              + delivered("g", 40, 3600 + 40, pool="p2"))
    await publish(nc, subjects, events)
    record = ReliabilityRecord(broker_redis, keys)
    feed = ReliabilityFeed(nc, nc.jetstream(), subjects, record)
    await feed.start()
    try:
        async def settled():
            [rel] = await read_reliability(broker_redis, keys, PROVIDER, ["acme"], T0_MS + 7200_000)
            return rel if rel.deliveries + rel.failures + rel.losses == 8 else None
        await eventually(settled, what="every event recorded")
        # redelivery: the same events again under other message ids (JetStream would
        # otherwise drop them as duplicates), then one more fact to know they were read
        await publish(nc, subjects, events, msg_id_suffix=".again")
        await publish(nc, subjects, failed("h", pool="p2"))

        async def moved():
            [rel] = await read_reliability(broker_redis, keys, PROVIDER, ["acme"], T0_MS + 7200_000)
            return rel if rel.failures == 3 else None
        provider = await eventually(moved, what="the later failure recorded")
    finally:
        await feed.stop()
    pool, pool2 = await read_reliability(broker_redis, keys, POOL, ["p1", "p2"], T0_MS + 7200_000)
    # p1: delivered a, b, c; failed d, e; lost c and f
    assert (pool.deliveries, pool.failures, pool.losses) == (3, 2, 2)
    assert pool.score == pytest.approx((3 + 9) / (3 + 2 + 2 + 10))
    # lease-hours: a 1 h, b running since 20 s (to now = T0 + 2 h), c 0.5 h, f 2 h
    assert pool.lease_hours == pytest.approx(1 + (7200 - 20) / 3600 + 0.5 + 2, abs=1e-5)
    assert pool.losses_per_1000h == pytest.approx(2 * 1000 / pool.lease_hours, rel=1e-5)
    assert (pool.ready_p50_s, pool.ready_p95_s) == (20.0, 30.0)
    assert (pool2.deliveries, pool2.failures, pool2.losses) == (1, 1, 0)
    assert (provider.deliveries, provider.failures, provider.losses) == (4, 3, 2)
    assert provider.ready_p95_s == 40.0
    scores = await read_scores(broker_redis, keys)
    assert scores == {"p1": pytest.approx(12 / 17), "p2": pytest.approx(10 / 12)}
    assert await broker_redis.smembers(keys.reliability_pools("acme")) == {b"p1", b"p2"}


async def test_a_newcomer_scores_the_prior(settings, broker_redis):
    keys = Keys(settings.prefix)
    [rel] = await read_reliability(broker_redis, keys, POOL, ["nobody"], T0_MS)
    assert rel.score == pytest.approx(0.9)
    assert (rel.deliveries, rel.lease_hours, rel.losses_per_1000h, rel.ready_p50_s) == (0, 0.0, None, None)


async def test_a_ready_seen_after_the_loss_makes_it_a_loss(settings, broker_redis):
    """Redelivery can reorder a lease's events: the record ends where it would in order."""
    keys = Keys(settings.prefix)
    record = ReliabilityRecord(broker_redis, keys)
    assert await record.start()
    grant, ready, lost = delivered("x", 12, 612, lost=True)
    assert await record.apply(lost)
    [rel] = await read_reliability(broker_redis, keys, POOL, ["p1"], T0_MS)
    assert (rel.deliveries, rel.failures, rel.losses) == (0, 1, 0)  # as far as it knows: lost provisioning
    assert await record.apply(ready)
    assert not await record.apply(grant)  # nothing new: the lost event already named the lease
    assert not await record.apply(ready)
    [rel] = await read_reliability(broker_redis, keys, POOL, ["p1"], T0_MS)
    assert (rel.deliveries, rel.failures, rel.losses) == (1, 0, 1)
    assert rel.lease_hours == pytest.approx(600 / 3600, abs=1e-5)
    assert rel.ready_p50_s == 12.0
    assert json.loads(json.dumps(await read_scores(broker_redis, keys))) == {"p1": pytest.approx(10 / 12)}


async def test_two_replicas_share_the_feed_and_a_lost_record_is_rebuilt(nc, settings, subjects, broker_redis):
    """Two brokers' feeds on one durable consumer count each event once; a Redis that lost
    the record (every key of it gone) gets the stream replayed into it, once."""
    keys = Keys(settings.prefix)
    feeds = [ReliabilityFeed(nc, nc.jetstream(), subjects, ReliabilityRecord(broker_redis, keys), batch=3)
             for _ in range(2)]
    for feed in feeds:
        await feed.start()

    async def counts(want: tuple[int, int, int]):
        [rel] = await read_reliability(broker_redis, keys, PROVIDER, ["acme"], T0_MS)
        got = (rel.deliveries, rel.failures, rel.losses)
        assert all(g <= w for g, w in zip(got, want, strict=True)), f"counted twice: {got} > {want}"
        return got == want

    try:
        first = [e for i in range(10) for e in delivered(f"r{i}", 10 + i, 100, lost=i % 3 == 0)] + failed("rf")
        await publish(nc, subjects, first)
        await eventually(lambda: counts((10, 1, 4)), what="both replicas' share recorded")
        lost = [k async for k in broker_redis.scan_iter(match=keys.reliability_all(), count=10_000)]
        assert keys.reliability_since().encode() in lost
        await broker_redis.delete(*lost)  # Redis lost the record
        await publish(nc, subjects, failed("after"))
        await eventually(lambda: counts((10, 2, 4)), timeout=20, what="the record rebuilt from the stream")
    finally:
        for feed in feeds:
            await feed.stop()


class _ScanAfter:
    """A replica's Redis client (the real one) whose keyspace scans wait for ``gate``: it
    holds the second replica at the step CI caught it in, between finding the record
    unmarked and clearing it, until the first has rebuilt and written."""

    def __init__(self, redis, gate: asyncio.Event) -> None:
        self._redis, self._gate = redis, gate

    def __getattr__(self, name):
        return getattr(self._redis, name)

    async def scan_iter(self, *args, **kwargs):
        await self._gate.wait()
        async for key in self._redis.scan_iter(*args, **kwargs):
            yield key


async def test_replicas_rebuilding_at_once_keep_what_the_rebuild_wrote(settings, broker_redis):
    """Two replicas that find the record lost at once: one rebuilds it, and the other's
    start does not clear what the rebuild has written meanwhile (CI saw a rebuilt record
    that never reached the stream's counts)."""
    keys = Keys(settings.prefix)
    written = asyncio.Event()
    other_redis = aioredis.Redis.from_url(settings.redis_url)
    await broker_redis.ping()
    await other_redis.ping()  # both connected: the two starts' first commands reach Redis together
    first = ReliabilityRecord(broker_redis, keys)
    second = ReliabilityRecord(_ScanAfter(other_redis, written), keys)
    events = [e for i in range(10) for e in delivered(f"z{i}", 10 + i, 100, lost=i % 3 == 0)]

    async def rebuild(record: ReliabilityRecord, done: asyncio.Event | None) -> bool:
        try:
            if won := await record.start():
                await record.apply_all(events)
            return won
        finally:
            if done:
                done.set()

    try:
        won = await asyncio.gather(rebuild(first, written), rebuild(second, None))
    finally:
        await other_redis.aclose()
    assert sorted(won) == [False, True]
    [rel] = await read_reliability(broker_redis, keys, PROVIDER, ["acme"], T0_MS)
    assert (rel.deliveries, rel.failures, rel.losses) == (10, 0, 4)


async def test_a_record_being_rebuilt_takes_no_writes_and_a_lapsed_claim_cannot_open_it(settings, broker_redis):
    keys = Keys(settings.prefix)
    first, second = ReliabilityRecord(broker_redis, keys), ReliabilityRecord(broker_redis, keys)
    assert await first.claim()
    assert not await second.claim()  # one rebuild at a time
    with pytest.raises(RecordLost):
        await second.apply_all(failed("during"))
    assert [k async for k in broker_redis.scan_iter(match=keys.reliability_all())] == [
        keys.reliability_since().encode()]  # nothing but the claim was written
    await broker_redis.delete(keys.reliability_since())  # the first's claim lapsed (its replica stalled)
    assert await second.claim()
    assert not await first.open()  # the first's late work is not trusted
    assert await second.open()
    assert await first.apply_all(failed("after")) == [True, True]
    written = sorted([k async for k in broker_redis.scan_iter(match=keys.reliability_all())])
    with pytest.raises(RecordLost):  # the stalled replica goes on clearing: it deletes nothing of the new record
        await first.clear()
    assert sorted([k async for k in broker_redis.scan_iter(match=keys.reliability_all())]) == written
