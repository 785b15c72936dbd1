"""``agent.toml`` → one frozen ``AgentConfig``, checked before anything starts.

Every mistake is one line naming the field (``agent.toml: pools[1].model: unknown model
'h100'``): a provider fixes a config file, not a traceback. What can be checked without
the network is checked here (types, unknown keys, the backend's binaries on PATH, the
workload user, devices given to two pools); the model names need the catalogue, which
the caller passes (the agent fetches it from the registry; ``cbroker agent --check``
from a file).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from services.agent.backends.process import Limits
from services.common.delivery import DeliveryKind
from services.common.ids import ID_PATTERN
from services.common.messages import (
    MAX_SHARED_UNITS,
    HostArch,
    PoolSpec,
    Prices,
    Sharing,
)

Backend = Literal["process", "slurm", "kubernetes"]
DEFAULT_DELIVERY: dict[str, tuple[str, ...]] = {
    "process": ("process",), "slurm": ("slurm",), "kubernetes": ("container",)}
# what each backend can deliver at all
DELIVERABLE: dict[str, frozenset[str]] = {
    "process": frozenset({"process"}), "slurm": frozenset({"slurm", "process"}),
    "kubernetes": frozenset({"container"})}
# binaries a backend drives; missing one is a config error, not a failed lease later
REQUIRED_BINARIES: dict[str, tuple[str, ...]] = {
    "process": (), "slurm": ("sbatch", "squeue", "scancel", "scontrol", "srun"), "kubernetes": ()}

_Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
_Url = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s]+$(?!\n)")]
_Index = Annotated[int, msgspec.Meta(ge=0, le=65535)]
_Seconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]


class ConfigError(Exception):
    """One line: the file, the field, what is wrong."""


class StaticDevices(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: _Id
    indices: Annotated[list[_Index], msgspec.Meta(min_length=1)]


class Discovery(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # auto: the vendor tools on PATH; static: only [[discovery.static]]; off: pools say it all
    mode: Literal["auto", "static", "off"] = "auto"
    models: dict[str, _Id] = {}  # a tool's product name → catalogue model, for names that do not map
    static: list[StaticDevices] = []


class ProcessBackend(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The process backend's settings (services/agent/backends/process.py reads them)."""

    # dedicated unprivileged accounts, one per running lease (so at most len(users) leases
    # run at once); required for process pools; never root
    users: list[Annotated[str, msgspec.Meta(pattern=r"^[a-z_][a-z0-9_-]{0,31}$(?!\n)")]] = []
    work_dir: str = "/var/lib/cbroker-agent/work"
    path: str | None = None  # PATH workloads see; None: the backend's default
    grace_s: _Seconds = 10.0
    limits: Limits = Limits()  # rlimits per workload (nproc, nofile, as_bytes, cpu_s, fsize_bytes)


class SlurmBackend(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gres: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]*(:[A-Za-z0-9_.-]+)?$(?!\n)")] = "gpu"
    grace_s: _Seconds = 30.0
    # the Slurm account jobs run as when the agent runs as root (never root); None: the agent's own user
    submit_as: Annotated[str, msgspec.Meta(pattern=r"^[a-z_][a-z0-9_-]{0,31}$(?!\n)")] | None = None
    work_dir: str | None = None  # job folders (script, output), on a filesystem the nodes share; None: under state_dir
    start_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 300.0  # pending longer: the lease fails
    # gres/shard Count per GPU in the cluster's gres.conf (sharing pools only): a share of m
    # milli asks --gres=shard:floor(m x shards_per_gpu / 1000); 1000 makes shards milli exactly
    shards_per_gpu: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None


