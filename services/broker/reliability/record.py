"""The reliability record in Redis: ``record.lua`` applies one allocation event to the
facts of its lease and to its pool's and provider's counters, idempotently."""

from __future__ import annotations

import time
from collections.abc import Sequence
from importlib import resources

from redis.asyncio import Redis

from services.common.delivery import RELIABILITY_PRIOR
from services.common.keys import Keys
from services.common.messages import (
    AllocEvent,
    LeaseExpired,
    LeaseFailed,
    LeaseLost,
    LeasePreempted,
    LeaseReady,
    LeaseReleased,
    LeaseRevoked,
)
from services.common.reliability import POOL, PROVIDER, READY_WINDOW

LIVE_FACTS_TTL_S = 400 * 86_400  # a reserved year is the longest lease
ENDED_FACTS_TTL_S = 7 * 86_400  # long past any redelivery of its events
_SCRIPT = resources.files(__package__).joinpath("record.lua").read_text()
_ENDS = {LeaseFailed: "failed", LeaseLost: "lost", LeaseReleased: "end", LeaseExpired: "end",
         LeasePreempted: "end", LeaseRevoked: "end"}


class RecordLost(Exception):
    """Redis holds no record (new, or lost): the stream is replayed into it."""


def event_kind(event: AllocEvent) -> str:
    """The fact an event tells: ``ready``, an end (``failed``, ``lost``, ``end``) or only
    that the lease exists (``seen``: grants, renewals, replacements)."""
    if isinstance(event, LeaseReady):
        return "ready"
    return _ENDS.get(type(event), "seen")


def _ms(event_at) -> str:  # noqa: ANN001 - a datetime
    return str(round(event_at.timestamp() * 1000))


class ReliabilityRecord:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        self._script = redis.register_script(_SCRIPT)

    def _call(self, event: AllocEvent) -> tuple[list[str], list[str]]:
        lease, k = event.lease, self.keys
        keys = [k.reliability_lease(lease.lease_id), k.reliability(POOL, lease.pool_id),
                k.reliability(PROVIDER, lease.provider), k.reliability_samples(POOL, lease.pool_id),
                k.reliability_samples(PROVIDER, lease.provider), k.reliability_pools(lease.provider),
                k.reliability_scores(), k.reliability_version(), k.reliability_since()]
        good, bad = RELIABILITY_PRIOR
        args = [event_kind(event), _ms(event.at), _ms(lease.granted_at), "1" if lease.delivery else "0",
                lease.pool_id, str(READY_WINDOW), str(LIVE_FACTS_TTL_S), str(ENDED_FACTS_TTL_S), repr(good), repr(bad)]
        return keys, args

    async def start(self) -> bool:
        """Mark the record as started from the stream's first event; False if it was
        already (another replica, or an earlier start, did). A record found without its
        mark (someone deleted the mark to rebuild it) is cleared: the replay then counts
        every fact once."""
        if await self.redis.exists(self.keys.reliability_since()):
            return False
        since = self.keys.reliability_since()
        async for key in self.redis.scan_iter(match=self.keys.reliability_all(), count=1000):
            if key not in (since, since.encode()):
                await self.redis.delete(key)
        return bool(await self.redis.set(since, str(int(time.time())), nx=True))

    async def apply(self, event: AllocEvent) -> bool:
        """True if the event told the record something new."""
        [changed] = await self.apply_all([event])
        return changed

    async def apply_all(self, events: Sequence[AllocEvent]) -> list[bool]:
        """Several events in one round trip (each still one atomic script, in order).
        Raises ``RecordLost`` if the record is not there (nothing was written)."""
        if not events:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            keys, args = self._call(event)
            await self._script(keys=keys, args=args, client=pipe)  # queued (awaiting a pipeline returns it)
        results = await pipe.execute()
        if any(x == -1 for x in results):
            raise RecordLost("the reliability record is not in Redis: it is rebuilt from the stream")
        return [bool(x) for x in results]
