"""``Deadlines``: one sweeper bounds many requests, with ``asyncio.timeout``'s semantics."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from services.common.deadlines import Deadlines


async def test_a_bound_past_its_time_raises_timeout_error_and_the_sweeper_stops() -> None:
    deadlines = Deadlines(0.1, tick_s=0.02)
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError):
        async with deadlines.bound() as bound:
            await asyncio.Event().wait()  # never set: only the deadline ends it
    took = time.perf_counter() - t0
    assert bound.fired and 0.1 <= took < 1.0, took
    assert not deadlines.open
    if (sweeper := deadlines.sweeper) is not None:  # it ends on its own once nothing is open
        await asyncio.wait_for(sweeper, 1)
    assert deadlines.sweeper is None


async def test_work_done_in_time_is_left_alone_and_later_bounds_still_fire() -> None:
    deadlines = Deadlines(0.2, tick_s=0.02)
    async with deadlines.bound() as quick:
        pass
    assert not quick.fired and not deadlines.open
    slow_bound = asyncio.Event()

    async def slow() -> str:
        async with deadlines.bound():
            slow_bound.set()
            await asyncio.Event().wait()
        return "finished"

    async def fast(i: int) -> int:
        async with deadlines.bound():
            await slow_bound.wait()  # suspended in its bound, beside the slow one, then done in time
        return i

    results = await asyncio.gather(slow(), *(fast(i) for i in range(50)), return_exceptions=True)
    assert isinstance(results[0], TimeoutError)
    assert results[1:] == list(range(50))
    assert not deadlines.open


async def test_a_cancellation_from_outside_is_not_turned_into_a_timeout() -> None:
    deadlines = Deadlines(0.05, tick_s=0.01)
    entered = asyncio.Event()

    async def work() -> None:
        async with deadlines.bound():
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(work())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not deadlines.open


async def test_a_timeout_inside_another_task_s_cancellation_count_is_kept() -> None:
    """After a bound fires and is handled, the task is not left 'cancelling' (a later
    ``asyncio.timeout`` in it still works)."""
    deadlines = Deadlines(0.05, tick_s=0.01)
    with pytest.raises(TimeoutError):
        async with deadlines.bound():
            await asyncio.Event().wait()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await asyncio.Event().wait()


async def test_a_cancel_the_body_swallowed_is_still_taken_back() -> None:
    """The bound fired, the body caught the CancelledError and went on: the task is not
    left 'cancelling', so a timeout around it still becomes a TimeoutError."""
    deadlines = Deadlines(0.05, tick_s=0.01)
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            async with deadlines.bound() as bound:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    pass  # swallowed (as a 3.11 wait_for race can)
            assert bound.fired and task.cancelling() == 0
            await asyncio.Event().wait()  # only the outer timeout ends this


async def test_a_sweeper_cancelled_before_it_ran_is_replaced() -> None:
    deadlines = Deadlines(0.05, tick_s=0.01)
    async with deadlines.bound():
        assert deadlines.sweeper is not None
        deadlines.sweeper.cancel()  # before its first step: its finally never runs
    with contextlib.suppress(asyncio.CancelledError):
        await deadlines.sweeper
    assert deadlines.sweeper is not None and deadlines.sweeper.done()
    async with asyncio.timeout(2):  # a guard: without a sweeper the bound would never fire
        with pytest.raises(TimeoutError):
            async with deadlines.bound() as bound:
                await asyncio.Event().wait()
    assert bound.fired
