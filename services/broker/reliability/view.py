"""``GET /v1/providers/{id}/reliability``: a provider's record and its pools'.

Any authenticated role may read it: a provider's record is what ranking acts on, the
same figures quotes show every tenant (docs/reliability.md, "Who sees it")."""

from __future__ import annotations

import time

import msgspec
from redis.asyncio import Redis

from services.common.delivery import Reliability
from services.common.errors import BadRequest, NotFound
from services.common.ids import is_valid_id
from services.common.keys import Keys
from services.common.reliability import POOL, PROVIDER, read_reliability


class ProviderReliability(msgspec.Struct, frozen=True, kw_only=True):
    provider: Reliability
    pools: list[Reliability]  # every registered pool of the provider and every pool with a record, by id


async def provider_reliability(redis: Redis, keys: Keys, provider: str, registered: list[str]) -> ProviderReliability:
    """``registered``: the provider's pools this broker knows of (a pool that never had a
    lease still shows, with the prior)."""
    if not is_valid_id(provider):
        raise BadRequest(f"provider id {provider[:64]!r} is not an id (a-z 0-9 _ -, at most 63)")
    recorded = {x.decode() if isinstance(x, bytes) else x for x in await redis.smembers(keys.reliability_pools(provider))}
    pools = sorted(recorded | set(registered))
    if not pools:
        raise NotFound(f"no provider {provider}: it has no pools and no record")
    now_ms = int(time.time() * 1000)
    [mine] = await read_reliability(redis, keys, PROVIDER, [provider], now_ms)
    return ProviderReliability(provider=mine, pools=await read_reliability(redis, keys, POOL, pools, now_ms))
