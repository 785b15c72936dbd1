"""Per-key request limits, shared by every replica of every service through Redis.

A fixed window per API key: the first request of a window creates a counter that
expires with the window; each request adds one, in one Lua call (INCR, PEXPIRE on the
first, PTTL), so replicas never race on the window's start and a Redis round trip is
the whole cost. Over the limit is a 429 whose ``Retry-After`` is when the window ends.
A fixed window lets a burst of up to twice the limit straddle a boundary; for a guard
against runaway clients that is fine and far cheaper than a sliding log.
"""

from __future__ import annotations

import math

from redis.asyncio import Redis

from .auth import Principal
from .errors import TooManyRequests
from .keys import Keys

WINDOW_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""


class RateLimiter:
    """``limit`` requests per ``window_s`` per API key; ``limit`` 0 turns it off."""

    def __init__(self, redis: Redis, keys: Keys, limit: int, window_s: float) -> None:
        self.keys, self.limit = keys, limit
        self.window_ms = max(1, int(window_s * 1000))
        self._script = redis.register_script(WINDOW_SCRIPT)

    @staticmethod
    def bucket(principal: Principal) -> str:
        """The key id (the bootstrap admin key has none: it counts as one key)."""
        return principal.key_id or f"{principal.role}-{principal.subject or 'key'}"

    async def hit(self, principal: Principal) -> None:
        if self.limit <= 0:
            return
        count, ttl_ms = await self._script(keys=[self.keys.rate_limit(self.bucket(principal))],
                                           args=[self.window_ms])
        if int(count) > self.limit:
            retry = max(1, math.ceil(int(ttl_ms) / 1000))
            raise TooManyRequests(f"more than {self.limit} requests in {self.window_ms / 1000:g} s with this key; "
                                  f"retry in {retry} s", retry_after=retry)
