"""Concurrent callers share round trips.

Under load many requests want the same kind of Redis work at once; sending each as
its own command costs a connection checkout, a round trip and redis-py's per-call
overhead apiece (tens of microseconds of CPU, more than the work). Items submitted
while a batch is in flight wait for the next one, which carries all of them in one
pipeline. At low load a batch is a single item and nothing is delayed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Flush = Callable[[list[T]], Awaitable[Sequence["R | BaseException"]]]


class Coalescer(Generic[T, R]):
    """``flush(items)`` does one batch and returns one result per item, in order; a
    result that is an exception is raised to that item's caller only. If ``flush``
    itself raises, every caller of the batch gets the exception.

    ``drop_cancelled``: an item whose caller was cancelled before its batch is sent is not
    sent. For work the caller undoes when it is cancelled (a reservation): sent after the
    undo, it would stay done with nobody to undo it."""

    def __init__(self, flush: Flush, max_batch: int = 512, drop_cancelled: bool = False) -> None:
        self.flush = flush
        self.max_batch = max_batch
        self.drop_cancelled = drop_cancelled
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: T) -> asyncio.Future[R]:
        """The item's result, to await. A plain function returning the future, not a
        coroutine: on the hot paths every coroutine layer costs a frame resumed per
        await."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                if self.drop_cancelled:
                    batch = [(item, future) for item, future in batch if not future.cancelled()]
                    if not batch:
                        continue
                try:
                    results = await self.flush([item for item, _ in batch])
                except BaseException as exc:  # handed to every waiter (a cancel too)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._task = None
            left, self._pending = self._pending, []  # only when the drain itself was cancelled
            for _, future in left:
                if not future.done():
                    future.set_exception(RuntimeError("shutting down: the batch was not sent"))
