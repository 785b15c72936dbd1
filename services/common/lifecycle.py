"""Background tasks of a service, stopped within a bounded time on shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def stop_tasks(tasks: list[asyncio.Task], timeout: float = 5.0) -> None:
    """Cancel, and cancel again until they stop: on Python 3.11 a cancel can be lost
    when it lands just as an ``asyncio.wait_for`` completes (nats-py uses one per
    request), and a ``while True`` loop then keeps running and hangs the shutdown."""
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            for task in pending:
                log.warning("background task %s did not stop within %.0fs", task.get_name(), timeout)
            break
        _, pending = await asyncio.wait(pending, timeout=min(0.2, remaining))


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it is set. Unlike
    ``asyncio.wait_for(event.wait(), t)`` on Python 3.11, a cancellation of the caller
    that races with the event being set is never lost (a lost one hangs shutdown)."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()


async def forever(what: str, step: Callable[[], Awaitable[object]], *, interval: float = 0.5,
                  kick: asyncio.Event | None = None, until: Callable[[], bool] = lambda: False,
                  logger: logging.Logger = log) -> None:
    """The one loop of every background task: run ``step`` again and again until
    cancelled (``stop_tasks``) or ``until()``; after it returns, once ``interval`` seconds
    have passed or as soon as ``kick`` is set; after it raises (a NATS or Redis blip, a
    consumer being re-created), the error is logged and it runs again after ``interval``.
    Periodic work (sweeps, finalising) returns from each ``step``; a follower of a stream
    or a bucket follows inside its ``step`` until an error, and is started afresh."""
    while not until():
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:  # keep going: the next round may well succeed
            logger.warning("%s failed; again in %gs", what, interval, exc_info=True)
        if until():
            return
        if kick is None:
            await asyncio.sleep(interval)
        else:
            await wait_event(kick, interval)
            kick.clear()


def relax_gc(gen0: int = 50_000) -> None:
    """For a process that keeps hundreds of thousands of long-lived objects (the meter's
    account cache and ledger aggregate): with CPython's default thresholds (700, 10, 10)
    the cyclic collector walks them again and again, and the walks land on whatever
    allocates next (in the meter, the decoding of each event). Young cycles are still
    collected, every ``gen0`` allocations; older generations rarely. Process-wide, and
    set from an app's lifespan so that every uvicorn worker gets it.
    ``bench/meter_bench.py`` measured the meter's CPU per event going from about 69 to
    about 53 µs with this and untracked ledger structs (``gc=False``)."""
    import gc

    gc.set_threshold(gen0, 50, 100)
