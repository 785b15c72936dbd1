"""A Redis lock with an owner: taken with a random token (``SET NX PX``), released only
by that token (``lua/release_lock.lua``). A holder that outlived its lock cannot delete
the next holder's. Locks here only spare duplicated work (one queue pass, one rebuild at
a time); what must happen once is guarded by a compare-and-set of its own (claims)."""

from __future__ import annotations

import uuid
from importlib import resources

from redis.asyncio import Redis

_RELEASE = resources.files("services.broker.lua").joinpath("release_lock.lua").read_text()


class OwnedLock:
    def __init__(self, redis: Redis, key: str, ttl_ms: int) -> None:
        self.redis, self.key, self.ttl_ms = redis, key, ttl_ms
        self._release = redis.register_script(_RELEASE)

    async def acquire(self) -> str | None:
        """The owner's token, or None when another holds the lock."""
        token = uuid.uuid4().hex
        return token if await self.redis.set(self.key, token, nx=True, px=self.ttl_ms) else None

    async def release(self, token: str) -> bool:
        """False when the lock had expired and is someone else's (or nobody's) now."""
        return int(await self._release(keys=[self.key], args=[token])) == 1
