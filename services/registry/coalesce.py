"""Coalesce concurrent single heartbeats into pipelined Redis round trips.

Under load, many heartbeat requests are in flight at once; sending each as its own
EVALSHA costs a connection checkout and a round trip apiece. Requests that arrive
while a round trip is in flight wait for the next one, which carries all of them in
one pipeline. At low load a batch is a single heartbeat and nothing is delayed.
"""

from __future__ import annotations

import asyncio

from .store import PoolStore, Transition

Item = tuple[str, str, int | None, str]  # region, pool id, healthy units, acting provider


class HeartbeatCoalescer:
    def __init__(self, store: PoolStore, max_batch: int = 512) -> None:
        self.store = store
        self.max_batch = max_batch
        self._pending: list[tuple[Item, float, asyncio.Future[Transition]]] = []
        self._task: asyncio.Task[None] | None = None

    async def heartbeat(self, item: Item, now: float) -> Transition:
        future: asyncio.Future[Transition] = asyncio.get_running_loop().create_future()
        self._pending.append((item, now, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                now = max(n for _, n, _ in batch)
                try:
                    results = await self.store.heartbeat_many([i for i, _, _ in batch], now)
                except Exception as exc:  # noqa: BLE001 - handed to every waiter
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._task = None
