"""The demo's one real provider agent: ``cbroker agent`` with the ``process`` backend for
the demo provider ``this-host``, selling a few **virtual** devices of this machine (there
are no accelerators here; the pool's id says so). A request such as
``{"units": 1, "workload": {"kind": "process", "command": ["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"]}}``
lands on it (its price is the demo's lowest) and really runs, as a dedicated unprivileged
user, with ``CUDA_VISIBLE_DEVICES`` set to its virtual device; ``cbroker logs LEASE_ID``
prints the output.

The process backend runs workloads as other users, so it needs root: ``cbroker up --demo``
as root creates the demo's workload users (system accounts ``cbroker-demo0..3``, no
home, no shell) if they are missing; as another user the real agent is left out, and
``up`` says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .servers import _spawn, stop_process

PROVIDER = "this-host"
POOL_ID = "this-host-virtual-l4"  # virtual: no such device is on this machine
MODEL, REGION, DEVICES = "nvidia-l4", "us-east", (0, 1, 2, 3)
USERS = tuple(f"cbroker-demo{i}" for i in range(len(DEVICES)))
AGENT_DIR = "agent"  # under the data dir (``cbroker logs`` finds the config there)


@dataclass
class AgentProcess:
    """A child the supervisor restarts like a service (same config, same state folder:
    the restarted agent adopts what its predecessor started)."""

    config: Path
    log_path: Path
    name: str = "agent"
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = _spawn([sys.executable, "-m", "services.cli", "agent", "--config", str(self.config)],
                           self.log_path, tied=True, env=dict(os.environ))

    def stop(self, timeout: float = 30.0) -> None:
        stop_process(self.proc, timeout)  # SIGTERM: it drains, stops its workloads, answers their leases


def _workload_users() -> tuple[list[str], str]:
    """The demo's workload users (created when missing), or why there are none."""
    if os.geteuid() != 0:
        return [], ("the demo's real agent (pool this-host-virtual-l4) is left out: it runs workloads as dedicated "
                    "unprivileged users, which needs root (docs/agent.md)")
    for name in USERS:
        try:
            pwd.getpwnam(name)
            continue
        except KeyError:
            pass
        if shutil.which("useradd") is None:
            return [], f"the demo's real agent is left out: user {name} is missing and `useradd` is not on PATH"
        done = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                               "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True)
        if done.returncode not in (0, 9):  # 9: it exists (created meanwhile)
            return [], f"the demo's real agent is left out: could not create user {name}: {done.stderr.strip()}"
    return list(USERS), ""


def _traversable(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in [path.resolve(), *path.resolve().parents] if p.exists())


def write_config(data_dir: Path, registry_url: str, broker_url: str, key: str, users: list[str]) -> Path:
    root = data_dir / AGENT_DIR
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o711)  # enterable (the workload users reach work/), not listable; key and state are the agent's only
    key_file = root / "provider-key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    # workload users must reach their working folders: under the data dir only if every
    # parent lets them through (a home folder usually does not)
    tag = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]  # one per data dir
    work = root / "work" if _traversable(data_dir) else Path(tempfile.gettempdir()) / f"cbroker-demo-work-{tag}"
    config = root / "agent.toml"
    config.write_text(f"""# the demo's provider agent (services/cli/demo_agent.py): VIRTUAL devices, no accelerator here
broker_url = "{broker_url}"
registry_url = "{registry_url}"
key_file = "{key_file}"
provider = "{PROVIDER}"
heartbeat_s = 5
state_dir = "{root / 'state'}"

[discovery]
mode = "static"
[[discovery.static]]
model = "{MODEL}"
indices = {json.dumps(list(DEVICES))}

[process]
users = {json.dumps(users)}
work_dir = "{work}"
grace_s = 3

[[pools]]
id = "{POOL_ID}"
region = "{REGION}"
backend = "process"
provision_timeout_s = 60
prices = {{ currency = "USD", on_demand = "0.05" }}
label = "virtual devices on this host (demo)"
""")
    return config


async def start_demo_agent(data_dir: Path, registry_url: str, broker_url: str,
                           admin_key: str) -> tuple[AgentProcess | None, str, str]:
    """The demo agent, started and its pool registered (before the rest of the demo world,
    so that the world a newcomer first reads does not change under them): ``(agent,
    "", its provider key)``, or ``(None, why not, "")``."""
    users, why = _workload_users()
    if not users:
        return None, why, ""
    admin = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=registry_url, timeout=30) as client:
        r = await client.post("/v1/keys", json={"role": "provider", "subject": PROVIDER, "name": "demo agent"},
                              headers=admin)
        r.raise_for_status()
        key = r.json()["key"]
        agent = AgentProcess(write_config(data_dir, registry_url, broker_url, key, users), data_dir / "agent.log")
        agent.start()
        deadline = asyncio.get_running_loop().time() + 60
        while (await client.get(f"/v1/pools/{POOL_ID}", headers=admin)).status_code != 200:
            if agent.proc is None or agent.proc.poll() is not None:
                return agent, f"the demo's agent exited at start; see {agent.log_path}", key
            if asyncio.get_running_loop().time() > deadline:
                return agent, f"the demo's agent did not register its pool within 60 s; see {agent.log_path}", key
            await asyncio.sleep(0.2)
    return agent, "", key


def record_key(keys: dict[str, Any], keys_path: Path, key: str) -> None:
    """The agent's provider key joins the demo keys file (``cbroker pools`` with no
    ``--provider`` then shows the agent's pool)."""
    if not key:
        return
    keys["providers"][PROVIDER] = key
    tmp = keys_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(keys, indent=2))
    tmp.chmod(0o600)
    os.replace(tmp, keys_path)