class KubernetesBackend(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kubeconfig: str | None = None  # None: in-cluster service account
    context: str | None = None
    namespace_prefix: Annotated[str, msgspec.Meta(pattern=r"^[a-z]([a-z0-9-]{0,20})$(?!\n)")] = "cb-"
    resource: str | None = None  # device plugin resource; None: from the model's vendor
    grace_s: _Seconds = 30.0


class PoolConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: _Id
    region: _Id
    zone: str = ""
    model: _Id | None = None  # None: the one model discovery found
    units: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None  # None: the devices' count
    devices: list[_Index] | None = None  # device indices this pool sells (process); None: all of its model
    backend: Backend = "process"
    delivery: list[DeliveryKind] | None = None  # None: the backend's natural kind
    units_per_node: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    host_arch: HostArch = "x86_64"
    interconnect: str | None = None
    provision_timeout_s: Annotated[int, msgspec.Meta(ge=5, le=86_400)] = 300
    prices: Prices
    # shares of one device (docs/sharing.md): registered with the pool; each lease then names
    # its devices and milli, and the backend enforces them (docs/agent.md, "Shares")
    sharing: Sharing = Sharing()
    label: Annotated[str, msgspec.Meta(max_length=200)] = ""  # shown in the pool view, e.g. "virtual devices (demo)"

    def spec(self, model: str, units: int) -> PoolSpec:
        """The registration body for ``PUT /v1/pools/{id}``."""
        return PoolSpec(region=self.region, zone=self.zone, model=model, units=units,
                        units_per_node=self.units_per_node, interconnect=self.interconnect,
                        host_arch=self.host_arch, prices=self.prices,
                        delivery=tuple(self.delivery or DEFAULT_DELIVERY[self.backend]),
                        provision_timeout_s=self.provision_timeout_s, sharing=self.sharing)


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    broker_url: _Url
    registry_url: _Url
    key: str | None = None  # the provider's API key; prefer key_file
    key_file: str | None = None
    provider: _Id | None = None  # informational: the key decides whose pools these are
    heartbeat_s: Annotated[float, msgspec.Meta(ge=1, le=300)] = 10.0
    state_dir: str = "/var/lib/cbroker-agent"
    discovery: Discovery = msgspec.field(default_factory=Discovery)
    process: ProcessBackend = msgspec.field(default_factory=ProcessBackend)
    slurm: SlurmBackend = msgspec.field(default_factory=SlurmBackend)
    kubernetes: KubernetesBackend = msgspec.field(default_factory=KubernetesBackend)
    pools: Annotated[list[PoolConfig], msgspec.Meta(min_length=1)]

    def api_key(self) -> str:
        if self.key is not None:
            return self.key
        return Path(self.key_file or "").read_text().strip()


def _field_path(message: str) -> tuple[str, str]:
    """msgspec says "… - at `$.pools[0].units`"; we say "pools[0].units: …"."""
    match = re.search(r" - at `\$\.?(.*)`$(?!\n)", message)
    if not match:
        return "", message
    return match.group(1), message[: match.start()]


def parse(data: Mapping, *, source: str = "agent.toml") -> AgentConfig:
    try:
        return msgspec.convert(data, AgentConfig, strict=True)
    except msgspec.ValidationError as exc:
        field, what = _field_path(str(exc))
        raise ConfigError(f"{source}: {field + ': ' if field else ''}{what}") from None


def check(config: AgentConfig, *, source: str = "agent.toml", catalogue: Mapping[str, Mapping] | None = None,
          which: Callable[[str], str | None] = shutil.which,
          lookup_user: Callable[[str], pwd.struct_passwd] = pwd.getpwnam) -> AgentConfig:
    """The checks msgspec cannot make. ``catalogue``: model id → entry (None: skip)."""

    def fail(field: str, what: str) -> None:
        raise ConfigError(f"{source}: {field}: {what}")

    if (config.key is None) == (config.key_file is None):
        fail("key", "give exactly one of key and key_file")
    if config.key_file is not None:
        path = Path(config.key_file)
        if not path.is_file():
            fail("key_file", f"{config.key_file} is not a readable file")
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            fail("key_file", f"{config.key_file} is readable by others; chmod 600 it")
    seen_ids: set[str] = set()
    owner_of: dict[int, str] = {}
    for n, pool in enumerate(config.pools):
        where = f"pools[{n}]"
        if pool.id in seen_ids:
            fail(f"{where}.id", f"pool id {pool.id!r} is used twice")
        seen_ids.add(pool.id)
        if pool.model is not None and catalogue is not None and pool.model not in catalogue:
            fail(f"{where}.model", f"unknown model {pool.model!r} (see GET /v1/accelerators)")
        for kind in pool.delivery or ():
            if kind not in DELIVERABLE[pool.backend]:
                fail(f"{where}.delivery", f"the {pool.backend} backend cannot deliver {kind!r}")
        for binary in REQUIRED_BINARIES[pool.backend]:
            if which(binary) is None:
                fail(f"{where}.backend", f"{pool.backend} needs {binary!r} on PATH and it is not there")
        if pool.backend == "kubernetes":
            try:
                import kubernetes  # noqa: F401
            except ImportError:
                fail(f"{where}.backend", "kubernetes needs the kubernetes package: pip install 'compute-broker[agent-k8s]'")
        if pool.backend == "process":
            _check_process_user(config.process, fail, lookup_user)
        if pool.backend == "slurm" and config.slurm.submit_as is not None:
            try:
                submitter = lookup_user(config.slurm.submit_as)
            except KeyError:
                fail("slurm.submit_as", f"no such user {config.slurm.submit_as!r}")
            else:
                if submitter.pw_uid == 0:
                    fail("slurm.submit_as", "jobs are tenants' code and are never submitted as root")
        for index in pool.devices or ():
            if index in owner_of and owner_of[index] != pool.id:
                fail(f"{where}.devices", f"device {index} is already sold by pool {owner_of[index]!r}")
            owner_of[index] = pool.id
        if pool.devices is not None and pool.units is not None and pool.units > len(pool.devices):
            fail(f"{where}.units", f"{pool.units} units but only {len(pool.devices)} devices listed")
        if pool.sharing.mode != "none":
            _check_sharing(pool, config, lambda what, n=n: fail(f"pools[{n}].sharing", what))
    for n, entry in enumerate(config.discovery.static):
        if catalogue is not None and entry.model not in catalogue:
            fail(f"discovery.static[{n}].model", f"unknown model {entry.model!r}")
    for name, model in config.discovery.models.items():
        if catalogue is not None and model not in catalogue:
            fail(f"discovery.models.{name}", f"unknown model {model!r}")
    return config


def _check_sharing(pool: PoolConfig, config: AgentConfig, fail: Callable[[str], None]) -> None:
    """What can be checked of a sharing pool without the catalogue (the vendor's mechanism
    is checked when the pool is planned, services/agent/pools.py)."""
    size = pool.units if pool.units is not None else len(pool.devices) if pool.devices is not None else None
    if size is not None and size > MAX_SHARED_UNITS:
        fail(f"a sharing pool has at most {MAX_SHARED_UNITS} devices; this one has {size} "
             "(split it into several pools)")
    if pool.backend == "slurm":
        shards = config.slurm.shards_per_gpu
        if shards is None:
            fail("the slurm backend sells shares as gres/shard: set slurm.shards_per_gpu to the shard "
                 "Count per GPU of the cluster's gres.conf (1000 makes one shard one milli)")
        elif shards * pool.sharing.min_milli < 1000:
            fail(f"min_milli {pool.sharing.min_milli} is less than one of slurm.shards_per_gpu = {shards} "
                 f"shards per GPU; raise min_milli to at least {-(-1000 // shards)}")


def _check_process_user(process: ProcessBackend, fail: Callable[[str, str], None],
                        lookup_user: Callable[[str], pwd.struct_passwd]) -> None:
    if not process.users:
        fail("process.users", "the process backend needs unprivileged users to run workloads as")
    if len(set(process.users)) != len(process.users):
        fail("process.users", "a user is listed twice (each running lease needs a user of its own)")
    for n, name in enumerate(process.users):
        try:
            entry = lookup_user(name)
        except KeyError:
            fail(f"process.users[{n}]", f"no such user {name!r} (create it: useradd --system --user-group {name})")
            return
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            fail(f"process.users[{n}]", f"{name!r} is root: workloads are untrusted code and never run as root")


def load(path: str | os.PathLike, **kwargs) -> AgentConfig:
    """Read, convert and check one ``agent.toml``."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return check(parse(data, source=source), source=source, **kwargs)
