"""Placements through the broker's HTTP API on single-node engines vs clustered ones,
measured in one run with the same load.

    python bench/cluster_bench.py [--pools 2000] [--seconds 8] [--connections 32] [--rounds 4] [--mixed] [--write]

Set-ups, each on fresh servers in a temporary folder, all up at the same time:

* single: one nats-server (JetStream, R1 streams) and one redis-server;
* cluster: a 3-node NATS cluster (R3 streams: every grant acknowledged by a quorum) and a
  Redis Cluster of 3 masters (``redis_cluster``; the regions' keys spread over the masters),
  started by ``tests/cluster.py`` from the same binaries;
* with ``--mixed`` also each engine clustered alone (where the cost comes from).

Each gets a registry and a broker process, the same pools through the bulk API, tenant
keys, and is ready once its broker quotes every model x region. The load is
``POST /v1/requests`` (1-4 units, ``queue: false``, 30% with a model, vendor or region
constraint; the same request bodies everywhere) from the raw load generator
(``bench/loadgen.py``): a 1 s warm-up each, then ``--seconds`` per set-up measured in
``--rounds`` slices taken in turns, so that the machine's other load (the cores are shared)
hits every set-up alike. Prints placements/s (201s), p50/p99, the broker's CPU and the
durability check (grant events in the allocation stream = 201s). ``--write`` appends the
printed lines to docs/benchmarks-log.md. The engines run on the same machine as the broker and
the load generator: the cluster's six server processes compete with them for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.broker_bench import (  # noqa: E402
    BATCH,
    N_MODELS,
    N_TENANTS,
    PROVIDER,
    cpu_s,
    pick_models,
    pool_items,
    quotes_every,
    request_bodies,
    wait_until,
)
from bench.loadgen import Result, request, run  # noqa: E402
from bench.results import Lines, append_section, bullets, command  # noqa: E402
from services.cli.servers import free_port, start_nats, start_redis  # noqa: E402
from services.cli.supervisor import ServiceProcess  # noqa: E402
from services.common.nats_conn import connect  # noqa: E402
from services.common.settings import Settings, settings_to_env  # noqa: E402
from services.common.subjects import ALLOC, Subjects  # noqa: E402
from tests.cluster import nats_cluster, redis_cluster  # noqa: E402


@contextmanager
def single_engines(tmp: Path) -> Iterator[dict]:
    nats, redis = start_nats(tmp / "nats"), start_redis(tmp / "redis")
    try:
        yield {"nats_url": nats.url, "redis_url": redis.url}
    finally:
        nats.stop()
        redis.stop()


@contextmanager
def clustered_engines(tmp: Path) -> Iterator[dict]:
    with nats_cluster(tmp / "nats") as nc, redis_cluster(tmp / "redis") as rc:
        yield {"nats_url": nc.url, "redis_url": rc.url, "redis_cluster": True, "stream_replicas": 3}


@contextmanager
def nats_cluster_only(tmp: Path) -> Iterator[dict]:
    with nats_cluster(tmp / "nats") as nc:
        redis = start_redis(tmp / "redis")
        try:
            yield {"nats_url": nc.url, "redis_url": redis.url, "stream_replicas": 3}
        finally:
            redis.stop()


@contextmanager
def redis_cluster_only(tmp: Path) -> Iterator[dict]:
    with redis_cluster(tmp / "redis") as rc:
        nats = start_nats(tmp / "nats")
        try:
            yield {"nats_url": nats.url, "redis_url": rc.url, "redis_cluster": True}
        finally:
            nats.stop()


async def grants_in_stream(nats_url: str) -> int:
    nc = await connect(nats_url, "bench")
    try:
        return (await nc.jetstream().stream_info(Subjects().stream(ALLOC))).state.messages
    finally:
        await nc.close()


@dataclass
class Setup:
    name: str
    settings: Settings
    broker: ServiceProcess
    reqs: list[bytes]
    pools: int
    pools_took: float
    tmp: Path
    result: Result = field(default_factory=Result)
    warm_201s: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0


def start_setup(name: str, engines: Callable, args: argparse.Namespace, stack: ExitStack) -> Setup:
    """Start ``engines``, a registry and a broker; load the world and wait until the
    broker quotes every model x region. Everything is stopped by ``stack``."""
    rng = random.Random(20261125)  # same pools and request bodies for every set-up
    tmp = Path(tempfile.mkdtemp(prefix=f"cb-cluster-bench-{name.split()[0]}-"))
    urls = stack.enter_context(engines(tmp))
    admin = f"bench-{secrets.token_hex(8)}"
    settings = Settings(admin_key=admin, heartbeat_ttl_s=3600, log_level="warning", **urls)
    env = settings_to_env(settings)
    registry = ServiceProcess("registry", free_port(), env, tmp / "registry.log")
    broker = ServiceProcess("broker", free_port(), env, tmp / "broker.log")
    stack.callback(registry.stop)
    stack.callback(broker.stop)
    registry.start()
    registry.wait_healthy(timeout=60)
    admin_auth = {"Authorization": f"Bearer {admin}"}
    reg = stack.enter_context(httpx.Client(base_url=registry.url, headers=admin_auth, timeout=120))
    models = pick_models(reg.get("/v1/accelerators").raise_for_status().json(), N_MODELS)
    regions = [r["id"] for r in reg.get("/v1/regions").raise_for_status().json()]
    key = reg.post("/v1/keys", json={"role": "provider", "subject": PROVIDER}).raise_for_status().json()["key"]
    prov = stack.enter_context(httpx.Client(base_url=registry.url, headers={"Authorization": f"Bearer {key}"},
                                            timeout=120))
    items = pool_items(args.pools, models, regions, rng)
    t0 = time.perf_counter()
    for j in range(0, len(items), BATCH):
        prov.post("/v1/pools/bulk", content=json.dumps(items[j:j + BATCH]),
                  headers={"content-type": "application/json"}).raise_for_status()
    took = time.perf_counter() - t0
    broker.start()
    broker.wait_healthy(timeout=90)
    qc = stack.enter_context(httpx.Client(base_url=broker.url, headers=admin_auth, timeout=30))
    combos = sorted({(i["model"], i["region"]) for i in items})

    wait_until("broker sees every model x region", lambda: quotes_every(qc, combos), 90)
    tenant_keys = [reg.post("/v1/keys", json={"role": "tenant", "subject": f"tenant-{t}"}
                            ).raise_for_status().json()["key"] for t in range(N_TENANTS)]
    bodies = request_bodies(2000, models, regions, rng)
    reqs = [request("POST", "/v1/requests", {"Authorization": f"Bearer {tenant_keys[k % N_TENANTS]}"},
                    json.dumps(b).encode()) for k, b in enumerate(bodies)]
    return Setup(name, settings, broker, reqs, len(items), took, tmp)


def measure(setups: list[Setup], args: argparse.Namespace) -> None:
    """A warm-up each, then ``--rounds`` slices of the measured time per set-up, taking
    turns, so that a change in the machine's other load hits every set-up alike."""
    for s in setups:
        s.warm_201s = asyncio.run(run(s.broker.port, lambda i, s=s: s.reqs[i % len(s.reqs)],
                                      connections=args.connections, seconds=1.0)).statuses.get(201, 0)
    offset = 7919
    for _ in range(args.rounds):
        for s in setups:
            cpu0, wall0 = cpu_s(s.broker.proc.pid), time.perf_counter()
            part = asyncio.run(run(s.broker.port, lambda i, s=s, o=offset: s.reqs[(i + o) % len(s.reqs)],
                                   connections=args.connections, seconds=args.seconds / args.rounds))
            s.cpu_s += cpu_s(s.broker.proc.pid) - cpu0
            s.wall_s += time.perf_counter() - wall0
            s.result.absorb(part)
        offset += 7919


