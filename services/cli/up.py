"""``cbroker up``: the embedded default — servers, streams, services, demo world."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from services.common.nats_conn import connect, ensure_streams
from services.common.settings import Settings, settings_from_env, settings_to_env
from services.common.subjects import Subjects

from .demo import heartbeat_agent, load_demo, tenant_agent
from .demo_delivery import delivery_agent
from .demo_agent import record_key, start_demo_agent
from .servers import ServerProcess, start_nats, start_redis
from .supervisor import ServiceProcess, Supervisor, available_services
from .term import print_json

log = logging.getLogger("cbroker.up")


@dataclass
class UpOptions:
    data_dir: Path
    demo: bool
    nats_port: int | None
    redis_port: int | None
    ports: dict[str, int]
    demo_pace: float = 1.0  # the demo tenants' waits are multiplied by this
    as_json: bool = False  # once ready, one line of JSON on stdout instead of the table


def ready_json(servers: list[ServerProcess], services: list[ServiceProcess], data_dir: Path, keys: Path,
               console_url: str | None) -> dict:
    """``up --json``: where everything is, for a script waiting on the first line."""
    return {"servers": {s.name: s.url for s in servers},
            "services": {s.name: {"url": s.url, "docs": f"{s.url}/schema", "metrics": f"{s.url}/metrics"}
                         for s in services},
            "console": console_url, "data_dir": str(data_dir), "keys": str(keys)}


def _ready_table(servers: list[ServerProcess], services: list[ServiceProcess], data_dir: Path, keys: Path) -> Table:
    table = Table(title="Compute Broker is up", show_lines=False)
    for col in ("what", "where"):
        table.add_column(col)
    for s in servers:
        table.add_row(s.name, s.url)
    for svc in services:
        table.add_row(f"{svc.name} API", svc.url)
        table.add_row(f"{svc.name} OpenAPI docs", f"{svc.url}/schema")
        table.add_row(f"{svc.name} metrics", f"{svc.url}/metrics")
    table.add_row("data and logs", str(data_dir))
    table.add_row("API keys", str(keys))
    return table


async def _ensure_streams(settings: Settings) -> None:
    nc = await connect(settings.nats_url, "cbroker-up")
    try:
        await ensure_streams(nc.jetstream(), Subjects(settings.prefix))
    finally:
        await nc.drain()


async def run_up(opts: UpOptions, console: Console) -> int:
    opts.data_dir.mkdir(parents=True, exist_ok=True)
    servers: list[ServerProcess] = []
    services: list[ServiceProcess] = []
    demo_agent = None  # the demo's real provider agent (services/cli/demo_agent.py)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        nats_url = os.environ.get("NATS_URL")
        if not nats_url:
            servers.append(start_nats(opts.data_dir / "nats", opts.nats_port, tied=True))
            nats_url = servers[-1].url
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            servers.append(start_redis(opts.data_dir / "redis", opts.redis_port, tied=True))
            redis_url = servers[-1].url
        admin_key = os.environ.get("CB_ADMIN_KEY") or f"cbadmin_{secrets.token_hex(24)}"
        settings = settings_from_env(nats_url=nats_url, redis_url=redis_url, admin_key=admin_key,
                                     **{f"{s}_port": p for s, p in opts.ports.items()})
        await _ensure_streams(settings)
        env = settings_to_env(settings)
        for name in available_services():
            svc = ServiceProcess(name, getattr(settings, f"{name}_port"), env, opts.data_dir / f"{name}.log",
                                 tied=True)
            svc.start()
            services.append(svc)
        for svc in services:
            await asyncio.to_thread(svc.wait_healthy)

        agent = tenants = delivery = None
        keys_path = opts.data_dir / "demo-keys.json"
        if opts.demo:
            registry_url = next(s.url for s in services if s.name == "registry")
            broker_url = next(s.url for s in services if s.name == "broker")
            demo_agent, left_out, agent_key = await start_demo_agent(opts.data_dir, registry_url, broker_url, admin_key)
            if left_out:
                log.warning("%s", left_out)
            keys = await load_demo(registry_url, admin_key, keys_path)
            record_key(keys, keys_path, agent_key)
            agent = asyncio.create_task(heartbeat_agent(registry_url, keys, settings.heartbeat_ttl_s / 3, stop))
            tenants = asyncio.create_task(tenant_agent(broker_url, keys, 5.0, stop, pace=opts.demo_pace))
            delivery = asyncio.create_task(delivery_agent(broker_url, keys, stop, pace=opts.demo_pace))
        else:
            (opts.data_dir / "admin-key").write_text(admin_key)
            (opts.data_dir / "admin-key").chmod(0o600)

        registry = next((s for s in services if s.name == "registry"), None)
        console_url = None
        if registry is not None:  # the ops console (docs/console.md); with --demo, signed in as ops
            console_url = f"{registry.url}/console" + (f"?key={keys['ops']}" if opts.demo else "")
        keys_at = keys_path if opts.demo else opts.data_dir / "admin-key"
        if opts.as_json:
            print_json(ready_json(servers, services, opts.data_dir, keys_at, console_url))
            console = Console(stderr=True)  # what follows is for people: stdout holds the one line
        else:
            console.print(_ready_table(servers, services, opts.data_dir, keys_at))
            if console_url is not None:
                console.print(f"Ops console: {console_url}", soft_wrap=True, highlight=False)
        console.print("Ctrl-C stops everything.")

        # every child is started (and restarted) from this thread: a child's parent-death
        # signal follows the thread that forked it (``die_with_parent``)
        supervisor = Supervisor([*servers, *services, *([demo_agent] if demo_agent else [])])
        while not stop.is_set():
            supervisor.check()
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass
        console.print("stopping ...")
        if agent is not None:
            await agent
        if tenants is not None:
            await tenants
        if delivery is not None:
            await delivery
        return 0
    finally:
        if demo_agent is not None:  # first: it drains its pool and answers its leases while the services run
            await asyncio.to_thread(demo_agent.stop)
        for svc in reversed(services):
            await asyncio.to_thread(svc.stop)
        for server in reversed(servers):
            await asyncio.to_thread(server.stop)
