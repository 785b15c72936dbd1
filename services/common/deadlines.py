"""A time bound on each request, without a timer per request.

``asyncio.timeout`` arms a loop timer on entry and cancels it on exit: about 6 us of CPU
a request under uvloop (``bench/place_cpu.py``), and a placement had two of them (its
own deadline and the rate limiter's wait). ``Deadlines`` keeps every bound of one
length in one insertion-ordered dict (entered in deadline order, since they share the
length) and one sweeper task, awake only while some bound is open, cancels the tasks
whose time has passed. A bound may fire up to ``tick_s`` late; its owner sees
``TimeoutError`` exactly as with ``asyncio.timeout`` (including when the task was
cancelled for another reason too: that cancellation wins).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

TICK_S = 0.05


class Bound:
    """One request's bound (``async with deadlines.bound():``)."""

    __slots__ = ("_owner", "_task", "_deadline", "_cancelling", "fired")

    def __init__(self, owner: Deadlines) -> None:
        self._owner = owner
        self.fired = False  # the time passed and the task was cancelled for it

    async def __aenter__(self) -> Bound:
        owner = self._owner
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline bounds a task")
        self._task, self._cancelling = task, task.cancelling()
        self._deadline = task.get_loop().time() + owner.seconds
        owner.open[self] = None
        if owner.sweeper is None or owner.sweeper.done():  # done: cancelled before it could say so
            owner.sweeper = task.get_loop().create_task(owner.sweep())
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._owner.open.pop(self, None)
        # as asyncio.timeout: the cancel this bound made is taken back whatever the body
        # did with it (swallowed, or swapped for another error), so that the task's count
        # stays right for a timeout around this one
        if self.fired and self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
            raise TimeoutError from exc

    def expire(self) -> None:
        self.fired = True
        self._task.cancel()


class Deadlines:
    """Bounds of ``seconds`` each, all swept by one task."""

    def __init__(self, seconds: float, tick_s: float = TICK_S) -> None:
        self.seconds, self.tick_s = seconds, tick_s
        self.open: dict[Bound, None] = {}  # entered in deadline order: the same length for all
        self.sweeper: asyncio.Task[None] | None = None

    def bound(self) -> Bound:
        return Bound(self)

    async def sweep(self) -> None:
        """Cancel the tasks past their deadline; stop once no bound is open (the next
        bound starts the sweeper again)."""
        loop = asyncio.get_running_loop()
        try:
            while self.open:
                await asyncio.sleep(min(self.tick_s, self.seconds))
                now = loop.time()
                while self.open:
                    first = next(iter(self.open))
                    if first._deadline > now:  # noqa: SLF001 - one module's two halves
                        break
                    del self.open[first]
                    first.expire()
        finally:
            self.sweeper = None
