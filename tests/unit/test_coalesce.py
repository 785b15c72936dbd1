"""The coalescer behind the broker's and registry's shared round trips (pure asyncio)."""

from __future__ import annotations

import asyncio

import pytest

from services.common.coalesce import Coalescer


async def test_concurrent_items_share_batches_and_get_their_own_results() -> None:
    batches: list[list[int]] = []
    gate, in_flight = asyncio.Event(), asyncio.Event()

    async def flush(items: list[int]) -> list[object]:
        batches.append(items)
        in_flight.set()
        await gate.wait()  # one round trip in flight: later items queue for the next
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    c: Coalescer[int, int] = Coalescer(flush)
    first = c.submit(0)
    await asyncio.wait_for(in_flight.wait(), 5)  # the drain task took item 0 alone
    rest = [c.submit(i) for i in range(1, 6)]  # queued at once (submit is synchronous)
    gate.set()
    assert await first == 0
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert batches == [[0], [1, 2, 3, 4, 5]]
    assert [r if isinstance(r, int) else str(r) for r in results] == ["odd 1", 20, "odd 3", 40, "odd 5"]


async def test_a_failed_flush_fails_every_item_of_its_batch_only() -> None:
    calls = 0

    async def flush(items: list[str]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("redis down")
        return [s.upper() for s in items]

    c: Coalescer[str, str] = Coalescer(flush, max_batch=2)
    tasks = [c.submit(s) for s in ("a", "b", "c")]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [type(r).__name__ if isinstance(r, Exception) else r for r in results] == \
        ["ConnectionError", "ConnectionError", "C"]
    assert await c.submit("d") == "D"  # the coalescer goes on after a failure


async def test_a_cancelled_drain_fails_the_waiting_items_instead_of_hanging() -> None:
    started = asyncio.Event()

    async def flush(items: list[int]) -> list[int]:
        started.set()
        await asyncio.Event().wait()  # never answers
        return items

    c: Coalescer[int, int] = Coalescer(flush, max_batch=1)
    a = c.submit(1)
    b = c.submit(2)
    await started.wait()
    assert c._task is not None  # noqa: SLF001
    c._task.cancel()  # noqa: SLF001 - what a shutdown does to it
    with pytest.raises(asyncio.CancelledError):
        await a
    with pytest.raises(RuntimeError, match="shutting down"):
        await asyncio.wait_for(b, 5)
