"""Shares at scale, over real HTTP: broker memory and share placements with 100,000
devices in pools that share (issue 14's "broker memory <= 500 MB at 100,000 devices").

    python bench/share_bench.py [--pools 12500] [--devices 8] [--seconds 10] [--connections 32] [--write]

Starts its own nats-server, redis-server, registry and broker (as ``broker_bench`` does),
registers ``--pools`` pools of ``--devices`` devices each through the bulk API — half
``time_slice``, half ``memory`` — keeps every one of them online with batched heartbeats
from a process of its own, waits until the broker quotes a share, then reports:

* the broker's resident memory with every device's state loaded;
* share placements over HTTP (``share.milli`` 100/250/500/750, one in five a whole
  device), placements/s and p50/p99 latency, for ``--seconds``;
* that no device is above 1,000 milli taken: the per-device hashes in Redis against the
  sum of the live share leases on each device (read back from Redis).
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
from collections import Counter
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import redis as redis_sync  # noqa: E402

from bench.broker_bench import BATCH, PROVIDER, pick_models, rss_mib, wait_until  # noqa: E402
from bench.heartbeater import Heartbeater  # noqa: E402
from bench.loadgen import request, run  # noqa: E402
from bench.results import Lines, append_section, bullets, command  # noqa: E402
from services.cli.servers import free_port, start_nats, start_redis  # noqa: E402
from services.cli.supervisor import ServiceProcess  # noqa: E402
from services.common.keys import Keys  # noqa: E402
from services.common.settings import Settings, settings_to_env  # noqa: E402

MEMORY_TARGET_MIB = 500
SHARES = (100, 250, 500, 750)


def share_items(n: int, devices: int, models: list[dict], regions: list[str], rng: random.Random) -> list[dict]:
    items = []
    for i in range(n):
        price = Decimal(rng.randint(20, 3000)) / 100
        items.append({"pool_id": f"share-{i:06d}", "region": regions[i % len(regions)],
                      "model": models[(i // len(regions)) % len(models)]["model"], "units": devices,
                      "units_per_node": devices, "prices": {"on_demand": str(price)}, "provider": PROVIDER,
                      "sharing": {"mode": "time_slice" if i % 2 else "memory", "min_milli": 100}})
    return items


def bodies(n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        if rng.random() < 0.2:
            out.append({"units": 1, "lease_ttl_s": 3600, "queue": False})
        else:
            out.append({"units": 1, "share": {"milli": rng.choice(SHARES)}, "lease_ttl_s": 3600, "queue": False})
    return out


def device_check(redis_url: str, keys: Keys, items: list[dict]) -> tuple[int, int, int]:
    """(devices read, devices above 1000 milli taken, devices whose free milli disagrees
    with 1000 - the live leases' shares on it)."""
    r = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    taken: Counter[tuple[str, int]] = Counter()
    for key in r.scan_iter(match=keys.lease("*", "*"), count=10_000):
        if r.type(key) != "hash":
            continue
        raw = r.hget(key, "info")
        if not raw:
            continue
        info = json.loads(raw)
        for device in info.get("devices") or ():
            taken[(info["pool_id"], device)] += info.get("milli", 1000)
    read = over = disagree = 0
    for item in items:
        free = r.hgetall(keys.pool_devices(item["region"], item["pool_id"]))
        for device, milli in free.items():
            read += 1
            used = taken.get((item["pool_id"], int(device)), 0)
            over += used > 1000 or int(milli) < 0
            disagree += int(milli) != 1000 - used
    return read, over, disagree


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", type=int, default=12_500)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--write", action="store_true", help="append the results to docs/benchmarks-log.md")
    args = ap.parse_args()

    rng = random.Random(20261206)
    tmp = Path(tempfile.mkdtemp(prefix="cb-share-bench-"))
    nats, redis = start_nats(tmp / "nats"), start_redis(tmp / "redis")
    admin = f"bench-{secrets.token_hex(8)}"
    settings = Settings(nats_url=nats.url, redis_url=redis.url, admin_key=admin, log_level="warning")
    env = settings_to_env(settings)
    registry = ServiceProcess("registry", free_port(), env, tmp / "registry.log")
    broker = ServiceProcess("broker", free_port(), env, tmp / "broker.log")
    heartbeater: Heartbeater | None = None
    say = lines = Lines()
    ok = False
    try:
        registry.start()
        registry.wait_healthy()
        say(f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}")
        auth = {"Authorization": f"Bearer {admin}"}
        with httpx.Client(base_url=registry.url, headers=auth, timeout=120) as reg:
            models = pick_models(reg.get("/v1/accelerators").raise_for_status().json(), 15)
            regions = [r["id"] for r in reg.get("/v1/regions").raise_for_status().json()]
            provider_key = reg.post("/v1/keys", json={"role": "provider", "subject": PROVIDER}).raise_for_status().json()["key"]
            tenant = reg.post("/v1/keys", json={"role": "tenant", "subject": "tenant-0"}).raise_for_status().json()["key"]
            items = share_items(args.pools, args.devices, models, regions, rng)
            t0 = time.perf_counter()
            with httpx.Client(base_url=registry.url, headers={"Authorization": f"Bearer {provider_key}"},
                              timeout=120) as prov:
                for j in range(0, len(items), BATCH):
                    r = prov.post("/v1/pools/bulk", content=json.dumps(items[j:j + BATCH]),
                                  headers={"content-type": "application/json"})
                    if r.status_code >= 400:
                        raise SystemExit(f"registry refused a batch: {r.status_code} {r.text[:500]}")
        devices = args.pools * args.devices
        say(f"pools: {len(items):,} sharing pools x {args.devices} devices = {devices:,} devices registered in "
            f"{time.perf_counter() - t0:.1f}s")
        heartbeater = Heartbeater(registry.url, provider_key, [i["pool_id"] for i in items],
                                  settings.heartbeat_ttl_s / 3)
        heartbeater.start()
        t0 = time.perf_counter()
        broker.start()
        broker.wait_healthy(timeout=120)
        th = {"Authorization": f"Bearer {tenant}"}

        def quotes_a_share() -> bool:
            r = httpx.post(f"{broker.url}/v1/quotes", json={"units": 1, "share": {"milli": 250}}, headers=th,
                           timeout=30)
            return r.status_code == 200 and bool(r.json()["options"])

        wait_until("the broker quotes a share", quotes_a_share, 120)
        total, _ = rss_mib(broker.proc.pid)
        say(f"broker: quotes a share {time.perf_counter() - t0:.1f}s after start; RSS with {devices:,} devices "
            f"loaded {total:.0f} MiB (target <= {MEMORY_TARGET_MIB} MiB: "
            f"{'met' if total <= MEMORY_TARGET_MIB else 'NOT met'})")
        reqs = [request("POST", "/v1/requests", th, json.dumps(b).encode()) for b in bodies(2000, rng)]
        res = asyncio.run(run(broker.port, lambda i: reqs[i % len(reqs)], connections=args.connections,
                              seconds=args.seconds))
        say(f"placements (80% shares of 100-750 milli, 20% whole devices): {res.summary()}")
        read, over, disagree = device_check(redis.url, Keys(settings.prefix), items)
        say(f"devices checked in Redis: {read:,}; above 1000 milli taken: {over}; free milli not equal to "
            f"1000 - the live shares on it: {disagree}")
        total, _ = rss_mib(broker.proc.pid)
        say(f"broker RSS after the run: {total:.0f} MiB")
        ok = over == 0 and disagree == 0 and read == devices and not any(s >= 500 for s in res.statuses)
    finally:
        if heartbeater is not None:
            heartbeater.stop()
        broker.stop()
        registry.stop()
        nats.stop()
        redis.stop()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr, flush=True)
    if args.write:
        append_section("shares", command("share_bench.py", ap, args, ("pools", "devices", "seconds", "connections")),
                       bullets(lines))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
