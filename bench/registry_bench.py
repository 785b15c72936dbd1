"""Registry benchmarks: import 10,000 pools, then heartbeat ingest with 10,000 pools.

    python bench/registry_bench.py [--pools 10000] [--seconds 10]

Starts its own nats-server, redis-server and registry process (uvicorn, real HTTP) in a
temporary folder, prints the numbers and appends them to docs/benchmarks-log.md with
``--write``. Targets (issue 2): import of 10,000 pools <= 10 s; >= 5,000 heartbeats/s.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from click.testing import CliRunner  # noqa: E402

from bench.loadgen import request, run  # noqa: E402
from bench.results import Lines, append_section, bullets  # noqa: E402
from services.cli.main import cli  # noqa: E402
from services.cli.servers import free_port, start_nats, start_redis  # noqa: E402
from services.cli.supervisor import ServiceProcess  # noqa: E402
from services.common.settings import Settings, settings_to_env  # noqa: E402

REGIONS = ["us-east", "us-west", "eu-central", "cn-yrd", "cn-gz", "ap-southeast"]
OFFERS = [("A100", 8, "10.32"), ("H100", 8, "23.92"), ("A10", 1, "0.75"), ("L40S", 4, "4.00"),
          ("T4", 1, "0.35"), ("A100-80GB", 8, "14.32")]


def write_catalogue(path: Path, n: int) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "Price", "Region",
                    "GpuInfo", "SpotPrice", "AvailabilityZone"])
        for i in range(n):
            name, count, price = OFFERS[i % len(OFFERS)]
            region = REGIONS[(i // len(OFFERS)) % len(REGIONS)]
            w.writerow([f"gpu-{i}", name, count, 16, 64, price, region, "", "", f"z{i}"])


async def heartbeats(port: int, key: str, pool_ids: list[str], seconds: float, connections: int,
                     batch: int) -> tuple[str, float]:
    auth = {"Authorization": f"Bearer {key}"}
    if batch == 1:
        reqs = [request("POST", f"/v1/pools/{p}/heartbeat", auth) for p in pool_ids]
        res = await run(port, lambda i: reqs[i % len(reqs)], connections=connections, seconds=seconds)
        return res.summary(), res.rate
    bodies = [request("POST", "/v1/heartbeats", auth,
                      json.dumps({"pools": pool_ids[j:j + batch]}).encode())
              for j in range(0, len(pool_ids), batch)]
    res = await run(port, lambda i: bodies[i % len(bodies)], connections=connections, seconds=seconds)
    return res.summary() + f"; {batch} pools per request", res.rate * batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="registry worker processes")
    ap.add_argument("--write", action="store_true", help="append the results to docs/benchmarks-log.md")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cb-bench-"))
    nats, redis = start_nats(tmp / "nats"), start_redis(tmp / "redis")
    admin = f"bench-{secrets.token_hex(8)}"
    settings = Settings(nats_url=nats.url, redis_url=redis.url, admin_key=admin, heartbeat_ttl_s=300,
                        log_level="warning", workers=args.workers)
    registry = ServiceProcess("registry", free_port(), settings_to_env(settings), tmp / "registry.log")
    say = lines = Lines()  # printed as it goes, kept for --write

    try:
        registry.start()
        registry.wait_healthy()
        say(f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}; "
            f"registry workers: {args.workers}")
        cat = tmp / "vms.csv"
        write_catalogue(cat, args.pools)
        t0 = time.perf_counter()
        res = CliRunner().invoke(cli, ["import", "skypilot", str(cat), "--provider", "benchcloud",
                                       "--registry-url", registry.url, "--key", admin])
        took = time.perf_counter() - t0
        if res.exit_code != 0:
            raise SystemExit(res.output)
        say(f"import: {args.pools} pools via `cbroker import skypilot` in {took:.2f}s "
            f"({args.pools / took:,.0f} pools/s; target <= 10 s for 10,000)")

        import httpx

        pool_ids: list[str] = []
        cursor = None
        while True:
            params = {"limit": 1000, "provider": "benchcloud"} | ({"cursor": cursor} if cursor else {})
            page = httpx.get(f"{registry.url}/v1/pools", params=params,
                             headers={"Authorization": f"Bearer {admin}"}, timeout=60).json()
            pool_ids += [p["pool_id"] for p in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert len(pool_ids) == args.pools, len(pool_ids)
        r = httpx.post(f"{registry.url}/v1/keys", json={"role": "provider", "subject": "benchcloud"},
                       headers={"Authorization": f"Bearer {admin}"})
        key = r.json()["key"]
        for batch in (1, 100):
            summary, rate = asyncio.run(heartbeats(registry.port, key, pool_ids, args.seconds, args.connections,
                                                   batch))
            say(f"heartbeats ({'single' if batch == 1 else 'batched'}), {args.pools} pools registered: "
                f"{rate:,.0f} heartbeats/s — {summary}")
    finally:
        registry.stop()
        nats.stop()
        redis.stop()
    if args.write:
        append_section("registry", "python bench/registry_bench.py", bullets(lines))


if __name__ == "__main__":
    main()
