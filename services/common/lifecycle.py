"""Background tasks of a service, stopped within a bounded time on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)


async def stop_tasks(tasks: list[asyncio.Task], timeout: float = 5.0) -> None:
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        log.warning("background task %s did not stop within %.0fs", task.get_name(), timeout)
    for task in done:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()