def report(s: Setup, say: Callable[[str], None]) -> bool:
    res = s.result
    placed = res.statuses.get(201, 0)
    rate = placed / res.seconds if res.seconds else 0.0
    grants = asyncio.run(grants_in_stream(s.settings.nats_url))
    expected = s.warm_201s + placed
    say(f"{s.name}: {rate:,.0f} placements/s, p50 {res.pct(50):.1f} ms, p99 {res.pct(99):.1f} ms — "
        f"{res.summary()}; broker CPU {s.cpu_s / s.wall_s if s.wall_s else 0:.0%} of a core; "
        f"{s.pools} pools registered in {s.pools_took:.1f}s; durability: {grants} grant events for "
        f"{expected} 201s ({'match' if grants == expected else 'MISMATCH'})")
    return grants == expected and not any(code >= 500 for code in res.statuses)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4, help="measured slices per set-up, taken in turns")
    ap.add_argument("--mixed", action="store_true",
                    help="also run NATS cluster + single Redis and single NATS + Redis Cluster (where the cost is)")
    ap.add_argument("--write", action="store_true", help="append the results to docs/benchmarks-log.md")
    args = ap.parse_args()
    say = lines = Lines()  # printed as it goes, kept for --write

    say(f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}; "
        f"{args.pools} pools, {args.connections} connections, {args.seconds:g}s measured per set-up in "
        f"{args.rounds} slices taken in turns (all set-ups up at once), after a 1 s warm-up each; "
        "one broker process (1 worker) per set-up")
    say("single = 1 nats-server (R1 streams) + 1 redis-server; cluster = 3-node NATS cluster (R3 streams) + "
        "Redis Cluster of 3 masters, all on this machine")
    engines = [("single", single_engines), ("cluster", clustered_engines)]
    if args.mixed:
        engines += [("NATS cluster + single Redis", nats_cluster_only),
                    ("single NATS + Redis Cluster", redis_cluster_only)]
    results: list[bool] = []
    with ExitStack() as stack:
        setups = [start_setup(name, make, args, stack) for name, make in engines]
        measure(setups, args)
        results = [report(s, say) for s in setups]
    for s, ok in zip(setups, results, strict=True):
        if ok:
            shutil.rmtree(s.tmp, ignore_errors=True)
        else:
            print(f"logs of {s.name} kept in {s.tmp}", file=sys.stderr, flush=True)
    if args.write:
        append_section("clustered engines",
                       command("cluster_bench.py", ap, args, ("pools", "seconds", "connections", "rounds", "mixed")),
                       bullets(lines))
    if not all(results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
