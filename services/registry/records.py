"""The registry's durable record of pools: a JetStream key-value bucket.

The record is the authority on which pools exist, who owns each and its generation;
Redis follows it (``lua/pool.lua``) and is rebuilt from it when lost. Every write is a
compare-and-set on the key's revision (create-only for a new pool), so two writers never
both win, and whoever loses reads again and decides again.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from services.common.jetstream import WRONG_LAST_SEQUENCE, bucket_entries
from services.common.messages import Pool

_decoder = msgspec.json.Decoder(Pool)


class RecordChanged(Exception):
    """The key is not at the revision the write expected: read again."""


@dataclass(frozen=True, slots=True)
class Entry:
    pool: Pool  # its generation resolved
    revision: int


def _resolved(raw: bytes, revision: int) -> Pool:
    pool = _decoder.decode(raw)
    return pool if pool.generation else msgspec.structs.replace(pool, generation=revision)


class PoolRecords:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def entry(self, pool_id: str) -> Entry | None:
        try:
            entry = await self.kv.get(pool_id)
        except KeyNotFoundError:
            return None
        return Entry(_resolved(entry.value, entry.revision), entry.revision) if entry.value else None

    async def get(self, pool_id: str) -> Pool | None:
        entry = await self.entry(pool_id)
        return entry.pool if entry else None

    async def create(self, pool: Pool) -> Entry:
        """A new pool (or one removed before): fails if the key holds a pool. Its
        generation is the revision of this write."""
        try:
            revision = await self.kv.create(pool.pool_id, msgspec.json.encode(
                msgspec.structs.replace(pool, generation=0)))
        except KeyWrongLastSequenceError as exc:
            raise RecordChanged(pool.pool_id) from exc
        return Entry(msgspec.structs.replace(pool, generation=revision), revision)

    async def update(self, pool: Pool, last: int) -> Entry:
        """Replace the record if it is still at revision ``last``."""
        try:
            revision = await self.kv.update(pool.pool_id, msgspec.json.encode(pool), last=last)
        except KeyWrongLastSequenceError as exc:
            raise RecordChanged(pool.pool_id) from exc
        return Entry(pool, revision)

    async def delete(self, pool_id: str, last: int) -> None:
        """Remove the record if it is still at revision ``last``."""
        try:
            await self.kv.delete(pool_id, last=last)
        except APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                raise RecordChanged(pool_id) from exc
            raise

    async def entries(self) -> AsyncIterator[Entry]:
        async with contextlib.aclosing(bucket_entries(self.kv)) as entries:
            async for value, revision in entries:
                yield Entry(_resolved(value, revision), revision)

    async def all(self) -> AsyncIterator[Pool]:
        async for entry in self.entries():
            yield entry.pool
