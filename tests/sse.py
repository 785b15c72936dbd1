"""An SSE watcher for tests: one real HTTP connection to ``/v1/events``, events parsed
as they arrive (services.cli.events.parse_sse), waited on with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import httpx

from services.cli.events import SseEvent, parse_sse


class Watcher:
    def __init__(self, url: str, params: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> None:
        self.url, self.params, self.headers = url, params or {}, headers or {}
        self.events: list[SseEvent] = []
        self.status = 0
        self.ended = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))

    async def __aenter__(self) -> Watcher:
        opened = asyncio.get_running_loop().create_future()

        async def run() -> None:
            try:
                async with self._client.stream("GET", f"{self.url}/v1/events", params=self.params,
                                               headers=self.headers) as r:
                    self.status = r.status_code
                    opened.set_result(r.status_code)
                    if r.status_code != 200:
                        await r.aread()
                        self.problem = r.json()
                        return
                    buf: list[str] = []
                    async for line in r.aiter_lines():
                        buf.append(line)
                        if line == "":
                            self.events.extend(parse_sse(buf))
                            buf = []
                            self._changed.set()
            finally:
                if not opened.done():
                    opened.set_result(0)
                self.ended.set()
                self._changed.set()

        self._task = asyncio.create_task(run())
        await asyncio.wait_for(opened, 15)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self._client.aclose()

    def data(self) -> list[dict[str, Any]]:
        return [e.json() for e in self.events if e.event == "message"]

    async def wait_for(self, predicate: Callable[[list[SseEvent]], Any], timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate(self.events)
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.ended.is_set() and not predicate(self.events)):
                raise AssertionError(f"condition not met within {timeout}s (ended={self.ended.is_set()}); got "
                                     f"{[(e.event, e.data[:120]) for e in self.events]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


def pools_seen(events: list[SseEvent]) -> list[str]:
    return [d["event"]["pool_id"] for e in events if e.event == "message"
            for d in [e.json()] if d["kind"] == "capacity"]
