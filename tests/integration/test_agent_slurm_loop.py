"""``cbroker agent`` with the ``slurm`` backend against a real slurmctld + slurmd
(tests/slurm_cluster.py), a real registry and broker: placement → a Slurm job holding
the leased GRES, ready with its job id and nodes → its output in ``cbroker logs`` →
release cancels it; a job Slurm kills makes the lease lost, and it is replaced by a job
on another provider's pool."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx

from services.common.messages import AllocEvent, LeaseLost, LeaseReplaced

from ..helpers import EventTap, eventually
from ..slurm_cluster import SlurmCluster
from ..workload_users import ensure_users, open_dir
from .test_agent_loop import (  # noqa: F401 (world, _remove_folders: fixtures)
    FOLDERS, REGION, _remove_folders, agent, cli, place, pool_status, ready, world)

SLURM_USER = "cbroker-slurm"
MODEL = "nvidia-h100-sxm-80gb"


def slurm_config(world: dict, key: str, pool_id: str, price: str = "0.50") -> Path:  # noqa: F811
    root = open_dir("cb-agent-slurm-loop-")
    FOLDERS.append(root)
    key_file = root / "key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    path = root / "agent.toml"
    path.write_text(f"""
broker_url = "{world['broker']}"
registry_url = "{world['registry']}"
key_file = "{key_file}"
heartbeat_s = 1
state_dir = "{root / 'state'}"

[discovery]
mode = "off"

[slurm]
submit_as = "{SLURM_USER}"
grace_s = 2

[[pools]]
id = "{pool_id}"
region = "{REGION}"
model = "{MODEL}"
units = 8
backend = "slurm"
delivery = ["slurm", "process"]
prices = {{ on_demand = "{price}" }}
provision_timeout_s = 60
""")
    return path


async def test_slurm_lease_is_a_job_release_cancels_it_and_a_killed_job_is_lost(
        world, slurm_cluster: SlurmCluster, nc, subjects) -> None:  # noqa: F811 (the fixture)
    ensure_users(SLURM_USER)
    provider, pool_id = f"hpc-{uuid.uuid4().hex[:6]}", f"slurm-{uuid.uuid4().hex[:8]}"
    pkey, tkey = world["key"]("provider", provider), world["key"]("tenant", "ten-hpc")
    config = slurm_config(world, pkey, pool_id)
    tenant = {"Authorization": f"Bearer {tkey}"}
    body = {"accelerators": {"models": [MODEL]}}
    # another centre's agent on the same cluster, dearer: where a lost lease is replaced
    backup_key, backup_pool = world["key"]("provider", f"hpc2-{uuid.uuid4().hex[:6]}"), f"slurm-{uuid.uuid4().hex[:8]}"
    backup = slurm_config(world, backup_key, backup_pool, price="0.90")
    async with EventTap(nc.jetstream(), subjects.events("alloc"), AllocEvent) as alloc:
        with agent(config, world["tmp"] / "slurm-agent.log", env=slurm_cluster.env), \
                agent(backup, world["tmp"] / "slurm-backup.log", env=slurm_cluster.env):
            await eventually(lambda: pool_status(world, pkey, pool_id) == "online", 30, what="pool online")
            await eventually(lambda: pool_status(world, backup_key, backup_pool) == "online", 30, what="backup online")
            lease = await eventually(lambda: place(world, tkey, ["sh", "-c", "echo gpus=$CUDA_VISIBLE_DEVICES; "
                                                   "exec sleep 600"], units=2, **body), 10, what="placed")
            view = await eventually(lambda: ready(world, tkey, lease["lease_id"]), 60, what="job running")
            job = view["access"]["job_id"]
            assert slurm_cluster.job_ids() == [job]
            assert view["access"]["nodes"] == ["n1"]
            shown = slurm_cluster.run("scontrol", "-d", "show", "job", job).stdout
            assert "gpu:2" in shown, shown  # the job holds the leased GRES

            def logged() -> str | None:
                out = cli("logs", lease["lease_id"], "--config", str(config))
                return out.stdout if out.returncode == 0 and "gpus=" in out.stdout else None

            out = await eventually(logged, 30, what="the job's output")
            assert out.startswith("gpus=") and len(out.strip().split("=")[1].split(",")) == 2, out

            r = httpx.post(f"{world['broker']}/v1/leases/{lease['lease_id']}/release", headers=tenant)
            assert r.status_code == 200, r.text
            await eventually(lambda: not slurm_cluster.job_ids(), 30, what="the job cancelled")

            # a job Slurm ends (an operator's scancel) makes its lease lost; it is replaced on the
            # other centre's pool, a job of its own there
            second = await eventually(lambda: place(world, tkey, ["sleep", "600"], units=1, **body), 10,
                                      what="placed")
            assert second["pool_id"] == pool_id
            view = await eventually(lambda: ready(world, tkey, second["lease_id"]), 60, what="job running")
            slurm_cluster.run("scancel", view["access"]["job_id"])
            lost = await alloc.wait_for(lambda e: isinstance(e, LeaseLost)
                                        and e.lease.lease_id == second["lease_id"], 30)
            assert "CANCELLED" in lost.reason, lost.reason
            replaced = await alloc.wait_for(lambda e: isinstance(e, LeaseReplaced)
                                            and e.lease.lease_id == second["lease_id"], 30)
            assert replaced.by_pool == backup_pool
            again = await eventually(lambda: ready(world, tkey, replaced.by_lease), 60, what="replacement running")
            assert again["access"]["job_id"] != view["access"]["job_id"]
            assert slurm_cluster.job_ids() == [again["access"]["job_id"]]
        assert not slurm_cluster.job_ids()  # both agents drained: no job left behind
