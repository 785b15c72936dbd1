"""``cbroker agent`` end to end: a real agent process (the process backend, as root like
the agent) against a real registry and broker (their own processes, real HTTP, NATS and
Redis). Placement → the command runs with exactly its devices → its output in
``cbroker logs`` → release stops it → the devices are reused; a workload's exit ends its
lease with its exit code; a command that does not exist fails the lease; SIGKILL → the
pools go offline → the lease is lost, and the restarted agent stops the orphan; a second
agent refuses; the registry away at start → retried, registered once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from services.cli.servers import free_port
from services.cli.supervisor import ServiceProcess
from services.common.messages import (
    AllocEvent,
    CapacityEvent,
    LeaseFailed,
    LeaseLost,
    LeaseReady,
    LeaseReleased,
    LeaseReplaced,
    PoolDraining,
    PoolOffline,
    PoolRegistered,
)
from services.common.settings import Settings, settings_to_env

from ..helpers import EventTap, eventually, wait_until
from ..workload_users import ensure_users, open_dir
from .conftest import with_settings

USERS = ("cbroker-a0", "cbroker-a1", "cbroker-a2", "cbroker-a3")
OTHER_USERS = ("cbroker-b0", "cbroker-b1")  # a second provider's agent on the same host
MODEL, REGION = "nvidia-l4", "us-east"
CLI = [sys.executable, "-m", "services.cli"]


@pytest.fixture(scope="module")
def users():
    return ensure_users(*USERS)


FOLDERS: list[Path] = []  # every agent's folder a test made (open_dir: outside pytest's own)


@pytest.fixture(autouse=True)
def _remove_folders() -> Iterator[None]:
    yield
    while FOLDERS:
        shutil.rmtree(FOLDERS.pop(), ignore_errors=True)


@pytest.fixture
def world(settings: Settings, nc, tmp_path: Path) -> Iterator[dict]:
    """Registry and broker as processes, a short heartbeat TTL (pools offline in 3 s)."""
    yield from services(settings, tmp_path, 3.0)


@pytest.fixture
def patient_world(settings: Settings, nc, tmp_path: Path) -> Iterator[dict]:
    """The same with the default heartbeat TTL: an agent restarted at once finds its pools online."""
    yield from services(settings, tmp_path, 30.0)


def services(settings: Settings, tmp_path: Path, ttl: float) -> Iterator[dict]:
    s = with_settings(settings, heartbeat_ttl_s=ttl)
    env = settings_to_env(s)
    procs = []
    try:
        for name in ("registry", "broker"):
            svc = ServiceProcess(name, free_port(), env, tmp_path / f"{name}.log")
            svc.start()
            procs.append(svc)
        for svc in procs:
            svc.wait_healthy()
        registry, broker = (p.url for p in procs)
        admin = {"Authorization": f"Bearer {s.admin_key}"}

        def key(role: str, subject: str) -> str:
            r = httpx.post(f"{registry}/v1/keys", json={"role": role, "subject": subject}, headers=admin)
            assert r.status_code == 201, r.text
            return r.json()["key"]

        yield {"registry": registry, "broker": broker, "key": key, "procs": procs, "env": env, "tmp": tmp_path}
    finally:
        for svc in procs:
            svc.stop()


def agent_config(world: dict, provider_key: str, pool_id: str, registry_url: str | None = None,
                 users: tuple[str, ...] = USERS, price: str = "0.10") -> Path:
    root = open_dir("cb-agent-loop-")
    FOLDERS.append(root)
    key_file = root / "key"
    key_file.write_text(provider_key)
    key_file.chmod(0o600)
    text = f"""
broker_url = "{world['broker']}"
registry_url = "{registry_url or world['registry']}"
key_file = "{key_file}"
heartbeat_s = 1
state_dir = "{root / 'state'}"

[discovery]
mode = "static"
[[discovery.static]]
model = "{MODEL}"
indices = [0, 1, 2, 3]

[process]
users = {json.dumps(list(users))}
work_dir = "{root / 'work'}"
grace_s = 2

