"""Per-key request limits, shared by every replica of every service through Redis.

A fixed window per API key: the first request of a window creates a counter that
expires with the window; requests add to it in one Lua call (INCRBY, PEXPIRE on the
window's first, PTTL), so replicas never race on the window's start. Over the limit is
a 429 whose ``Retry-After`` is when the window ends. A fixed window lets a burst of up to
twice the limit straddle a boundary; for a guard against runaway clients that is fine
and far cheaper than a sliding log.

Concurrent requests are counted together, as heartbeats are written together: while
one round trip is in flight the next requests wait for the following one, which adds
each key's count in one call (a provider agent heartbeating thousands of pools a second
costs one small script call per batch, not one per request). At low load a batch is a
single request and nothing waits.
"""

from __future__ import annotations

import asyncio
import logging
import math

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from .auth import Principal
from .errors import TooManyRequests
from .keys import Keys

log = logging.getLogger(__name__)

WINDOW_SCRIPT = """
local n = redis.call('INCRBY', KEYS[1], ARGV[2])
if n == tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""

Count = tuple[int, int]  # this request's number in the window, milliseconds left


class RateLimiter:
    """``limit`` requests per ``window_s`` per API key; ``limit`` 0 turns it off."""

    def __init__(self, redis: Redis, keys: Keys, limit: int, window_s: float) -> None:
        self.redis, self.keys, self.limit = redis, keys, limit
        self.window_ms = max(1, int(window_s * 1000))
        self._script = redis.register_script(WINDOW_SCRIPT)
        self._pending: dict[str, list[asyncio.Future[Count]]] = {}
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def bucket(principal: Principal) -> str:
        """The key id (the bootstrap admin key has none: it counts as one key)."""
        return principal.key_id or f"{principal.role}-{principal.subject or 'key'}"

    async def hit(self, principal: Principal) -> None:
        if self.limit <= 0:
            return
        future: asyncio.Future[Count] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(self.bucket(principal), []).append(future)
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        count, ttl_ms = await future
        if count > self.limit:
            retry = max(1, math.ceil(ttl_ms / 1000))
            raise TooManyRequests(f"more than {self.limit} requests in {self.window_ms / 1000:g} s with this key; "
                                  f"retry in {retry} s", retry_after=retry)

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                try:
                    totals = await self._add(batch)
                except Exception as exc:  # noqa: BLE001 - a guard, not a gate: a Redis blip lets requests through
                    log.warning("rate limit not counted (%s); letting %d requests through", exc,
                                sum(len(f) for f in batch.values()))
                    totals = [(0, 0)] * len(batch)
                for futures, (total, ttl_ms) in zip(batch.values(), totals, strict=True):
                    first = int(total) - len(futures)
                    for i, future in enumerate(futures, 1):
                        if not future.done():
                            future.set_result((first + i, int(ttl_ms)))
        finally:
            self._task = None

    async def _add(self, batch: dict[str, list[asyncio.Future[Count]]]) -> list[Count]:
        pipe = self.redis.pipeline(transaction=False)
        for bucket, futures in batch.items():
            # the raw command, as in the registry's store: routed by its key's slot in a cluster too
            pipe.execute_command("EVALSHA", self._script.sha, 1, self.keys.rate_limit(bucket), self.window_ms,
                                 len(futures))
        try:
            return await pipe.execute()
        except NoScriptError:  # first use, or Redis restarted
            await self._script.registered_client.script_load(self._script.script)
            return await self._add(batch)
