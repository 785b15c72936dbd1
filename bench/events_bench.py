"""Event stream benchmark: allocation events published to JetStream, received through
``GET /v1/events`` (one SSE watcher, admin key) on a registry process.

    python bench/events_bench.py [N]        # default 5000 events

Starts its own nats-server, redis-server and registry (uvicorn, real HTTP) in a
temporary folder, opens the stream, publishes N ``lease.granted`` events one by one
(each acknowledged), and prints the rate at which they arrive over SSE and the latency
from each event's ``at`` to its arrival (p50, p99).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import msgspec

from services.cli.events import parse_sse
from services.cli.servers import free_port, start_nats, start_redis
from services.cli.supervisor import ServiceProcess
from services.common.messages import LeaseGranted, LeaseInfo
from services.common.nats_conn import connect, ensure_streams
from services.common.settings import Settings, settings_to_env
from services.common.subjects import Subjects


def grant(i: int) -> LeaseGranted:
    at = datetime.now(UTC)
    info = LeaseInfo(lease_id=f"l{i}", request_id="r", tenant="t1", pool_id="p", provider="acme", region="cn-yrd",
                     model="m", units=1, billing="on_demand", unit_price=Decimal("1"), granted_at=at,
                     expires_at=at + timedelta(hours=1))
    return LeaseGranted(id=f"l{i}.1", at=at, lease=info)


async def main(n: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    nats, redis = start_nats(tmp / "nats"), start_redis(tmp / "redis")
    settings = Settings(nats_url=nats.url, redis_url=redis.url, prefix="b" + uuid.uuid4().hex[:8], admin_key="adm")
    svc = ServiceProcess("registry", free_port(), settings_to_env(settings), tmp / "registry.log")
    svc.start()
    svc.wait_healthy(60)
    nc = await connect(nats.url, "bench")
    js, subjects = nc.jetstream(), Subjects(settings.prefix)
    await ensure_streams(js, subjects)
    latencies: list[float] = []
    ready, done = asyncio.Event(), asyncio.Event()

    async def watch() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client, \
                client.stream("GET", f"{svc.url}/v1/events", headers={"Authorization": "Bearer adm"}) as r:
            buf: list[str] = []
            async for line in r.aiter_lines():
                buf.append(line)
                if line != "":
                    continue
                for ev in parse_sse(buf):
                    if ev.event == "ready":
                        ready.set()
                    elif ev.event == "message":
                        at = datetime.fromisoformat(msgspec.json.decode(ev.data)["event"]["at"])
                        latencies.append(time.time() - at.timestamp())
                        if len(latencies) >= n:
                            done.set()
                            return
                buf = []

    try:
        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(ready.wait(), 30)
        t0 = time.perf_counter()
        for i in range(n):
            event = grant(i)
            await js.publish(subjects.alloc("cn-yrd", "t1"), msgspec.json.encode(event))
        published = time.perf_counter() - t0
        await asyncio.wait_for(done.wait(), 120)
        total = time.perf_counter() - t0
        await watcher
        latencies.sort()
        p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
        print(f"{n} events: published in {published:.2f}s (acknowledged one by one), all received over SSE after "
              f"{total:.2f}s ({n / total:.0f}/s); publish->SSE latency p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    finally:
        await nc.drain()
        svc.stop()
        nats.stop()
        redis.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000))
