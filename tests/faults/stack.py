"""A whole deployment for fault tests: its own nats-server and redis-server (so that a
test may kill and restart them), the registry, two brokers and the meter as real
processes, a small world of pools from two providers, and a steady, bounded load:
tenants placing, renewing, releasing and abandoning leases through the brokers' HTTP
API while the providers heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec

from services.cli.audit import AuditConfig, read_alloc, run_audit
from services.cli.audit_checks import Report
from services.cli.servers import ServerProcess, free_port, start_nats, start_redis
from services.cli.supervisor import ServiceProcess
from services.common.messages import LeaseGranted
from services.common.nats_conn import connect
from services.common.settings import Settings, settings_to_env
from services.common.subjects import Subjects

from ..helpers import eventually, pause
from ..integration.conftest import pool_body

HEARTBEAT_TTL_S = 8.0
PROVIDERS = {
    "acme": [("cn-gz", "huawei-ascend-910b", 16, "1.20"), ("cn-gz", "huawei-ascend-910b", 16, "1.25"),
             ("cn-yrd", "nvidia-a100-sxm-80gb", 16, "2.10"), ("cn-yrd", "nvidia-a100-sxm-80gb", 8, "2.20"),
             ("us-east", "nvidia-h100-sxm-80gb", 16, "3.00"), ("eu-central", "amd-mi300x", 16, "2.50")],
    "zeta": [("cn-gz", "huawei-ascend-910b", 16, "1.10"), ("cn-yrd", "nvidia-a100-sxm-80gb", 16, "2.00"),
             ("us-east", "nvidia-h100-sxm-80gb", 8, "2.90"), ("cn-nmg", "huawei-ascend-910b", 16, "0.90")],
}
TENANTS = ("t1", "t2", "t3")


@dataclass
class Load:
    """Tenants and provider agents. Bounded: each client does one operation at a time
    with a pause in between; leases are held briefly, renewed, released, or abandoned
    (a short TTL: the sweeper must give their units back)."""

    brokers: list[ServiceProcess]
    registry: ServiceProcess
    tenants: dict[str, dict[str, str]]
    providers: dict[str, dict[str, str]]
    pools: dict[str, list[str]]  # provider -> pool ids
    clients: int = 4
    silent: set[str] = field(default_factory=set)  # providers whose heartbeats are stopped
    placed: list[tuple[float, str, str]] = field(default_factory=list)  # (when, broker url, lease id) of every 201
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    heartbeats: list[tuple[float, str]] = field(default_factory=list)  # (when, provider) of every 200
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # everything stops
    clients_stopping: asyncio.Event = field(default_factory=asyncio.Event)  # the tenants stop
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        self._tasks += [asyncio.create_task(self._agent(p)) for p in self.pools]

    async def stop(self) -> None:
        self.stopping.set()
        self.clients_stopping.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop_clients(self) -> None:
        """The tenants stop (what they hold ends by release or expiry); agents go on."""
        self.clients_stopping.set()
        await asyncio.gather(*self._tasks[:self.clients], return_exceptions=True)

    def placed_since(self, t: float, broker: str | None = None) -> list[str]:
        return [lease for at, url, lease in self.placed if at >= t and (broker is None or url == broker)]

    async def _client(self, i: int) -> None:
        rng = random.Random(1000 + i)
        tenant = TENANTS[i % len(TENANTS)]
        held: list[tuple[float, str, str]] = []  # (release at, broker url, lease id)
        async with httpx.AsyncClient(headers=self.tenants[tenant], timeout=5) as http:
            n = 0
            while not self.clients_stopping.is_set():
                n += 1
                url = self.brokers[(i + n) % len(self.brokers)].url
                try:
                    now = time.monotonic()
                    due = [h for h in held if h[0] <= now]
                    if due:
                        lease = due[0]
                        held.remove(lease)
                        if rng.random() < 0.15:
                            pass  # abandoned: its TTL ends it
                        else:
                            verb = "renew" if rng.random() < 0.3 else "release"
                            r = await http.post(f"{url}/v1/leases/{lease[2]}/{verb}")
                            self._count(r.status_code)
                            if verb == "renew" and r.status_code == 200:
                                held.append((now + rng.uniform(0.5, 2), url, lease[2]))
                    elif len(held) < 4:
                        body = {"units": rng.choice([1, 1, 2, 4]), "queue": False, "lease_ttl_s": 6}
                        if rng.random() < 0.2:
                            body["shape"] = {"kind": "split", "max_pools": 2, "max_regions": 2}
                        r = await http.post(f"{url}/v1/requests", json=body)
                        self._count(r.status_code)
                        if r.status_code == 201:
                            for lease in r.json()["leases"]:
                                self.placed.append((time.monotonic(), url, lease["lease_id"]))
                                held.append((time.monotonic() + rng.uniform(0.3, 3), url, lease["lease_id"]))
                except httpx.HTTPError:
                    self.errors += 1
                await pause(self.clients_stopping, 0.05)  # one operation at a time, paced

    def _count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    async def _agent(self, provider: str) -> None:
        async with httpx.AsyncClient(headers=self.providers[provider], timeout=5) as http:
            while not self.stopping.is_set():
                if provider not in self.silent:
                    try:
                        r = await http.post(f"{self.registry.url}/v1/heartbeats", json={"pools": self.pools[provider]})
                        if r.status_code == 200:
                            self.heartbeats.append((time.monotonic(), provider))
                    except httpx.HTTPError:
                        pass
                await pause(self.stopping, 0.5)  # an agent heartbeats twice a second


@dataclass
class Stack:
    root: Path
    settings: Settings
    nats: ServerProcess
    redis: ServerProcess
    services: dict[str, ServiceProcess]  # registry, broker1, broker2, meter
    load: Load | None = None

    @property
    def brokers(self) -> list[ServiceProcess]:
        return [self.services["broker1"], self.services["broker2"]]

    def audit_config(self, confirm_s: float = 0.5) -> AuditConfig:
        s = self.settings
        return AuditConfig(nats_url=s.nats_url, redis_url=s.redis_url, prefix=s.prefix,
                           meter_url=self.services["meter"].url, key=s.admin_key, min_bill_s=s.min_bill_s,
                           grace_s=3.0, confirm_s=confirm_s)

    async def audit(self, confirm_s: float = 0.5) -> Report:
        return await run_audit(self.audit_config(confirm_s))

    async def audit_passes(self, t0: float, timeout: float = 45.0) -> tuple[float, Report]:
        """Seconds from ``t0`` until the auditor passes (the last report if it never does)."""
        last: list[Report | Exception] = []

        async def passing() -> Report | None:
            try:
                report = await self.audit()
            except Exception as exc:  # noqa: BLE001 - a server still coming back
                last[:] = [exc]
                return None
            last[:] = [report]
            return report if report.ok else None

        try:
            report = await eventually(passing, timeout=timeout, every=0.3)
        except AssertionError:
            seen = last[0] if last else None
            raise AssertionError(f"auditor still failing {timeout}s after the fault: "
                                 f"{seen.to_dict() if isinstance(seen, Report) else seen!r}") from None
        return time.monotonic() - t0, report

    async def told_leases_are_durable(self) -> int:
        """Every lease a client got a 201 for has its grant in the allocation stream."""
        assert self.load is not None
        told = {lease for _, _, lease in self.load.placed}  # before the stream is read
        nc = await connect(self.settings.nats_url, "fault-test")
        try:
            events, _ = await read_alloc(nc.jetstream(), Subjects(self.settings.prefix))
        finally:
            await nc.drain()
        grants = {e.lease.lease_id for _, e in events if isinstance(e, LeaseGranted)}
        assert told <= grants, f"{len(told - grants)} leases told to clients have no grant: {sorted(told - grants)[:5]}"
        return len(told)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        svc = self.services[name]
        assert svc.proc is not None and svc.proc.poll() is None
        os.kill(svc.proc.pid, sig)
        if sig == signal.SIGKILL:
            svc.proc.wait()


def _service(name: str, module: str, settings: Settings, root: Path) -> ServiceProcess:
    env = {**settings_to_env(settings), "CB_LOG_LEVEL": "warning"}
    svc = ServiceProcess(module, free_port(), env, root / f"{name}.log")
    svc.start()
    return svc


async def _setup_world(registry: str, admin_key: str) -> tuple[dict, dict, dict]:
    admin = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=registry, headers=admin, timeout=30) as c:
        async def key(role: str, subject: str) -> dict[str, str]:
            r = await c.post("/v1/keys", json={"role": role, "subject": subject})
            assert r.status_code == 201, r.text
            return {"Authorization": f"Bearer {r.json()['key']}"}

        providers = {p: await key("provider", p) for p in PROVIDERS}
        tenants = {t: await key("tenant", t) for t in TENANTS}
        pools: dict[str, list[str]] = {}
        for provider, specs in PROVIDERS.items():
            for i, (region, model, units, price) in enumerate(specs):
                pool_id = f"{provider}-{i}"
                r = await c.put(f"/v1/pools/{pool_id}", headers=providers[provider],
                                json=pool_body(region=region, model=model, units=units, prices={"on_demand": price}))
                assert r.status_code == 201, r.text
                pools.setdefault(provider, []).append(pool_id)
    return providers, tenants, pools


@contextlib.asynccontextmanager
async def running_stack(root: Path, **overrides: object) -> AsyncIterator[Stack]:
    """``overrides``: settings a test needs otherwise (e.g. a shorter provisional expiry)."""
    nats = start_nats(root / "nats")
    redis = start_redis(root / "redis")
    settings = Settings(nats_url=nats.url, redis_url=redis.url, prefix="cb", admin_key="admin-" + os.urandom(8).hex(),
                        heartbeat_ttl_s=HEARTBEAT_TTL_S, sweep_interval_s=0.2, meter_ack_wait_s=5.0)
    settings = msgspec.structs.replace(settings, **overrides)
    services: dict[str, ServiceProcess] = {}
    stack = Stack(root, settings, nats, redis, services)
    try:
        services["registry"] = _service("registry", "registry", settings, root)
        await asyncio.to_thread(services["registry"].wait_healthy, 60)
        providers, tenants, pools = await _setup_world(services["registry"].url, settings.admin_key or "")
        for name, module in (("broker1", "broker"), ("broker2", "broker"), ("meter", "meter")):
            services[name] = _service(name, module, settings, root)
        for name in ("broker1", "broker2", "meter"):
            await asyncio.to_thread(services[name].wait_healthy, 60)
        stack.load = Load(stack.brokers, services["registry"], tenants, providers, pools)
        stack.load.start()
        yield stack
    finally:
        if stack.load is not None:
            await stack.load.stop()
        for svc in services.values():
            await asyncio.to_thread(svc.stop)
        redis.stop()
        nats.stop()
