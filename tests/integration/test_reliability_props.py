"""The reliability record is a function of the set of events, not of their delivery:
any order across and within leases, with any events delivered again, ends in the same
counters, scores and windows as the events once each in order, and those match a plain
model of what docs/reliability.md counts (real redis-server, the real Lua script)."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import timedelta

import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from services.meter.reliability import ReliabilityRecord
from services.common.keys import Keys
from services.common.messages import (
    LeaseExpired,
    LeaseFailed,
    LeaseGranted,
    LeaseLost,
    LeaseProvisioning,
    LeaseReady,
    LeaseReleased,
    LeaseRenewed,
)
from services.common.reliability import POOL, PROVIDER, read_reliability, read_scores

from .test_reliability import T0, T0_MS, info

# what happens to one lease: (delivers, ready after s or None, how it ends or None, end after s)
OUTCOMES = ("released", "expired", "lost", "failed", None)
LEASE = st.tuples(st.booleans(), st.one_of(st.none(), st.integers(1, 900)), st.sampled_from(OUTCOMES),
                  st.integers(1, 20_000), st.sampled_from(["pa", "pb", "pc"]))
OWNER = {"pa": "acme", "pb": "acme", "pc": "zeta"}


def lease_events(i: int, delivers: bool, ready_s: int | None, end: str | None, end_s: int, pool: str) -> list:
    lease = info(f"l{i}", pool=pool, provider=OWNER[pool], delivery="ssh" if delivers else "")
    seq = 1
    events: list = [(LeaseProvisioning if delivers else LeaseGranted)(id=f"l{i}.1", at=T0, lease=lease)]

    def add(cls, after: int, **kw) -> None:
        nonlocal seq
        seq += 1
        events.append(cls(id=f"l{i}.{seq}", at=T0 + timedelta(seconds=after), lease=lease, seq=seq, **kw))

    ready = delivers and ready_s is not None and end != "failed"
    if ready:
        add(LeaseReady, ready_s)
    if not delivers or ready:
        add(LeaseRenewed, (ready_s or 0) + 1)
    start = ready_s if ready else 0
    if end == "failed" and delivers:
        add(LeaseFailed, 60, reason="no")
    elif end in ("released", "expired", "lost"):
        add({"released": LeaseReleased, "expired": LeaseExpired, "lost": LeaseLost}[end], start + end_s)
    return events


def model(leases: list) -> dict[str, tuple[int, int, int]]:
    """(deliveries, failures, losses) per pool, counted as docs/reliability.md says."""
    out: dict[str, list[int]] = {}
    for delivers, ready_s, end, _, pool in leases:
        c = out.setdefault(pool, [0, 0, 0])
        ready = delivers and ready_s is not None and end != "failed"
        c[0] += ready
        c[1] += delivers and (end == "failed" or (end == "lost" and not ready))
        c[2] += end == "lost" and (ready or not delivers)
    return {p: tuple(c) for p, c in out.items()}


async def snapshot(client: aioredis.Redis, keys: Keys) -> tuple:
    now = T0_MS + 30 * 86_400_000
    pools = await read_reliability(client, keys, POOL, ["pa", "pb", "pc"], now)
    providers = await read_reliability(client, keys, PROVIDER, ["acme", "zeta"], now)
    windows = [sorted(await client.lrange(keys.reliability_samples(POOL, p), 0, -1)) for p in ("pa", "pb", "pc")]
    return pools, providers, windows, await read_scores(client, keys)


def test_any_delivery_order_and_redelivery_count_once(redis_url: str) -> None:
    loop = asyncio.new_event_loop()
    client = aioredis.Redis.from_url(redis_url)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(LEASE, min_size=1, max_size=12), st.randoms(use_true_random=False), st.integers(0, 3))
    def check(leases: list, rnd: random.Random, copies: int) -> None:
        events = [e for i, lease in enumerate(leases) for e in lease_events(i, *lease)]
        replayed = events + [rnd.choice(events) for _ in range(copies * len(events) // 2)]
        rnd.shuffle(replayed)
        once, messy = Keys(f"t{uuid.uuid4().hex[:10]}"), Keys(f"t{uuid.uuid4().hex[:10]}")

        async def run() -> tuple:
            once_record, messy_record = ReliabilityRecord(client, once), ReliabilityRecord(client, messy)
            assert await once_record.start() and await messy_record.start()
            for event in events:
                await once_record.apply(event)
            for chunk in range(0, len(replayed), 7):  # batches, as the feed applies them
                await messy_record.apply_all(replayed[chunk:chunk + 7])
            return await snapshot(client, once), await snapshot(client, messy)

        in_order, shuffled = loop.run_until_complete(run())
        assert shuffled == in_order
        pools = {r.subject: (r.deliveries, r.failures, r.losses) for r in in_order[0]}
        for pool, counts in model(leases).items():
            assert pools[pool] == counts, (pool, leases)

    try:
        check()
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
