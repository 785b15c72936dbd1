"""The registry's durable record of pools: a JetStream key-value bucket.

Redis is rebuilt from it when lost; events tell the world, this remembers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.common.jetstream import bucket_values
from services.common.messages import Pool

_decoder = msgspec.json.Decoder(Pool)


class PoolRecords:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, pool_id: str) -> Pool | None:
        try:
            entry = await self.kv.get(pool_id)
        except KeyNotFoundError:
            return None
        return _decoder.decode(entry.value) if entry.value else None

    async def put(self, pool: Pool) -> bytes:
        raw = msgspec.json.encode(pool)
        await self.kv.put(pool.pool_id, raw)
        return raw

    async def delete(self, pool_id: str) -> None:
        await self.kv.delete(pool_id)

    async def all(self) -> AsyncIterator[Pool]:
        async with contextlib.aclosing(bucket_values(self.kv)) as values:
            async for value in values:
                yield _decoder.decode(value)
