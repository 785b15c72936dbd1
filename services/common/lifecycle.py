"""Background tasks of a service, stopped within a bounded time on shutdown."""

from __future__ import annotations

import asyncio
import logging

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