[[pools]]
id = "{pool_id}"
region = "{REGION}"
backend = "process"
prices = {{ on_demand = "{price}" }}
provision_timeout_s = 30
"""
    path = root / "agent.toml"
    path.write_text(text)
    return path


@contextlib.contextmanager
def agent(config: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    with log.open("ab") as out:
        proc = subprocess.Popen([*CLI, "agent", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def pool_status(world: dict, key: str, pool_id: str) -> str | None:
    r = httpx.get(f"{world['registry']}/v1/pools/{pool_id}", headers={"Authorization": f"Bearer {key}"})
    return r.json()["status"] if r.status_code == 200 else None


def request(world: dict, tkey: str, command: list[str], units: int = 1) -> dict:
    """Placed once the broker has heard of the pool (it follows the registry's events)."""
    return wait_until(lambda: place(world, tkey, command, units=units), 10, what="placed")


def place(world: dict, tkey: str, command: list[str], **over: object) -> dict | None:
    body = {"units": 1, "accelerators": {"models": [MODEL]}, "placement": {"regions": [REGION]}, "queue": False,
            "workload": {"kind": "process", "command": command}, **over}
    r = httpx.post(f"{world['broker']}/v1/requests", json=body, headers={"Authorization": f"Bearer {tkey}"})
    return r.json()["leases"][0] if r.status_code == 201 else None


def lease_view(world: dict, tkey: str, lease_id: str) -> dict | None:
    r = httpx.get(f"{world['broker']}/v1/leases/{lease_id}", headers={"Authorization": f"Bearer {tkey}"})
    return r.json() if r.status_code == 200 else None


def ready(world: dict, tkey: str, lease_id: str) -> dict | None:
    view = lease_view(world, tkey, lease_id)
    return view if view and view["state"] == "ready" else None


def running_as(users: list) -> list[psutil.Process]:
    uids = {u.pw_uid for u in users}
    out = []
    for p in psutil.process_iter(["uids"]):
        with contextlib.suppress(psutil.Error):
            if p.info["uids"] and p.info["uids"].real in uids and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})


