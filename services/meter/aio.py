"""Small asyncio helpers."""

from __future__ import annotations

import asyncio


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


# TODO(common): services.common.lifecycle.stop_tasks should re-cancel like this
async def cancel_all(tasks: list[asyncio.Task], timeout: float = 5.0) -> None:
    """Cancel background tasks and wait for them, cancelling again while they run: on
    Python 3.11 a cancellation that races with an ``asyncio.wait_for`` completing (nats-py
    uses it for every request) can be swallowed, and a loop that lost it runs on. Loops
    also check a stop flag of their own."""
    pending = {t for t in tasks if not t.done()}
    deadline = asyncio.get_running_loop().time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(0.2, remaining))
