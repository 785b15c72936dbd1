"""The per-request Redis check: per-key rate limits, and whether the key still exists.

**Rate limits** are shared by every replica of every service: a fixed window per API key.
The first request of a window creates a counter that expires with the window; requests
add to it in one Lua call (INCRBY, PEXPIRE on the window's first, PTTL), so replicas
never race on the window's start. Over the limit is a 429 whose ``Retry-After`` is when
the window ends. A fixed window lets a burst of up to twice the limit straddle a
boundary; for a guard against runaway clients that is fine and far cheaper than a
sliding log.

**Revocation at once.** Each replica caches keys for a few seconds and drops a revoked
one when the revocation broadcast reaches it, but a request may get there first. So the
same round trip asks whether the key's live record still exists (a revocation deletes
it before it answers): a request made after a revocation returned is refused by every
replica, whatever the broadcast is doing.

Concurrent requests share a round trip (``Coalescer``, as heartbeats do): while one is
in flight the next requests wait for the following one, which adds each key's count in
one call. At low load a batch is a single request and nothing waits.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from .auth import Principal
from .coalesce import Coalescer
from .deadlines import Deadlines
from .errors import TooManyRequests
from .keys import Keys
from .redis_conn import is_cluster

log = logging.getLogger(__name__)

# Counts the hits of some keys in their windows and says which live key records exist.
# KEYS: the counters, then the key records to check; ARGV[1] window ms, ARGV[2] how many
# counters, then each counter's hits. Reply: {n, ttl} per counter, then 1/0 per record.
# On a single Redis a batch's keys go in one call; on Redis Cluster (each key in its own
# hash slot) one call per counter, and EXISTS for the records.
WINDOW_SCRIPT = """
local counters, out = tonumber(ARGV[2]), {}
for i = 1, counters do
  local hits = tonumber(ARGV[2 + i])
  local n = redis.call('INCRBY', KEYS[i], hits)
  if n == hits then redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl < 0 then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    ttl = tonumber(ARGV[1])
  end
  out[i] = {n, ttl}
end
for i = counters + 1, #KEYS do out[i] = redis.call('EXISTS', KEYS[i]) end
return out
"""


@dataclass(frozen=True, slots=True)
class Seen:
    count: int  # this request's number in its key's window (0: not counted)
    ttl_ms: int  # until the window ends
    key_exists: bool  # the key's live record is in Redis (False: revoked, or Redis lost it)


_UNCOUNTED = Seen(0, 0, True)


WAIT_S = 0.5  # a guard, not a gate: a request is never held longer than this by a Redis that stalls


class RateLimiter:
    """``limit`` requests per ``window_s`` per API key (``limit`` 0: no limit, but the
    key is still checked)."""

    def __init__(self, redis: Redis, keys: Keys, limit: int, window_s: float) -> None:
        self.redis, self.keys, self.limit = redis, keys, limit
        self.window_ms = max(1, int(window_s * 1000))
        self._script = redis.register_script(WINDOW_SCRIPT)
        self._cluster = is_cluster(redis)
        self._batches: Coalescer[Principal, Seen] = Coalescer(self._flush)
        self._waits = Deadlines(WAIT_S)

    @staticmethod
    def bucket(principal: Principal) -> str:
        """The key id (the bootstrap admin key has none: it counts as one key)."""
        return principal.key_id or f"{principal.role}-{principal.subject or 'key'}"

    async def hit(self, principal: Principal) -> bool:
        """Count one request; raise ``TooManyRequests`` over the limit. Returns whether
        the key's live record still exists (the caller re-checks the key if not)."""
        if self.limit <= 0 and not principal.key_id:
            return True
        try:
            async with self._waits.bound():
                seen = await self._batches.submit(principal)
        except TimeoutError:  # Redis is not answering: let it through, the handler fails fast on its own
            return True
        if self.limit > 0 and seen.count > self.limit:
            retry = max(1, math.ceil(seen.ttl_ms / 1000))
            raise TooManyRequests(f"more than {self.limit} requests in {self.window_ms / 1000:g} s with this key; "
                                  f"retry in {retry} s", retry_after=retry)
        return seen.key_exists

    async def _flush(self, principals: list[Principal]) -> list[Seen]:
        """One round trip for the hits of a batch, counted per key."""
        batch: dict[Principal, list[int]] = {}  # key -> positions of its hits in the batch
        for i, principal in enumerate(principals):
            batch.setdefault(principal, []).append(i)
        try:
            seen = await self._round_trip(batch)
        except Exception as exc:  # noqa: BLE001 - a guard, not a gate: a Redis blip lets requests through
            log.warning("rate limit not counted (%s); letting %d requests through", exc, len(principals))
            return [_UNCOUNTED] * len(principals)
        out: list[Seen] = [_UNCOUNTED] * len(principals)
        for positions, results in zip(batch.values(), seen, strict=True):
            for i, result in zip(positions, results, strict=True):
                out[i] = result
        return out

    async def _round_trip(self, batch: dict[Principal, list[int]]) -> list[list[Seen]]:
        """One script call for the whole batch (on Redis Cluster, a command or two per key):
        a request arriving alone is a batch of one, and most batches hold several keys."""
        counted = [p for p in batch if self.limit > 0]
        checked = [p for p in batch if p.key_id]
        if self._cluster or not counted and not checked:
            return await self._round_trip_per_key(batch)
        keys = [self.keys.rate_limit(self.bucket(p)) for p in counted] + \
               [self.keys.api_key(p.key_id) for p in checked]  # type: ignore[arg-type]
        args = [self.window_ms, len(counted), *(len(batch[p]) for p in counted)]
        try:
            raw = await self.redis.evalsha(self._script.sha, len(keys), *keys, *args)
        except NoScriptError:  # first use, or Redis restarted
            await self.redis.script_load(self._script.script)
            raw = await self.redis.evalsha(self._script.sha, len(keys), *keys, *args)
        windows = dict(zip(counted, raw[:len(counted)], strict=True))
        exists = dict(zip(checked, raw[len(counted):], strict=True))
        return [self._seen(hits, windows.get(p), bool(exists.get(p, 1))) for p, hits in batch.items()]

    def _seen(self, hits: list[int], window: list[int] | None, exists: bool) -> list[Seen]:
        """Each hit's number in its key's window, from the window's count after the batch."""
        total, ttl_ms = window if window is not None else (0, 0)
        first = int(total) - len(hits) if window is not None else -len(hits)
        return [Seen(first + i, int(ttl_ms), exists) for i in range(1, len(hits) + 1)]

    async def _round_trip_per_key(self, batch: dict[Principal, list[int]]) -> list[list[Seen]]:
        pipe = self.redis.pipeline(transaction=False)
        for principal, hits in batch.items():
            if self.limit > 0:  # the raw command, as in the registry's store: routed by its key's slot
                pipe.execute_command("EVALSHA", self._script.sha, 1, self.keys.rate_limit(self.bucket(principal)),
                                     self.window_ms, 1, len(hits))
            if principal.key_id:
                pipe.exists(self.keys.api_key(principal.key_id))
        try:
            replies = iter(await pipe.execute())
        except NoScriptError:  # first use, or Redis restarted
            await self._script.registered_client.script_load(self._script.script)
            return await self._round_trip_per_key(batch)
        out = []
        for principal, hits in batch.items():
            window = next(replies)[0] if self.limit > 0 else None
            exists = bool(next(replies)) if principal.key_id else True
            out.append(self._seen(hits, window, exists))
        return out
