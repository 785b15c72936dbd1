"""Topology benchmark: a world of 5,000 regions (issue 15, item 2).

    python bench/topology_bench.py [--regions 5000] [--pools 2000] [--quotes 300]

Starts its own nats-server, redis-server, registry and broker processes (real HTTP) in a
temporary folder and prints:

* registry load: the regions added at run time through ``POST /v1/regions/bulk`` (one
  call), a registry restarting on them (process start to ``/ready``), and a registry's
  first start with a topology file of the same regions (it writes them to the bucket);
* broker start: process start to ``/health``, to ``/ready``, and to quoting a pool in the
  last region registered;
* placement with a latency bound: ``POST /v1/quotes`` and ``POST /v1/requests`` with
  ``users_region`` + ``max_latency_ms`` (users in a random region), beside the same
  quote without the bound; median and p99 over ``--quotes`` sequential calls;
* the broker's RSS and its idle CPU (it follows 5,000 regions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

import httpx  # noqa: E402
import psutil  # noqa: E402

from services.cli.servers import free_port, start_nats, start_redis  # noqa: E402
from services.cli.supervisor import ServiceProcess  # noqa: E402
from services.common.settings import Settings, settings_to_env  # noqa: E402

COUNTRIES = ("US", "DE", "BR", "IN", "JP", "AU", "ZA", "CA", "FR", "SG", "CN", "GB", "MX", "KR", "NG")
MODEL = "nvidia-h100-sxm-80gb"
MAX_LATENCY_MS = 30


def regions(n: int, rng: random.Random) -> list[dict]:
    """``n`` regions scattered over the inhabited latitudes."""
    return [{"id": f"r{i:05d}", "name": f"region {i}", "country": rng.choice(COUNTRIES),
             "lat": round(rng.uniform(-55, 70), 3), "lon": round(rng.uniform(-180, 180), 3)} for i in range(n)]


def wait(what: str, check, timeout: float) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            if check():
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{what}: not within {timeout}s")


def up(svc: ServiceProcess) -> tuple[float, float]:
    """Seconds from process start to /health, and to /ready."""
    t0 = time.perf_counter()
    svc.start()
    svc.wait_healthy(timeout=120)
    healthy = time.perf_counter() - t0
    wait(f"{svc.name} ready", lambda: httpx.get(f"{svc.url}/ready", timeout=2).status_code == 200, 120)
    return healthy, time.perf_counter() - t0


def timed(n: int, call) -> tuple[float, float, int]:  # noqa: ANN001
    """(median ms, p99 ms, calls answered 2xx) over ``n`` sequential calls."""
    ms, ok = [], 0
    for i in range(n):
        t0 = time.perf_counter()
        r = call(i)
        ms.append((time.perf_counter() - t0) * 1000)
        ok += r.is_success and bool(r.json().get("options", r.json().get("leases")))
    ms.sort()
    return statistics.median(ms), ms[min(len(ms) - 1, int(len(ms) * 0.99))], ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regions", type=int, default=5000)
    parser.add_argument("--pools", type=int, default=2000)
    parser.add_argument("--quotes", type=int, default=300)
    args = parser.parse_args()
    rng = random.Random(20261206)
    world = regions(args.regions, rng)
    tmp = Path(tempfile.mkdtemp(prefix="cb-topology-bench-"))
    nats, redis = start_nats(tmp / "nats"), start_redis(tmp / "redis")
    admin = f"bench-{secrets.token_hex(8)}"
    settings = Settings(nats_url=nats.url, redis_url=redis.url, admin_key=admin, heartbeat_ttl_s=3600,
                        log_level="warning")
    env = settings_to_env(settings)
    auth = {"Authorization": f"Bearer {admin}"}
    procs: list[ServiceProcess] = []
    ok = False

    def service(name: str, **over: str) -> ServiceProcess:
        svc = ServiceProcess(name, free_port(), {**env, **over}, tmp / f"{name}-{len(procs)}.log")
        procs.append(svc)
        return svc

    try:
        print(f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}; "
              f"{args.regions} regions, {args.pools} pools")
        registry = service("registry")
        up(registry)
        reg = httpx.Client(base_url=registry.url, headers=auth, timeout=120)
        t0 = time.perf_counter()
        r = reg.post("/v1/regions/bulk", json=world).raise_for_status()
        print(f"registry: {r.json()['written']} regions added at run time (POST /v1/regions/bulk, "
              f"{len(json.dumps(world)) / 1e6:.2f} MB) in {time.perf_counter() - t0:.2f}s")
        registry.stop()
        healthy, ready = up(registry)
        listed = len(reg.get("/v1/regions").raise_for_status().json())
        print(f"registry: restart on {listed} regions: healthy {healthy:.2f}s, ready {ready:.2f}s after start")
        path = tmp / "topology.json"
        path.write_text(json.dumps({"regions": world}))
        fresh = service("registry", CB_PREFIX="fresh", CB_TOPOLOGY_FILE=str(path))
        healthy, ready = up(fresh)
        print(f"registry: first start with a {args.regions}-region topology file (writes the bucket): "
              f"healthy {healthy:.2f}s, ready {ready:.2f}s after start")
        fresh.stop()

        key = reg.post("/v1/keys", json={"role": "provider", "subject": "bench"}).raise_for_status().json()["key"]
        with_pools = [w["id"] for w in world[:: max(1, args.regions // args.pools)]][: args.pools]
        items = [{"pool_id": f"p{i:05d}", "region": region, "model": MODEL, "units": 64, "units_per_node": 8,
                  "prices": {"on_demand": str(round(rng.uniform(1.5, 4.0), 2))}, "provider": "bench"}
                 for i, region in enumerate(with_pools)]
        prov = httpx.Client(base_url=registry.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        for i in range(0, len(items), 500):
            prov.post("/v1/pools/bulk", json=items[i:i + 500]).raise_for_status()
        tenant = reg.post("/v1/keys", json={"role": "tenant", "subject": "t1"}).raise_for_status().json()["key"]

        broker = service("broker")
        t0 = time.perf_counter()
        healthy, ready = up(broker)
        bro = httpx.Client(base_url=broker.url, headers={"Authorization": f"Bearer {tenant}"}, timeout=60)
        last = {"units": 1, "placement": {"regions": [with_pools[-1]]}}
        wait("broker quotes the last region", lambda: bool(bro.post("/v1/quotes", json=last).json()["options"]), 60)
        print(f"broker: start with {args.regions} regions and {len(items)} pools: healthy {healthy:.2f}s, "
              f"ready {ready:.2f}s, quotes a pool in the last region {time.perf_counter() - t0:.2f}s after start")

        users = [rng.choice(world)["id"] for _ in range(args.quotes)]

        def bounded(i: int) -> dict:
            return {"units": 1, "placement": {"users_region": users[i], "max_latency_ms": MAX_LATENCY_MS}}

        for label, call in (
            ("quote, no latency bound", lambda i: bro.post("/v1/quotes", json={"units": 1})),
            (f"quote, users in a random region, max {MAX_LATENCY_MS} ms",
             lambda i: bro.post("/v1/quotes", json=bounded(i))),
            (f"request (placement), users in a random region, max {MAX_LATENCY_MS} ms",
             lambda i: bro.post("/v1/requests", json={**bounded(i), "queue": False})),
        ):
            median, p99, placed = timed(args.quotes, call)
            print(f"broker: {label}: median {median:.1f} ms, p99 {p99:.1f} ms over {args.quotes} calls "
                  f"({placed} found a pool)")
        proc = psutil.Process(broker.proc.pid)
        cpu0 = proc.cpu_times()
        time.sleep(5)
        cpu1 = proc.cpu_times()
        idle = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / 5 * 100
        print(f"broker: RSS {proc.memory_info().rss / 2**20:.0f} MiB; idle CPU {idle:.1f}% of a core")
        ok = True
    finally:
        for svc in procs:
            svc.stop()
        nats.stop()
        redis.stop()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}")


if __name__ == "__main__":
    main()
