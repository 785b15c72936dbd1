"""The demo providers deliver: each watches its assignments on the broker and answers
``ready`` with plausible access details after a short delay, as a provider's agent would
(the real one, ``cbroker agent``, provisions for real). One provider fails a share of its
deliveries on purpose, so that failover (the request lands elsewhere under the same id)
and the reliability scores have something to show.

Nothing here is reachable: hosts are under ``.demo.invalid`` (RFC 2606 reserves
``.invalid``), so a printed ``ssh`` command is the right shape and leads nowhere.
"""

from __future__ import annotations

import asyncio
import logging
import random
import zlib
from collections.abc import Callable
from typing import Any

import httpx

log = logging.getLogger("cbroker.demo")

# what each demo provider's pools deliver (docs/delivery.md); every provider delivers something
DELIVERY: dict[str, tuple[str, ...]] = {
    "skyforge": ("ssh", "process", "container"),
    "pearl-river-sc": ("ssh", "slurm"),
    "ascend-west": ("process", "container"),
    "cambria": ("ssh", "process"),
    "hygon-dc": ("ssh", "process", "container"),
    "tidewater": ("ssh", "process", "container"),
}
FLAKY: dict[str, float] = {"tidewater": 0.3}  # share of deliveries failed on purpose
FAIL_REASONS = ("image pull timed out", "node failed its health check during setup",
                "no free IP address in the subnet")
DELAY_S = (1.0, 3.0)  # a delivery takes this long (times --demo-pace)
POLL_S = 0.5


def access_for(provider: str, lease_id: str, kind: str, units: int, workload: dict[str, Any],
               tenant: str = "") -> dict[str, Any]:
    """Access details a provider of ``kind`` would give, derived from the lease id (the
    same lease always gets the same host)."""
    n = zlib.crc32(lease_id.encode()) % 512
    host = f"gpu-{n}.{provider}.demo.invalid"
    devices = list(range(min(units, 8)))
    if kind == "ssh":
        return {"host": host, "port": 22000 + n, "user": (tenant or "demo").replace("-", "_")[:32],
                "devices": devices}
    if kind == "process":
        return {"host": host, "job_id": f"{provider}-{n}", "nodes": [host], "devices": devices}
    if kind == "container":
        ports = workload.get("ports") or [8000]
        return {"host": host, "urls": [f"http://{host}:{30000 + n + i}" for i, _ in enumerate(ports)],
                "job_id": f"ctr-{lease_id[-8:]}", "devices": devices}
    nodes = [f"gpu-{(n + i) % 512}.{provider}.demo.invalid" for i in range(max(1, (units + 7) // 8))]
    return {"job_id": str(100000 + n), "nodes": nodes, "devices": devices}


def _assignment(item: dict[str, Any]) -> tuple[str, str, int, dict[str, Any], str]:
    """(lease id, kind, units, workload, tenant) of one item of ``GET /v1/assignments``."""
    lease = item.get("lease") or item
    workload = item.get("workload") or {}
    kind = lease.get("delivery") or workload.get("kind") or "ssh"
    return lease["lease_id"], kind, int(lease.get("units") or 1), workload, lease.get("tenant", "")


class DemoProvider:
    """One demo provider's delivery loop: poll the provisioning assignments, answer each once."""

    def __init__(self, provider: str, key: str, client: httpx.AsyncClient, pace: float,
                 rng: random.Random, fail_share: float) -> None:
        self.provider, self.client, self.pace, self.rng, self.fail_share = provider, client, pace, rng, fail_share
        self.headers = {"Authorization": f"Bearer {key}"}
        self.handled: set[str] = set()  # answered or being answered
        self.inflight: set[str] = set()
        self.tasks: set[asyncio.Task] = set()

    async def poll(self) -> None:
        r = await self.client.get("/v1/assignments", params={"state": "provisioning"}, headers=self.headers)
        if r.status_code != 200:
            log.debug("demo %s assignments: %s %s", self.provider, r.status_code, r.text[:200])
            return
        body = r.json()
        seen = set()
        for item in body.get("items", []) if isinstance(body, dict) else body:
            lease_id, kind, units, workload, tenant = _assignment(item)
            seen.add(lease_id)
            if lease_id in self.handled:
                continue
            self.handled.add(lease_id)
            self.inflight.add(lease_id)
            task = asyncio.create_task(self.deliver(lease_id, kind, units, workload, tenant))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.handled &= seen | self.inflight  # what left the list is never listed again

    async def deliver(self, lease_id: str, kind: str, units: int, workload: dict[str, Any], tenant: str) -> None:
        try:
            await asyncio.sleep(self.rng.uniform(*DELAY_S) * self.pace)
            if self.rng.random() < self.fail_share:
                r = await self.client.post(f"/v1/leases/{lease_id}/failed", headers=self.headers,
                                           json={"reason": self.rng.choice(FAIL_REASONS)})
            else:
                r = await self.client.post(f"/v1/leases/{lease_id}/ready", headers=self.headers,
                                           json={"access": access_for(self.provider, lease_id, kind, units, workload,
                                                                      tenant)})
            if r.status_code >= 400:  # released or timed out meanwhile: nothing to deliver
                log.debug("demo %s delivering %s: %s %s", self.provider, lease_id, r.status_code, r.text[:200])
        except httpx.HTTPError as exc:  # broker restarting: the next poll sees the lease again
            self.handled.discard(lease_id)
            log.debug("demo %s delivering %s failed: %s", self.provider, lease_id, exc)
        finally:
            self.inflight.discard(lease_id)


async def delivery_agent(broker_url: str, keys: dict[str, Any], stop: asyncio.Event, pace: float = 1.0,
                         poll_s: float = POLL_S, rng: Callable[[], random.Random] = random.Random) -> None:
    """Run every demo provider's delivery loop until ``stop``."""
    async with httpx.AsyncClient(base_url=broker_url, timeout=10) as client:
        providers = [DemoProvider(p, keys["providers"][p], client, pace, rng(), FLAKY.get(p, 0.0))
                     for p in DELIVERY if p in keys["providers"]]
        while not stop.is_set():
            for provider in providers:
                try:
                    await provider.poll()
                except httpx.HTTPError as exc:  # broker restarting: the supervisor handles it
                    log.debug("demo %s assignments failed: %s", provider.provider, exc)
                except Exception:  # never let the demo's delivery die quietly
                    log.exception("demo %s delivery step failed", provider.provider)
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
            except TimeoutError:
                pass
        for provider in providers:
            for task in list(provider.tasks):
                task.cancel()