async def test_process_lease_runs_with_its_devices_logs_and_ends(world, users, nc, subjects) -> None:
    provider, pool_id = f"prov-{uuid.uuid4().hex[:6]}", f"pool-{uuid.uuid4().hex[:8]}"
    pkey, tkey = world["key"]("provider", provider), world["key"]("tenant", "ten-loop")
    config = agent_config(world, pkey, pool_id)
    async with EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        with agent(config, world["tmp"] / "agent.log") as proc:
            await eventually(lambda: pool_status(world, pkey, pool_id) == "online", 30, what="pool online")
            lease = request(world, tkey, ["sh", "-c", "echo visible=$CUDA_VISIBLE_DEVICES; exec sleep 600"], 2)
            view = await eventually(lambda: ready(world, tkey, lease["lease_id"]), 20, what="lease ready")
            assert view["access"]["devices"] == [0, 1]
            assert view["access"]["env"] == {"CUDA_VISIBLE_DEVICES": "0,1"}
            assert view["access"]["user"] in USERS
            out = await eventually(lambda: (o := cli("logs", lease["lease_id"], "--config", str(config))).stdout
                                   and o, 20, what="the workload's output")
            assert out.returncode == 0 and out.stdout == "visible=0,1\n", out
            assert [p.name() for p in running_as(users)] == ["sleep"]

            follow = subprocess.Popen([*CLI, "logs", "-f", lease["lease_id"], "--config", str(config)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

            # the tenant releases: the agent stops the workload, its devices come back
            r = httpx.post(f"{world['broker']}/v1/leases/{lease['lease_id']}/release",
                           headers={"Authorization": f"Bearer {tkey}"})
            assert r.status_code == 200, r.text
            await eventually(lambda: not running_as(users), 20, what="the workload stopped")
            followed, _ = follow.communicate(timeout=20)  # `logs -f` ends with the lease's work
            assert (follow.returncode, followed) == (0, "visible=0,1\n")
            big = request(world, tkey, ["sh", "-c", "echo all=$CUDA_VISIBLE_DEVICES; exec sleep 600"], 4)
            view = await eventually(lambda: ready(world, tkey, big["lease_id"]), 20, what="4-unit lease ready")
            assert view["access"]["devices"] == [0, 1, 2, 3]
            httpx.post(f"{world['broker']}/v1/leases/{big['lease_id']}/release",
                       headers={"Authorization": f"Bearer {tkey}"})
            await eventually(lambda: not running_as(users), 20, what="the 4-unit workload stopped")

            # a workload that exits ends its lease, with its exit code; a missing command fails it
            done = request(world, tkey, ["sh", "-c", "echo bye; exit 3"])
            ended = await alloc.wait_for(lambda e: isinstance(e, LeaseReleased)
                                         and e.lease.lease_id == done["lease_id"], 20)
            assert (ended.by, ended.exit_code) == ("provider", 3)
            missing = request(world, tkey, ["no-such-command-xyz"])
            failed = await alloc.wait_for(lambda e: isinstance(e, LeaseFailed)
                                          and e.lease.lease_id == missing["lease_id"], 20)
            assert failed.reason == "command not found: no-such-command-xyz"
            assert proc.poll() is None

            # SIGTERM: the pool drains, the agent exits 0
            live = request(world, tkey, ["sleep", "600"])
            await eventually(lambda: ready(world, tkey, live["lease_id"]), 20, what="lease ready")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        lost = await alloc.wait_for(lambda e: isinstance(e, LeaseLost) and e.lease.lease_id == live["lease_id"])
        assert "shut down" in lost.reason
    assert pool_status(world, pkey, pool_id) == "draining"
    assert not running_as(users)


async def test_sigkill_makes_the_pool_offline_the_lease_lost_replaced_and_restart_stops_the_orphan(
        world, users, nc, subjects) -> None:
    others = ensure_users(*OTHER_USERS)
    provider, pool_id = f"prov-{uuid.uuid4().hex[:6]}", f"pool-{uuid.uuid4().hex[:8]}"
    pkey, tkey = world["key"]("provider", provider), world["key"]("tenant", "ten-kill")
    config = agent_config(world, pkey, pool_id)
    # another provider's agent, dearer: where the lease goes when this one's pool is lost
    backup_key, backup_pool = world["key"]("provider", f"backup-{uuid.uuid4().hex[:6]}"), f"pool-{uuid.uuid4().hex[:8]}"
    backup = agent_config(world, backup_key, backup_pool, users=OTHER_USERS, price="0.20")
    async with EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc, \
            EventTap(nc.jetstream(), subjects.events("capacity"), CapacityEvent) as capacity, \
            contextlib.AsyncExitStack() as running:
        running.enter_context(agent(backup, world["tmp"] / "backup.log"))
        with agent(config, world["tmp"] / "agent.log") as proc:
            await eventually(lambda: pool_status(world, pkey, pool_id) == "online", 30, what="pool online")
            await eventually(lambda: pool_status(world, backup_key, backup_pool) == "online", 30, what="backup online")
            lease = request(world, tkey, ["sh", "-c", "echo attempt; exec sleep 600"])
            assert lease["pool_id"] == pool_id
            await eventually(lambda: ready(world, tkey, lease["lease_id"]), 20, what="lease ready")
            proc.kill()
            proc.wait()
        await capacity.wait_for(lambda e: isinstance(e, PoolOffline) and e.pool_id == pool_id, 15)
        await alloc.wait_for(lambda e: isinstance(e, LeaseLost) and e.lease.lease_id == lease["lease_id"], 15)
        assert [p.name() for p in running_as(users)] == ["sleep"]  # the agent is gone; its workload is not
        # failover: the same request, on the other provider's pool, delivered by its agent
        replaced = await alloc.wait_for(lambda e: isinstance(e, LeaseReplaced)
                                        and e.lease.lease_id == lease["lease_id"], 15)
        assert replaced.by_pool == backup_pool
        await alloc.wait_for(lambda e: isinstance(e, LeaseReady) and e.lease.lease_id == replaced.by_lease, 20)
        view = ready(world, tkey, replaced.by_lease)
        assert view and view["request_id"] == lease["request_id"] and view["replaces"] == lease["lease_id"]
        assert [p.name() for p in running_as(others)] == ["sleep"]
        with agent(config, world["tmp"] / "agent2.log"):
            await eventually(lambda: not running_as(users), 30, what="the restarted agent stopped the orphan")
            await eventually(lambda: pool_status(world, pkey, pool_id) == "online", 15, what="pool back online")
            # below the backup's price: only this agent's pool, once the broker sees it online again
            again = await eventually(lambda: place(world, tkey, ["sleep", "600"], max_price="0.15"), 15,
                                     what="placed on the restarted agent's pool")
            assert again["pool_id"] == pool_id
            view = await eventually(lambda: ready(world, tkey, again["lease_id"]), 20, what="lease ready")
            assert view["access"]["devices"] == [0]  # the orphan's device came back
        assert [p.name() for p in running_as(others)] == ["sleep"]  # the other provider's workload was not touched


async def test_a_second_agent_on_the_same_state_refuses(world, users) -> None:
    provider, pool_id = f"prov-{uuid.uuid4().hex[:6]}", f"pool-{uuid.uuid4().hex[:8]}"
    pkey = world["key"]("provider", provider)
    config = agent_config(world, pkey, pool_id)
    with agent(config, world["tmp"] / "agent.log") as first:
        await eventually(lambda: pool_status(world, pkey, pool_id) == "online", 30, what="pool online")
        second = cli("agent", "--config", str(config))
        assert second.returncode == 5, second
        assert f"another agent (pid {first.pid}) is running" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None


async def test_registry_away_at_start_is_retried_and_the_pool_registered_once(world, users, nc, subjects) -> None:
    provider, pool_id = f"prov-{uuid.uuid4().hex[:6]}", f"pool-{uuid.uuid4().hex[:8]}"
    pkey = world["key"]("provider", provider)
    port = free_port()
    late = ServiceProcess("registry", port, world["env"], world["tmp"] / "registry-late.log")
    config = agent_config(world, pkey, pool_id, registry_url=late.url)
    log = world["tmp"] / "agent-away.log"
    async with EventTap(nc.jetstream(), subjects.events("capacity"), CapacityEvent) as capacity:
        with agent(config, log) as proc:
            await eventually(lambda: log.read_text().count("retrying") >= 2, 30, what="the agent retrying")
            assert proc.poll() is None
            late.start()
            try:
                late.wait_healthy()
                await eventually(lambda: pool_status(world, pkey, pool_id) == "online", 30, what="pool online")
                await eventually(lambda: _heartbeats_seen(world, pkey, pool_id), 10, what="heartbeats")
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
                late.stop()
        # the drain is the agent's last word: every registration came before it
        await capacity.wait_for(lambda e: isinstance(e, PoolDraining) and e.pool_id == pool_id, 15)
        registered = [e for e in capacity.events if isinstance(e, PoolRegistered) and e.pool_id == pool_id]
        assert len(registered) == 1
        assert not any(type(e).__name__ == "PoolUpdated" and e.pool_id == pool_id for e in capacity.events)


def _heartbeats_seen(world: dict, key: str, pool_id: str) -> bool:
    r = httpx.get(f"{world['registry']}/v1/pools/{pool_id}", headers={"Authorization": f"Bearer {key}"})
    return r.status_code == 200 and r.json()["healthy"] == 4


def test_check_prints_the_pools_and_an_unknown_model_is_one_line(world) -> None:
    pkey = world["key"]("provider", f"prov-{uuid.uuid4().hex[:6]}")
    config = agent_config(world, pkey, "pool-check")
    out = cli("agent", "--config", str(config), "--check")
    assert out.returncode == 0, out
    for word in ("pool-check", "process", "nvidia-l4", "0,1,2,3"):
        assert word in out.stdout, (word, out.stdout)
    [pool] = json.loads(cli("agent", "--config", str(config), "--check", "--json").stdout)["pools"]
    assert (pool["devices"], pool["spec"]["units"], pool["spec"]["delivery"]) == ([0, 1, 2, 3], 4, ["process"])
    assert pool_status(world, pkey, "pool-check") is None  # --check registers nothing
    config.write_text(config.read_text().replace(f'model = "{MODEL}"', 'model = "nvidia-h100x"'))
    for args in (("--check",), ()):
        out = cli("agent", "--config", str(config), *args)
        assert out.returncode == 5 and "unknown model 'nvidia-h100x'" in out.stderr, out
        assert len(out.stderr.strip().splitlines()) == 1, out


def test_bad_configs_are_one_line_each(tmp_path: Path) -> None:
    missing = cli("agent", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 5 and "no such file" in missing.stderr, missing
    bad = tmp_path / "agent.toml"
    bad.write_text('broker_url = "http://x"\nregistry_url = "http://y"\nkey = "k"\n'
                   '[[pools]]\nid = "p1"\nregion = "us-east"\nbackend = "slurmx"\nprices = { on_demand = "1" }\n')
    out = cli("agent", "--config", str(bad))
    assert out.returncode == 5 and "pools[0].backend" in out.stderr and len(out.stderr.splitlines()) == 1, out
    bad.write_text(bad.read_text().replace('"slurmx"', '"slurm"'))  # a backend that is not installed
    out = subprocess.run([*CLI, "agent", "--config", str(bad)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": str(Path(sys.executable).parent)})
    assert out.returncode == 5 and "slurm needs 'sbatch' on PATH" in out.stderr, out
    assert len(out.stderr.splitlines()) == 1, out


async def test_an_unhealthy_device_lowers_the_heartbeat_and_fails_its_lease_over(world, users, nc, subjects) -> None:
    """The agent in this process (its real process backend), so that the test decides what
    discovery reports: device 0 turning unhealthy under a lease."""
    from services.agent.agent import Agent
    from services.agent.api import AgentApi
    from services.agent.backends.build import process_settings
    from services.agent.backends.process import ProcessBackend
    from services.agent.config import load
    from services.agent.discovery import Catalogue, from_static
    from services.agent.pools import plan

    provider, pool_id = f"prov-{uuid.uuid4().hex[:6]}", f"pool-{uuid.uuid4().hex[:8]}"
    pkey, tkey = world["key"]("provider", provider), world["key"]("tenant", "ten-sick")
    config = load(agent_config(world, pkey, pool_id))
    models = httpx.get(f"{world['registry']}/v1/accelerators").json()
    found = from_static([{"model": MODEL, "indices": [0, 1, 2, 3]}], Catalogue(models))
    sick: set[int] = set()
    api = AgentApi(config.broker_url, config.registry_url, config.api_key())
    agent = Agent(api=api, plans=plan(config, found, {m["model"]: m for m in models}),
                  backends={"process": ProcessBackend(process_settings(config))}, state_dir=Path(config.state_dir),
                  heartbeat_s=0.3, poll_s=0.2, grace_s={"process": 2}, unhealthy=lambda: set(sick))
    stop = asyncio.Event()
    run = asyncio.create_task(agent.run(stop))
    try:
        async with EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
            await eventually(lambda: _healthy(world, pkey, pool_id) == 4, 20, what="4 healthy units")
            lease = request(world, tkey, ["sleep", "600"])
            view = await eventually(lambda: ready(world, tkey, lease["lease_id"]), 20, what="lease ready")
            assert view["access"]["devices"] == [0]
            sick.add(0)
            lost = await alloc.wait_for(lambda e: isinstance(e, LeaseLost) and e.lease.lease_id == lease["lease_id"])
            assert "device 0" in lost.reason and "unhealthy" in lost.reason
            await eventually(lambda: _healthy(world, pkey, pool_id) == 3, 10, what="3 healthy units")
            await eventually(lambda: not running_as(users), 10, what="the workload stopped")
            again = request(world, tkey, ["sleep", "600"])
            view = await eventually(lambda: ready(world, tkey, again["lease_id"]), 20, what="lease ready")
            assert view["access"]["devices"] == [1]  # the unhealthy device is not handed out
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
        await api.close()
    assert not running_as(users)


def _healthy(world: dict, key: str, pool_id: str) -> int | None:
    r = httpx.get(f"{world['registry']}/v1/pools/{pool_id}", headers={"Authorization": f"Bearer {key}"})
    return r.json()["healthy"] if r.status_code == 200 else None


async def test_a_restarted_agent_adopts_the_running_workload_and_kills_nothing(patient_world, users) -> None:
    world = patient_world
    provider, pool_id = f"prov-{uuid.uuid4().hex[:6]}", f"pool-{uuid.uuid4().hex[:8]}"
    pkey, tkey = world["key"]("provider", provider), world["key"]("tenant", "ten-adopt")
    config = agent_config(world, pkey, pool_id)
    with agent(config, world["tmp"] / "agent.log") as proc:
        await eventually(lambda: pool_status(world, pkey, pool_id) == "online", 30, what="pool online")
        lease = request(world, tkey, ["sleep", "600"], 2)
        await eventually(lambda: ready(world, tkey, lease["lease_id"]), 20, what="lease ready")
        [workload] = running_as(users)
        proc.kill()
        proc.wait()
    log = world["tmp"] / "agent-again.log"
    with agent(config, log):
        await eventually(lambda: "adopted" in log.read_text(), 30, what="the workload adopted")
        assert running_as(users) == [workload] and workload.is_running()  # the same process, untouched
        assert ready(world, tkey, lease["lease_id"])["access"]["devices"] == [0, 1]
        # its devices are still its own: a new lease gets the others
        other = request(world, tkey, ["sleep", "600"], 2)
        view = await eventually(lambda: ready(world, tkey, other["lease_id"]), 20, what="second lease ready")
        assert view["access"]["devices"] == [2, 3]
        r = httpx.post(f"{world['broker']}/v1/leases/{lease['lease_id']}/release",
                       headers={"Authorization": f"Bearer {tkey}"})
        assert r.status_code == 200, r.text
        await eventually(lambda: not workload.is_running() or workload.status() == psutil.STATUS_ZOMBIE, 20,
                         what="the adopted workload stopped at its release")
