"""The one interface every fulfilment backend implements, and what passes through it.

The agent owns the lease lifecycle and the device bookkeeping (``services.agent.devices``);
a backend only turns an assignment into running work and reports when that work ended by
itself. So a backend never talks to the broker: the agent calls ``start`` and answers
``ready`` (with the returned ``Access``) or ``failed`` (with ``StartFailed.reason``), calls
``stop`` on release/expiry/preemption, and turns what ``poll`` reports into the lease's end.
"""

from __future__ import annotations

import abc
from datetime import datetime
from typing import Literal

import msgspec

from services.common.delivery import Access, Workload

# The variables that make exactly the leased devices visible to a workload, per vendor
# (the catalogue's ``vendor`` field). Several for one vendor: all are set to the same list.
VISIBILITY_ENV: dict[str, tuple[str, ...]] = {
    "nvidia": ("CUDA_VISIBLE_DEVICES",),
    "amd": ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"),
    "hygon": ("HIP_VISIBLE_DEVICES",),
    "huawei": ("ASCEND_RT_VISIBLE_DEVICES",),
    "cambricon": ("MLU_VISIBLE_DEVICES",),
    "kunlunxin": ("XPU_VISIBLE_DEVICES",),
    "moore-threads": ("MUSA_VISIBLE_DEVICES",),
    "iluvatar": ("CUDA_VISIBLE_DEVICES",),
    "intel": ("HABANA_VISIBLE_DEVICES",),
}


class Assignment(msgspec.Struct, frozen=True, kw_only=True):
    """One lease the agent has decided to fulfil, with the devices it chose for it."""

    lease_id: str
    pool_id: str
    tenant: str
    units: int
    devices: tuple[int, ...]  # device indices on this host (process) or () when the backend places
    vendor: str  # catalogue vendor of the pool's model: picks the visibility variable
    model: str  # catalogue model id
    workload: Workload | None = None
    expires_at: datetime | None = None  # the lease's end, if fixed (Slurm's --time, k8s activeDeadlineSeconds)
    # shares (docs/sharing.md): milli of each device (1000 = whole), the pool's sharing mode,
    # and the device's memory (a "memory" share is limited to milli/1000 of it)
    milli: int = 1000
    sharing: str = "none"
    memory_mib: int = 0


def share_percent(milli: int) -> int:
    """A share as a percentage, rounded up and at least 1 (what MPS and HAMi-core take)."""
    return max(1, min(100, -(-milli // 10)))


def share_limits(lease: Assignment) -> dict[str, str]:
    """The variables that ask the vendor's sharing mechanism to hold a process to its share
    (docs/agent.md, "Shares"). Set after the tenant's own env, so it cannot raise them.

    NVIDIA only (the agent refuses sharing pools of other vendors on backends that need
    these): ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` is honoured by an MPS client when the
    provider runs the MPS control daemon, ``CUDA_DEVICE_SM_LIMIT`` and
    ``CUDA_DEVICE_MEMORY_LIMIT_0`` by HAMi-core (libvgpu.so preloaded); without either the
    share is accounted but not enforced. Index 0: the process sees only its leased device."""
    if lease.milli >= 1000 or lease.sharing == "none" or lease.vendor.lower() != "nvidia":
        return {}
    percent = str(share_percent(lease.milli))
    env = {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": percent, "CUDA_DEVICE_SM_LIMIT": percent}
    if lease.sharing == "memory" and lease.memory_mib > 0:
        env["CUDA_DEVICE_MEMORY_LIMIT_0"] = f"{lease.memory_mib * lease.milli // 1000}m"
    return env


class Ended(msgspec.Struct, frozen=True, kw_only=True):
    """Work that ended without the agent asking. ``exited``: the workload finished by
    itself (the lease is released, ``exit_code`` recorded). ``lost``: the backend or the
    system killed or failed it (Slurm cancelled it, the pod was evicted, ...): the lease
    is reported unhealthy and fails over."""

    lease_id: str
    state: Literal["exited", "lost"]
    exit_code: int | None = None
    reason: str = ""


class StartFailed(Exception):
    """The workload could not be started (command not found, sbatch refused it, ...).
    ``reason`` is what the agent sends as the lease's ``failed`` reason: one line, no
    secrets. Nothing the backend started for this lease is left running."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Backend(abc.ABC):
    """A place where leased work runs. One instance per backend kind per agent; all
    methods are called from the agent's single event loop."""

    kind: str  # "process" | "slurm" | "kubernetes"

    @abc.abstractmethod
    async def start(self, lease: Assignment) -> Access:
        """Start the lease's workload; return once it runs (the lease becomes ``ready``)
        with how the tenant reaches it (``devices`` is filled in by the agent).
        Raises ``StartFailed``; must not leave anything running when it does."""

    @abc.abstractmethod
    async def stop(self, lease_id: str, grace_s: float) -> None:
        """Stop the lease's work: ask politely (SIGTERM / scancel / delete), wait up to
        ``grace_s``, then force. Idempotent: stopping unknown or ended work is a no-op."""

    @abc.abstractmethod
    async def poll(self) -> list[Ended]:
        """Work that ended by itself since the last call (each reported once)."""

    @abc.abstractmethod
    async def recover(self) -> list[str]:
        """After an agent restart: the lease ids whose work this backend still runs
        (started by this agent before; never adopts or kills anything it did not start)."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the backend's own resources (clients, temp dirs) at agent exit; does
        not stop workloads (draining does that, lease by lease)."""
