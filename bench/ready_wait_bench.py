"""Ready → the tenant sees it: how long after a provider's ``POST /v1/leases/{id}/ready``
the typed client's ``wait_ready`` returns (the issue's target: ≤ 100 ms at p99).

    python bench/ready_wait_bench.py [N]        # default 200 requests

Starts its own nats-server, redis-server, registry and broker (real HTTP) in a temporary
folder, registers one provider with a pool that delivers ssh, then N times: a tenant
places a request with an ssh workload, ``wait_ready`` starts (in a thread) and has read
the request once, the provider answers ``ready``; the time from sending that answer to
``wait_ready`` returning is recorded. Run with the event stream (the client as the CLI
uses it) and without it (polling alone), and print p50/p95/p99/max of each.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

from services.broker.client import BrokerClient
from services.cli.servers import free_port, start_nats, start_redis
from services.cli.supervisor import ServiceProcess
from services.common.settings import Settings, settings_to_env

PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchKeyBenchKeyBenchKeyBenchKey00 bench@host"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def key(registry: str, admin: str, role: str, subject: str) -> str:
    r = httpx.post(f"{registry}/v1/keys", json={"role": role, "subject": subject},
                   headers={"Authorization": f"Bearer {admin}"}, timeout=10)
    r.raise_for_status()
    return r.json()["key"]


def one(client: BrokerClient, provider: httpx.Client, tenant: httpx.Client) -> float:
    r = tenant.post("/v1/requests", json={"units": 1, "accelerators": {"models": ["nvidia-l40s"]}, "queue": False,
                                          "workload": {"kind": "ssh", "public_keys": [PUBKEY]}})
    r.raise_for_status()
    request_id, lease_id = r.json()["request_id"], r.json()["leases"][0]["lease_id"]
    looking, done = threading.Event(), threading.Event()
    result: dict[str, float] = {}

    def wait() -> None:
        client.wait_ready(request_id, timeout=30, on_change=lambda v: looking.set())
        result["seen"] = time.perf_counter()
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    looking.wait(30)
    sent = time.perf_counter()
    provider.post(f"/v1/leases/{lease_id}/ready", json={"access": {"host": "h.example", "port": 22}}) \
        .raise_for_status()
    done.wait(30)
    tenant.post(f"/v1/leases/{lease_id}/release")
    return (result["seen"] - sent) * 1000


def main(n: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    nats, redis = start_nats(tmp / "nats"), start_redis(tmp / "redis")
    settings = Settings(nats_url=nats.url, redis_url=redis.url, prefix="b" + uuid.uuid4().hex[:8], admin_key="adm",
                        heartbeat_ttl_s=3600.0)
    env = settings_to_env(settings)
    services = [ServiceProcess(name, free_port(), env, tmp / f"{name}.log") for name in ("registry", "broker")]
    try:
        for svc in services:
            svc.start()
        for svc in services:
            svc.wait_healthy(60)
        registry, broker = (s.url for s in services)
        pkey, tkey = key(registry, "adm", "provider", "acme"), key(registry, "adm", "tenant", "t1")
        httpx.put(f"{registry}/v1/pools/acme-pool", headers={"Authorization": f"Bearer {pkey}"}, timeout=10, json={
            "region": "cn-yrd", "zone": "a", "model": "nvidia-l40s", "units": 4096, "units_per_node": 8,
            "delivery": ["ssh"], "prices": {"currency": "USD", "on_demand": "1.00", "reserved_month": "500",
                                            "reserved_year": "400", "interruptible": "0.40"}}).raise_for_status()
        with httpx.Client(base_url=broker, headers={"Authorization": f"Bearer {pkey}"}, timeout=10) as provider, \
                httpx.Client(base_url=broker, headers={"Authorization": f"Bearer {tkey}"}, timeout=10) as tenant:
            deadline = time.monotonic() + 30
            while tenant.post("/v1/quotes", json={"units": 1, "accelerators": {"models": ["nvidia-l40s"]}}) \
                    .json().get("options") in (None, []) and time.monotonic() < deadline:
                time.sleep(0.2)
            for label, events_url in (("event stream", registry), ("polling only", None)):
                with BrokerClient(broker, tkey, events_url=events_url) as client:
                    one(client, provider, tenant)  # warm-up
                    ms = [one(client, provider, tenant) for _ in range(n)]
                print(f"{label:>13}: n={n} ready→seen p50 {statistics.median(ms):.1f} ms, "
                      f"p95 {percentile(ms, 0.95):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms, max {max(ms):.1f} ms")
    finally:
        for svc in reversed(services):
            svc.stop()
        redis.stop()
        nats.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
