"""Small helpers for integration tests: wait on events, never sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy


class EventTap:
    """An ordered JetStream consumer over a subject, collecting decoded events."""

    def __init__(self, js: JetStreamContext, subject: str, type_: Any) -> None:
        self.js, self.subject, self.type = js, subject, type_
        self.events: list[Any] = []
        self._sub = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> EventTap:
        async def on_msg(msg: Any) -> None:
            self.events.append(msgspec.json.decode(msg.data, type=self.type))
            self._changed.set()

        self._sub = await self.js.subscribe(self.subject, cb=on_msg, ordered_consumer=True,
                                            deliver_policy=DeliverPolicy.ALL)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching event on {self.subject} within {timeout}s; saw "
                                     f"{[type(e).__name__ for e in self.events]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass


async def eventually(check: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0, every: float = 0.05,
                     what: str = "condition") -> Any:
    """Poll ``check`` (sync or async) with a deadline, for state that has no event of its
    own; returns its first truthy result. The one polling loop of the async tests."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(every)  # the poll interval: the deadline above bounds the wait


def wait_until(check: Callable[[], Any], timeout: float = 10.0, every: float = 0.1,
               what: str = "condition") -> Any:
    """``eventually`` for synchronous code (server fixtures, subprocess tests)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(every)  # the poll interval: the deadline above bounds the wait


async def pause(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``stop`` (a load generator's pace between operations:
    it ends at once when the test stops the load). True if ``stop`` is set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
    return stop.is_set()


async def drop_streams(nats_url: str, prefix: str) -> None:
    """Delete a test's streams and buckets from the shared session server (for tests that
    run services as processes and do not use the ``nc`` fixture, which does this itself)."""
    from services.common.nats_conn import connect

    nc = await connect(nats_url, "test-cleanup")
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name = info.config.name or ""
            if name.startswith(prefix.upper() + "_") or name.startswith(f"KV_{prefix}_"):
                await js.delete_stream(name)
    finally:
        await nc.drain()


PROPERTY_DB = 9


def own_db(url: str, db: int = PROPERTY_DB) -> str:
    """The same Redis server, a database of the state machines' own, emptied first. Their
    steps scan for their keys (a Redis lost and rebuilt, teardown): on the session's
    database, which by then holds every earlier test's keys, each scan walked hundreds of
    thousands of keys and a 20 s property test ran past its 180 s timeout."""
    import redis
    from urllib.parse import urlsplit, urlunsplit

    own = urlunsplit(urlsplit(url)._replace(path=f"/{db}"))
    client = redis.Redis.from_url(own)
    try:
        client.flushdb()
    finally:
        client.close()
    return own


def run_machine(make_machine: Callable[[str, list[int]], Any], url: str, examples: int, steps: int,
                min_steps: int = 0) -> int:
    """Run a hypothesis state machine built by ``make_machine(url, counter)``; returns
    the steps it counted (hypothesis may stop a run early: tests check the count).
    ``min_steps``: run again, up to twice more, while fewer steps than that have run
    (hypothesis draws each run's length: 200 runs of at most 100 steps came to 14,182
    once, 71%; a test's minimum is what it must exercise, not a bet on the draws)."""
    from hypothesis import settings

    counter = [0]
    url = own_db(url)
    machine = make_machine(url, counter)
    machine.TestCase.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None)
    for _ in range(3):
        machine.TestCase().runTest()
        if counter[0] >= min_steps:
            break
    print(f"{counter[0]} steps")
    return counter[0]
