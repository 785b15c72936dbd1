"""``cbroker agent --config agent.toml``: from a config file to a running ``Agent``.

Order matters: the config is checked and the state folder locked before anything talks
to the network (a second agent refuses at once); the catalogue is fetched with backoff
(the registry may be away at start), the models checked against it, the devices found,
the backends built; only then are pools registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Mapping
from pathlib import Path

import httpx
import msgspec

from .agent import Agent, AgentError
from .api import AgentApi, ApiError
from .backends.base import Backend
from .config import AgentConfig, ConfigError, check, load
from .discovery import Catalogue, Inventory, discover, from_static
from .lock import StateLock
from .pools import PoolPlan, plan

log = logging.getLogger("agent")
REDISCOVER_S = 60.0  # device health (ECC, Xid, Ascend health) is read again this often


async def fetch_catalogue(api: AgentApi, stop: asyncio.Event, backoff_max_s: float = 30.0) -> list[dict] | None:
    delay = 0.5
    while not stop.is_set():
        try:
            return await api.catalogue()
        except (httpx.TransportError, ApiError) as exc:
            log.warning("the registry is not answering (%s); retrying in %.1f s", str(exc) or type(exc).__name__,
                        delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay * random.uniform(0.8, 1.2))
        delay = min(backoff_max_s, delay * 2)
    return None


async def inventory(config: AgentConfig, catalogue: Catalogue) -> Inventory:
    mode = config.discovery.mode
    if mode == "static":
        return from_static([msgspec.to_builtins(s) for s in config.discovery.static], catalogue)
    if mode == "off":
        return Inventory()
    return await discover(catalogue, config.discovery.models)


def build_backends(config: AgentConfig, plans: list[PoolPlan], agent_name: str,
                   source: str = "agent.toml") -> dict[str, Backend]:
    from .backends.build import process_settings, slurm_settings

    kinds = {p.backend for p in plans}
    out: dict[str, Backend] = {}
    try:
        if "process" in kinds:
            from .backends.process import ProcessBackend
            out["process"] = ProcessBackend(process_settings(config))
        if "slurm" in kinds:
            from .backends.slurm import SlurmBackend
            out["slurm"] = SlurmBackend(slurm_settings(config))
        if "kubernetes" in kinds:
            out["kubernetes"] = _kubernetes(config, agent_name)
    except (ValueError, OSError) as exc:  # the backends say what is missing (root, users, binaries)
        raise ConfigError(f"{source}: {exc}") from None
    return out


def _kubernetes(config: AgentConfig, agent_name: str) -> Backend:
    """The official client, configured from a kubeconfig or the pod's service account.
    Never run against a real cluster here (docs/agent.md says what was)."""
    from kubernetes import client, config as kconfig

    from .backends.kubernetes import KubernetesBackend

    k = config.kubernetes
    if k.kubeconfig:
        api = kconfig.new_client_from_config(config_file=k.kubeconfig, context=k.context)
    else:
        try:
            kconfig.load_incluster_config()
        except kconfig.ConfigException as exc:
            raise ValueError(f"kubernetes: no kubeconfig given and not in a cluster ({exc})") from None
        api = client.ApiClient()
    return KubernetesBackend(api, agent=agent_name, namespace_prefix=k.namespace_prefix, resource=k.resource)


def grace(config: AgentConfig) -> Mapping[str, float]:
    return {"process": config.process.grace_s, "slurm": config.slurm.grace_s, "kubernetes": config.kubernetes.grace_s}


async def run_agent(path: str | Path, stop: asyncio.Event | None = None, *, poll_s: float = 0.5) -> None:
    """Runs until SIGTERM/SIGINT (or ``stop``), then drains. Raises ``ConfigError``,
    ``AlreadyRunning`` or ``AgentError`` with one line for the provider."""
    config = load(path)
    source = str(path)
    lock = StateLock(config.state_dir)
    lock.acquire()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    api = AgentApi(config.broker_url, config.registry_url, config.api_key())
    refresh: asyncio.Task | None = None
    try:
        models = await fetch_catalogue(api, stop)
        if models is None:
            return
        by_id = {m["model"]: m for m in models}
        check(config, source=source, catalogue=by_id)
        catalogue = Catalogue(models)
        found = await inventory(config, catalogue)
        _say_inventory(found)
        plans = plan(config, found, by_id, source)
        who = await _whoami(api)
        backends = build_backends(config, plans, who, source)
        state = {"unhealthy": {d.index for d in found.devices if not d.healthy}}

        async def rediscover() -> None:
            while True:
                await asyncio.sleep(REDISCOVER_S)
                fresh = await inventory(config, catalogue)
                state["unhealthy"] = {d.index for d in fresh.devices if not d.healthy}

        if config.discovery.mode == "auto":
            refresh = asyncio.create_task(rediscover())
        agent = Agent(api=api, plans=plans, backends=backends, state_dir=Path(config.state_dir),
                      heartbeat_s=config.heartbeat_s, poll_s=poll_s, grace_s=grace(config),
                      unhealthy=lambda: set(state["unhealthy"]))
        log.info("agent for provider %s: %d pools, backends %s", who, len(plans), ", ".join(sorted(backends)))
        await agent.run(stop)
    finally:
        if refresh is not None:
            refresh.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await api.close()
        lock.release()


async def check_only(path: str | Path) -> tuple[list[PoolPlan], Inventory]:
    """``cbroker agent --check``: the config, the catalogue (one try), discovery and the
    pools as they would be registered; nothing is locked, started or registered."""
    config = load(path)
    source = str(path)
    api = AgentApi(config.broker_url, config.registry_url, config.api_key())
    try:
        try:
            models = await api.catalogue()
        except (httpx.TransportError, ApiError) as exc:
            raise AgentError(f"the registry at {config.registry_url} did not give its catalogue: {exc}") from None
    finally:
        await api.close()
    by_id = {m["model"]: m for m in models}
    check(config, source=source, catalogue=by_id)
    found = await inventory(config, Catalogue(models))
    return plan(config, found, by_id, source), found


async def _whoami(api: AgentApi) -> str:
    try:
        me = await api.whoami()
    except (ApiError, httpx.TransportError) as exc:
        raise AgentError(f"the registry did not accept the key: {exc}") from None
    if me.get("role") not in ("provider", "admin"):
        raise AgentError(f"the key is a {me.get('role')} key; the agent needs its provider's key")
    return me.get("subject") or "admin"


def _say_inventory(found: Inventory) -> None:
    for d in found.devices:
        if d.model:
            health = "healthy" if d.healthy else "UNHEALTHY: " + "; ".join(d.problems)
            log.info("device %s %d (%s, %s): %s, %s", d.vendor, d.index, d.name, d.source, d.model, health)
        else:
            log.warning("device %s %d not sold: %s", d.vendor, d.index, d.unmapped)
    for error in found.errors:
        log.warning("discovery: %s", error)
