"""A small HTTP/1.1 keep-alive load generator on raw asyncio streams.

httpx costs more CPU per request than the server under test, which on a 2-core
machine would measure the client; this sends prebuilt request bytes and parses only
the status line and Content-Length. Bounded by a request count and a deadline.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_CL = re.compile(rb"content-length:\s*(\d+)", re.I)
_RETRY_AFTER = re.compile(rb"retry-after:\s*(\d+)", re.I)


def request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    if body or method in ("POST", "PUT", "PATCH"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Result:
    requests: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    by_status: dict[int, list[float]] = field(default_factory=dict)  # the same latencies, per status

    def absorb(self, other: Result) -> None:
        """Count ``other`` (another round or connection set) into this one."""
        self.requests += other.requests
        self.errors += other.errors
        self.seconds += other.seconds
        self.latencies += other.latencies
        for status, xs in other.by_status.items():
            self.by_status.setdefault(status, []).extend(xs)
        for status, n in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + n

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, p: float, status: int | None = None) -> float:
        """The ``p``-th percentile latency in ms, of every answer or of those with ``status``."""
        xs = sorted(self.latencies if status is None else self.by_status.get(status, []))
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000

    def summary(self) -> str:
        return (f"{self.requests} requests in {self.seconds:.2f}s = {self.rate:,.0f}/s; "
                f"p50 {self.pct(50):.2f} ms, p99 {self.pct(99):.2f} ms; statuses {self.statuses}; "
                f"errors {self.errors}")


async def run(port: int, make: Callable[[int], bytes], *, connections: int, seconds: float,
              max_requests: int = 10_000_000, honour_retry_after: bool = False) -> Result:
    """``honour_retry_after``: a connection told to come back later (a 429 or 503 with
    Retry-After) waits that long before its next request, as a well-behaved client does."""
    result = Result()
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                writer.write(make(i))
                head = await reader.readuntil(b"\r\n\r\n")
                m = _CL.search(head)
                if m:
                    await reader.readexactly(int(m.group(1)))
                status = int(head[9:12])
                took = time.perf_counter() - t0
                result.latencies.append(took)
                result.by_status.setdefault(status, []).append(took)
                result.statuses[status] = result.statuses.get(status, 0) + 1
                result.requests += 1
                if status >= 400:
                    result.errors += 1
                if honour_retry_after and status in (429, 503) and (wait := _RETRY_AFTER.search(head)):
                    await asyncio.sleep(min(int(wait.group(1)), max(0.0, deadline - time.perf_counter())))
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    result.seconds = time.perf_counter() - t0
    return result


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
