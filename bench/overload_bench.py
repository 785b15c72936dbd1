"""Overload benchmark: reads against the registry at a normal load and at 500
connections, with load shedding on (the default in-flight limit) and off.

    python bench/overload_bench.py [--connections 500] [--seconds 10] [--max-in-flight 128]

Starts its own nats-server, redis-server and registry processes (uvicorn, real HTTP)
in a temporary folder and prints the numbers. Target (issue 16, docs/overload.md): at
500 connections, requests the service admits answer with a p99 within
``--target-ms`` (default 250 ms), and the excess is refused at once with a 503 and
Retry-After; nothing waits seconds for a Redis connection.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import secrets
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import msgspec  # noqa: E402

from bench.loadgen import Result, request, run  # noqa: E402
from bench.results import Lines  # noqa: E402
from services.cli.servers import free_port, start_nats, start_redis  # noqa: E402
from services.cli.supervisor import ServiceProcess  # noqa: E402
from services.common.settings import Settings, settings_to_env  # noqa: E402

POOLS = 200


def pool(i: int) -> dict:
    return {"region": "cn-yrd", "zone": "a", "model": "nvidia-a100-sxm-80gb", "units": 8, "units_per_node": 8,
            "prices": {"currency": "USD", "on_demand": "2.10", "reserved_month": "1100", "reserved_year": "900",
                       "interruptible": "0.80"}}


def describe(name: str, res: Result) -> str:
    ok, shed = res.statuses.get(200, 0), res.statuses.get(503, 0)
    line = (f"{name}: {res.rate:,.0f} answers/s; admitted (200) {ok / res.seconds:,.0f}/s, p50 {res.pct(50, 200):.1f} ms, "
            f"p99 {res.pct(99, 200):.1f} ms, max {res.pct(100, 200):.1f} ms")
    if shed:
        line += f"; refused (503) {shed / res.seconds:,.0f}/s, p99 {res.pct(99, 503):.1f} ms"
    others = {s: n for s, n in res.statuses.items() if s not in (200, 503)}
    return line + (f"; other statuses {others}" if others else "")


def phase(settings: Settings, tmp: Path, connections: int, seconds: float, name: str,
          honour_retry_after: bool = True) -> Result:
    registry = ServiceProcess("registry", free_port(), settings_to_env(settings), tmp / f"registry-{name}.log")
    registry.start()
    try:
        registry.wait_healthy()
        admin = {"Authorization": f"Bearer {settings.admin_key}"}
        reads = [request("GET", f"/v1/pools/p{i}", admin) for i in range(POOLS)]
        asyncio.run(run(registry.port, lambda i: reads[i % POOLS], connections=8, seconds=1.0))  # warm up
        return asyncio.run(run(registry.port, lambda i: reads[i % POOLS], connections=connections, seconds=seconds,
                               honour_retry_after=honour_retry_after))
    finally:
        registry.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=500)
    ap.add_argument("--normal", type=int, default=16, help="connections of the normal-load run")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-in-flight", type=int, default=Settings().max_in_flight)
    ap.add_argument("--target-ms", type=float, default=250.0)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.connections + 256)), hard))

    tmp = Path(tempfile.mkdtemp(prefix="cb-overload-"))
    nats, redis = start_nats(tmp / "nats"), start_redis(tmp / "redis")
    settings = Settings(nats_url=nats.url, redis_url=redis.url, admin_key=f"bench-{secrets.token_hex(8)}",
                        heartbeat_ttl_s=3600, log_level="warning", max_in_flight=args.max_in_flight)
    say = Lines()
    try:
        setup = ServiceProcess("registry", free_port(), settings_to_env(settings), tmp / "registry-setup.log")
        setup.start()
        try:
            setup.wait_healthy()
            admin = {"Authorization": f"Bearer {settings.admin_key}"}
            key = httpx.post(f"{setup.url}/v1/keys", json={"role": "provider", "subject": "bench"},
                             headers=admin).json()["key"]
            for i in range(POOLS):
                r = httpx.put(f"{setup.url}/v1/pools/p{i}", json=pool(i), headers={"Authorization": f"Bearer {key}"})
                assert r.status_code in (200, 201), r.text
        finally:
            setup.stop()
        say(f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}; "
            f"registry, 1 worker, Redis pool {settings.redis_max_connections}; GET /v1/pools/{{id}} over {POOLS} pools "
            f"with an admin key; closed loop (each connection sends its next request on an answer)")
        normal = phase(settings, tmp, args.normal, args.seconds, "normal")
        say(describe(f"normal load, {args.normal} connections, max_in_flight {args.max_in_flight}", normal))
        shed = phase(settings, tmp, args.connections, args.seconds, "shed")
        say(describe(f"overload, {args.connections} connections honouring Retry-After, "
                     f"max_in_flight {args.max_in_flight}", shed))
        spinning = phase(settings, tmp, args.connections, args.seconds, "spinning", honour_retry_after=False)
        say(describe(f"overload, {args.connections} connections ignoring Retry-After, "
                     f"max_in_flight {args.max_in_flight}", spinning))
        unbounded = phase(msgspec.structs.replace(settings, max_in_flight=0), tmp, args.connections, args.seconds,
                          "unbounded")
        say(describe(f"overload, {args.connections} connections, shedding off (max_in_flight 0)", unbounded))
        p99 = shed.pct(99, 200)
        verdict = "within" if p99 <= args.target_ms else "OVER"
        say(f"admitted p99 at {args.connections} connections: {p99:.1f} ms, {verdict} the {args.target_ms:g} ms "
            f"target (clients ignoring Retry-After: {spinning.pct(99, 200):.1f} ms; without shedding: "
            f"{unbounded.pct(99, 200):.1f} ms)")
    finally:
        nats.stop()
        redis.stop()


if __name__ == "__main__":
    main()
