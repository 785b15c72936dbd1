"""The demo's real provider agent, as a newcomer meets it: ``cbroker up --demo`` (as root)
runs ``cbroker agent`` for the provider ``this-host``; a process workload lands on its
virtual devices, really runs with its ``CUDA_VISIBLE_DEVICES``, ``cbroker logs`` prints
its output, and stopping ``up`` drains the agent and leaves no workload behind."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from services.cli.demo_agent import POOL_ID, USERS
from services.cli.servers import free_port

from ..helpers import wait_until
from .test_up import _stop

CLI = [sys.executable, "-m", "services.cli"]


def _workload_processes() -> list[psutil.Process]:
    uids = set()
    for name in USERS:
        with contextlib.suppress(KeyError):
            uids.add(pwd.getpwnam(name).pw_uid)
    out = []
    for p in psutil.process_iter(["uids"]):
        with contextlib.suppress(psutil.Error):
            if p.info["uids"] and p.info["uids"].real in uids and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def test_demo_agent_runs_a_process_workload_and_logs_show_its_output(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the demo's real agent runs workloads as other users: this test must run as root"
    ports = {name: free_port() for name in ("registry", "broker", "meter")}
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "REDIS_URL", "CB_ADMIN_KEY")}
    up = subprocess.Popen([*CLI, "up", "--demo", "--data-dir", str(tmp_path),
                           *(a for name, port in ports.items() for a in (f"--{name}-port", str(port)))],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    registry, broker = (f"http://127.0.0.1:{ports[s]}" for s in ("registry", "broker"))
    keys_file = tmp_path / "demo-keys.json"
    lease_id = None
    try:
        def agent_pool() -> dict | None:
            if not keys_file.exists() or keys_file.stat().st_size == 0:
                return None
            keys = json.loads(keys_file.read_text())
            r = httpx.get(f"{registry}/v1/pools/{POOL_ID}", headers={"Authorization": f"Bearer {keys['ops']}"})
            return r.json() if r.status_code == 200 and r.json()["status"] == "online" else None

        pool = wait_until(agent_pool, 90, what="the demo agent's pool online")
        assert (pool["provider"], pool["spec"]["delivery"], pool["capacity"]) == ("this-host", ["process"], 4)
        keys = json.loads(keys_file.read_text())
        tenant = {"Authorization": f"Bearer {keys['tenants']['alpha-labs']}"}
        body = {"units": 1, "workload": {"kind": "process", "command": ["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"]}}
        r = httpx.post(f"{broker}/v1/requests", json=body, headers=tenant, timeout=10)
        assert r.status_code == 201, r.text
        [lease] = r.json()["leases"]
        lease_id = lease["lease_id"]
        assert lease["pool_id"] == POOL_ID, lease  # the cheapest pool delivering processes

        def logged() -> subprocess.CompletedProcess | None:
            out = subprocess.run([*CLI, "logs", lease_id, "--data-dir", str(tmp_path)], capture_output=True,
                                 text=True, timeout=30)
            return out if out.returncode == 0 and out.stdout else None

        out = wait_until(logged, 30, what="the workload's output")
        assert out.stdout == "0\n", out
        # it exited: the agent completed its lease (released by the provider), the device is free again
        wait_until(lambda: httpx.get(f"{broker}/v1/leases/{lease_id}", headers=tenant).status_code == 404, 20,
                   what="the lease ended with its workload")
        pools = subprocess.run([*CLI, "pools", "--json", "--data-dir", str(tmp_path), "--registry-url", registry],
                               capture_output=True, text=True, timeout=30)
        assert pools.returncode == 0 and [p["pool_id"] for p in json.loads(pools.stdout)] == [POOL_ID], pools

        # a workload still running when `up` stops is stopped by the draining agent
        body = {"units": 2, "workload": {"kind": "process", "command": ["sleep", "600"]}}
        r = httpx.post(f"{broker}/v1/requests", json=body, headers=tenant, timeout=10)
        assert r.status_code == 201 and r.json()["leases"][0]["pool_id"] == POOL_ID, r.text
        wait_until(lambda: [p.name() for p in _workload_processes()] == ["sleep"], 20, what="the workload running")
    finally:
        out = _stop(up)
    assert up.returncode == 0, out
    assert "drained: 1 pools draining" in (tmp_path / "agent.log").read_text()
    assert not _workload_processes()
