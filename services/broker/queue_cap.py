"""A cap on each tenant's queued requests (docs/overload.md): one tenant could queue
thousands, each costing every queue pass a placement attempt.

Each request that enters the queue is added to its tenant's set; leaving the queue
(placed, cancelled, rejected, expired) is not tracked where it happens: when the set
reaches the cap it is pruned of ids no longer queued, then counted again. Two requests
of one tenant racing at the cap may both get in: the cap is exact to within the
replicas' concurrency, which is what a guard against floods needs.
"""

from __future__ import annotations

from redis.asyncio import Redis

from services.common.errors import TooManyRequests
from services.common.keys import Keys

RETRY_AFTER_S = 5  # the queue is tried on every capacity change and at least every second


def refused(reason: str, reasons: list[str], request_id: str) -> TooManyRequests:
    return TooManyRequests(reason, RETRY_AFTER_S, reasons=reasons, request_id=request_id)


class TenantQueueCap:
    def __init__(self, redis: Redis, keys: Keys, cap: int) -> None:
        self.redis, self.keys, self.cap = redis, keys, cap

    async def refusal(self, tenant: str, request_id: str) -> str | None:
        """``None``, with ``request_id`` counted against ``tenant``; or why it may not queue."""
        if self.cap <= 0:
            return None
        key = self.keys.tenant_queued(tenant)
        if await self.redis.scard(key) >= self.cap:
            await self._prune(key)
            if (queued := await self.redis.scard(key)) >= self.cap:
                return (f"tenant {tenant} has {queued} requests queued, its limit of {self.cap}; retry when "
                        "some are placed or cancelled")
        await self.redis.sadd(key, request_id)
        return None

    async def _prune(self, key: str) -> None:
        members = list(await self.redis.smembers(key))
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.zscore(self.keys.queue(), member)
            scores = await pipe.execute()
        gone = [m for m, score in zip(members, scores, strict=True) if score is None]
        if gone:
            await self.redis.srem(key, *gone)
