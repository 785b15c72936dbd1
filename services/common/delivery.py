"""The delivery contract: what a tenant asks to run on its lease (a workload), what a
pool says it can deliver, and what the provider answers (access details).

Shared by the broker (which stores and routes them), the CLI and clients (which read
access details) and provider agents (which read workloads from their assignments).
Everything here is bounded: a workload or an access blob is stored per lease and read
back on every view, so its size and its characters are checked at the door (a 400 with
the field that is wrong), never trusted later.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

DeliveryKind = Literal["ssh", "process", "container", "slurm"]
DELIVERY_KINDS: tuple[str, ...] = ("ssh", "process", "container", "slurm")

# provisioning → ready → released | expired | preempted | revoked | lost; provisioning → failed
LeaseState = Literal["provisioning", "ready"]
AttemptState = Literal["provisioning", "ready", "released", "expired", "preempted", "revoked", "lost", "failed"]
OnFailure = Literal["replace", "fail"]

DEFAULT_PROVISION_TIMEOUT_S = 300
# a pool or provider with no record starts as if it had delivered 9 of 10 (Beta(9, 1)):
# trusted enough to be chosen, not ranked above one that has proven itself
RELIABILITY_PRIOR = (9.0, 1.0)
MAX_ACCESS_BYTES = 16 * 1024  # one access blob, JSON-encoded
MAX_WORKLOAD_BYTES = 128 * 1024  # one workload, JSON-encoded

# printable text: no ASCII control characters (a key or value with one is refused)
_TEXT = r"^[^\x00-\x1f\x7f]*$(?!\n)"
_LINE = Annotated[str, msgspec.Meta(max_length=4096, pattern=_TEXT)]
_ARG = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=_TEXT)]
EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$(?!\n)",
                                      description="an environment variable name")]
EnvValue = Annotated[str, msgspec.Meta(max_length=8192, pattern=_TEXT)]
Env = Annotated[dict[EnvName, EnvValue], msgspec.Meta(max_length=128)]
Command = Annotated[list[_ARG], msgspec.Meta(min_length=1, max_length=256)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class _Workload(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    pass


class SshWorkload(_Workload, tag="ssh"):
    """A host the tenant logs into with one of its keys."""

    public_keys: Annotated[list[Annotated[str, msgspec.Meta(
        min_length=16, max_length=8192, pattern=r"^(ssh-|ecdsa-|sk-)[^\x00-\x1f\x7f]+$(?!\n)")]],
        msgspec.Meta(min_length=1, max_length=16)]


class ProcessWorkload(_Workload, tag="process"):
    """A command run on the provider's host with exactly the leased devices visible."""

    command: Command
    env: Env = {}


class ContainerWorkload(_Workload, tag="container"):
    image: Annotated[str, msgspec.Meta(min_length=1, max_length=512, pattern=r"^[^\s\x00-\x1f\x7f]+$(?!\n)")]
    command: Annotated[list[_ARG], msgspec.Meta(max_length=256)] = []
    env: Env = {}
    ports: Annotated[list[Port], msgspec.Meta(max_length=32)] = []


class SlurmWorkload(_Workload, tag="slurm"):
    """A batch script submitted as one Slurm job holding the leased GRES."""

    script: Annotated[str, msgspec.Meta(min_length=3, max_length=64 * 1024, pattern=r"^#!")]


Workload = SshWorkload | ProcessWorkload | ContainerWorkload | SlurmWorkload


class Access(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """How the tenant reaches what was delivered. Shown to the lease's tenant and admin
    only (ops sees it redacted), never written to an event or a log line."""

    host: Annotated[str, msgspec.Meta(max_length=255, pattern=r"^[^\s\x00-\x1f\x7f]*$(?!\n)")] | None = None
    port: Port | None = None
    user: Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[^\s\x00-\x1f\x7f]*$(?!\n)")] | None = None
    urls: Annotated[list[_LINE], msgspec.Meta(max_length=32)] = []
    env: Env = {}
    job_id: Annotated[str, msgspec.Meta(max_length=128, pattern=_TEXT)] | None = None
    nodes: Annotated[list[Annotated[str, msgspec.Meta(max_length=255, pattern=_TEXT)]],
                     msgspec.Meta(max_length=1024)] = []
    devices: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=65535)]], msgspec.Meta(max_length=1024)] = []
    note: Annotated[str, msgspec.Meta(max_length=2048, pattern=_TEXT)] | None = None


REDACTED = Access(note="redacted: access details are shown to the lease's tenant only")


class ReadyBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/leases/{id}/ready``."""

    access: Access = msgspec.field(default_factory=Access)


class FailedBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/leases/{id}/failed``."""

    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=1024, pattern=_TEXT)]


class HealthBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/leases/{id}/health``: unhealthy ends the lease as lost (and fails over)."""

    healthy: bool
    detail: Annotated[str, msgspec.Meta(max_length=1024, pattern=_TEXT)] = ""


class CompleteBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/leases/{id}/complete``: the delivered workload ended by itself (a
    process exited, a job finished); the lease is released, billing stops."""

    exit_code: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None  # shell convention: 128 + N for signal N


class Attempt(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One lease tried for a request: the request view lists them all, failed ones too."""

    lease_id: str
    pool_id: str
    provider: str
    region: str
    state: AttemptState
    granted_at: datetime
    ready_at: datetime | None = None
    ended_at: datetime | None = None
    reason: str = ""
    charged: bool = True  # False: never became ready, so never billed


class Reliability(msgspec.Struct, frozen=True, kw_only=True):
    """A pool's or provider's delivery record, from the events (docs/reliability.md).
    ``score`` is the posterior mean of delivering, starting from a documented prior (a
    newcomer is not 100%); ranking uses it."""

    subject: str  # pool id or provider id
    deliveries: int = 0
    failures: int = 0
    losses: int = 0
    lease_hours: float = 0.0
    losses_per_1000h: float | None = None
    ready_p50_s: float | None = None
    ready_p95_s: float | None = None
    score: float
