"""CPU per placement inside one broker process, without HTTP sockets or a load generator.

    python bench/place_cpu.py [--pools 10000] [--placements 20000] [--concurrency 64] [--layer service|asgi]
                              [--rounds 1] [--profile FILE]

The end-to-end benchmark (``broker_bench.py``) shares 2 cores between the broker, the
load generator, NATS and Redis, so its rates move by ±10% from run to run: too coarse
to tell a 3% change. This runs the broker app in this process against real servers
(nats-server, redis-server and the registry, started as ``broker_bench`` does) and
counts this process's CPU seconds per placement, user and system apart (system time
is mostly the loopback sockets' work, charged to the sender, and moves most with the
machine's load):

* ``--layer service``: ``Broker.place`` called by ``--concurrency`` tasks (the domain,
  Redis and NATS work of a placement);
* ``--layer asgi``: the same requests through the litestar app (ASGI calls, no sockets):
  adds authentication, rate limiting, validation and the response.

The servers run in other processes, so their CPU is not counted in that figure; their
own CPU per placement over the same spell is printed beside it (redis-server's is the
scripts' and commands' cost, which shares the same cores in every benchmark). For a
profile of the measured placements alone (not the start-up), ``--profile FILE`` writes
cProfile stats (read them with ``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import psutil  # noqa: E402

from bench.broker_bench import N_TENANTS, populate, request_bodies  # noqa: E402
from services.broker.app import create_app  # noqa: E402
from services.broker.domain.requests import ComputeRequest  # noqa: E402
from services.cli.servers import free_port, start_nats, start_redis  # noqa: E402
from services.cli.supervisor import ServiceProcess  # noqa: E402
from services.common.auth import Principal  # noqa: E402
from services.common.settings import Settings, settings_to_env  # noqa: E402


class Lifespan:
    """The app's ASGI lifespan, driven as a server would drive it."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app, self.inbox, self.outbox = app, asyncio.Queue(), asyncio.Queue()

    async def __aenter__(self) -> None:
        self.task = asyncio.create_task(self.app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                                 self.inbox.get, self.outbox.put))
        await self.inbox.put({"type": "lifespan.startup"})
        message = await self.outbox.get()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"broker did not start: {message}")

    async def __aexit__(self, *_: object) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        await self.outbox.get()
        await self.task


async def asgi_post(app, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int:  # noqa: ANN001
    """One request through the app's ASGI callable; returns the status."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    sent = False
    status = 0

    async def receive() -> dict:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def cpu_s(procs: list[psutil.Process]) -> list[float]:
    """CPU seconds (user + system) each server process has used so far."""
    return [sum(proc.cpu_times()[:2]) for proc in procs]


async def measure(settings: Settings, bodies: list[dict], tenant_keys: list[str], args: argparse.Namespace,
                  servers: list[psutil.Process]) -> None:
    app = create_app(settings)
    async with Lifespan(app):
        broker = app.state.broker
        structs = [msgspec.convert(b, ComputeRequest) for b in bodies]
        raw = [json.dumps(b).encode() for b in bodies]
        keys = await asyncio.gather(*(app.state.key_lookup.authenticate(f"Bearer {k}") for k in tenant_keys))
        principals = [Principal(role="tenant", subject=p.subject, key_id=p.key_id) for p in keys]
        counter = iter(range(args.placements))
        statuses: dict[int, int] = {}

        async def service_worker() -> None:
            for i in counter:
                status, _ = await broker.place(principals[i % N_TENANTS], structs[i % len(structs)])
                statuses[status] = statuses.get(status, 0) + 1

        async def asgi_worker() -> None:
            for i in counter:
                headers = [(b"authorization", f"Bearer {tenant_keys[i % N_TENANTS]}".encode()),
                           (b"content-type", b"application/json")]
                status = await asgi_post(app, "/v1/requests", headers, raw[i % len(raw)])
                statuses[status] = statuses.get(status, 0) + 1

        worker = service_worker if args.layer == "service" else asgi_worker
        warm = args.placements // 10
        counter = iter(range(warm))
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        profile = cProfile.Profile() if args.profile else None
        per_round: list[float] = []
        for _ in range(args.rounds):
            statuses.clear()
            counter = iter(range(args.placements))
            cpu0, wall0, servers0, user0 = time.process_time(), time.perf_counter(), cpu_s(servers), os.times().user
            if profile:
                profile.enable()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            if profile:
                profile.disable()
            cpu, wall, user = time.process_time() - cpu0, time.perf_counter() - wall0, os.times().user - user0
            redis_s, nats_s = (b - a for a, b in zip(servers0, cpu_s(servers), strict=True))
            placed = max(statuses.get(201, 0), 1)
            per_round.append(cpu / placed * 1e6)
            print(f"layer {args.layer}: {statuses.get(201, 0)} placements of {sum(statuses.values())} requests "
                  f"({statuses}); {cpu / placed * 1e6:.0f} us CPU per placement in this process "
                  f"({user / placed * 1e6:.0f} us user, {(cpu - user) / placed * 1e6:.0f} us system); "
                  f"{placed / wall:,.0f}/s over {wall:.2f} s wall ({cpu / wall:.0%} of a core); "
                  f"redis-server {redis_s / placed * 1e6:.0f} us, nats-server {nats_s / placed * 1e6:.0f} us "
                  "per placement", flush=True)
        if profile:
            profile.dump_stats(args.profile)
        if args.rounds > 1:  # the machine's other work only ever adds: the least is the closest to the cost
            print(f"CPU per placement in this process over {args.rounds} rounds: least {min(per_round):.0f} us, "
                  f"median {statistics.median(per_round):.0f} us", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", type=int, default=10_000)
    ap.add_argument("--placements", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--layer", choices=["service", "asgi"], default="service")
    ap.add_argument("--rounds", type=int, default=1, help="measured rounds of --placements each, in one process")
    ap.add_argument("--profile", metavar="FILE", help="cProfile the measured placements only, stats into FILE "
                    "(CPU per placement then includes the profiler's own cost)")
    args = ap.parse_args()

    rng = random.Random(20261125)
    tmp = Path(tempfile.mkdtemp(prefix="cb-place-cpu-"))
    nats, redis = start_nats(tmp / "nats"), start_redis(tmp / "redis")
    admin = f"bench-{secrets.token_hex(8)}"
    settings = Settings(nats_url=nats.url, redis_url=redis.url, admin_key=admin, heartbeat_ttl_s=3600,
                        log_level="warning")
    registry = ServiceProcess("registry", free_port(), settings_to_env(settings), tmp / "registry.log")
    try:
        registry.start()
        registry.wait_healthy()
        world = populate(registry.url, admin, args.pools, rng)
        bodies = request_bodies(2000, world.models, world.regions, rng)
        import uvloop

        uvloop.run(measure(settings, bodies, world.tenant_keys, args,
                           [psutil.Process(redis.proc.pid), psutil.Process(nats.proc.pid)]))
    finally:
        registry.stop()
        nats.stop()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
