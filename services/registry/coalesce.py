"""Concurrent single heartbeats share pipelined Redis round trips (see
``services.common.coalesce``): a batch carries each waiting heartbeat as one EVALSHA,
stamped with the latest of their arrival times."""

from __future__ import annotations

import asyncio

from services.common.coalesce import Coalescer

from .store import PoolStore, Transition

Item = tuple[str, str, int | None, str]  # region, pool id, healthy units, acting provider


class HeartbeatCoalescer:
    def __init__(self, store: PoolStore, max_batch: int = 512) -> None:
        self.store = store
        self._batches: Coalescer[tuple[Item, float], Transition] = Coalescer(self._flush, max_batch)

    def heartbeat(self, item: Item, now: float) -> asyncio.Future[Transition]:
        return self._batches.submit((item, now))

    async def _flush(self, batch: list[tuple[Item, float]]) -> list[Transition]:
        return await self.store.heartbeat_many([item for item, _ in batch], max(now for _, now in batch))
