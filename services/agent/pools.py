"""``agent.toml``'s pools + what discovery found → what the agent registers and sells.

A pool that names its model and devices is taken as written; otherwise discovery fills
in the model (when the host has exactly one) and the devices (all of that model not sold
by another pool). Every gap is a ``ConfigError`` naming the pool, before anything is
registered: an agent that cannot say what it sells sells nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from services.common.messages import MAX_SHARED_UNITS, PoolSpec

from .config import AgentConfig, ConfigError
from .discovery import Inventory


class PoolPlan(msgspec.Struct, frozen=True, kw_only=True):
    pool_id: str
    backend: str  # process | slurm | kubernetes
    model: str
    vendor: str
    spec: PoolSpec  # the body of PUT /v1/pools/{id}
    devices: tuple[int, ...] = ()  # process pools: the device indices it sells (pool index i = devices[i])
    memory_mib: int = 0  # one device's memory (catalogue): a "memory" share is limited to milli/1000 of it

    def healthy_units(self, unhealthy: set[int]) -> int | None:
        """What the heartbeat reports: a process pool's healthy devices; None (not said)
        for pools whose devices the cluster's scheduler knows, not the agent."""
        if self.backend != "process":
            return None
        return min(self.spec.units, sum(1 for d in self.devices if d not in unhealthy))


def plan(config: AgentConfig, inventory: Inventory, catalogue: Mapping[str, Mapping],
         source: str = "agent.toml") -> list[PoolPlan]:
    found = inventory.by_model()
    explicit = {i for p in config.pools for i in (p.devices or ())}
    plans = []
    for n, pool in enumerate(config.pools):
        where = f"{source}: pools[{n}] ({pool.id})"
        model = pool.model
        if model is None:
            if len(found) != 1:
                what = ", ".join(sorted(found)) or "no mapped device"
                raise ConfigError(f"{where}: model: not given, and discovery found {what}; name the model")
            model = next(iter(found))
        if model not in catalogue:
            raise ConfigError(f"{where}: model: unknown model {model!r} (see GET /v1/accelerators)")
        devices: tuple[int, ...] = ()
        if pool.backend == "process":
            if pool.devices is not None:
                devices = tuple(sorted(set(pool.devices)))
            else:
                devices = tuple(sorted(d.index for d in found.get(model, ()) if d.index not in explicit))
                explicit |= set(devices)
            if not devices:
                raise ConfigError(f"{where}: devices: discovery found no {model} device for this pool; "
                                  "list its devices, or use [[discovery.static]]")
        units = pool.units or len(devices)
        if not units:
            raise ConfigError(f"{where}: units: give the units this pool sells (the {pool.backend} backend "
                              "cannot count them)")
        spec = pool.spec(model, units)
        spec = msgspec.structs.replace(spec, units_per_node=min(spec.units_per_node, units))  # a small host
        vendor = str(catalogue[model].get("vendor", ""))
        if spec.sharing.mode != "none":
            _check_sharing(where, pool.backend, vendor, units)
        plans.append(PoolPlan(pool_id=pool.id, backend=pool.backend, model=model, vendor=vendor, spec=spec,
                              devices=devices[:units] if devices else (),
                              memory_mib=int(float(catalogue[model].get("memory_gib") or 0) * 1024)))
    return plans


# backends whose share enforcement is vendor-specific (docs/agent.md, "Shares"): the process
# backend sets MPS / HAMi-core variables, the kubernetes backend asks HAMi's resources; both
# exist for NVIDIA only. Slurm's gres/shard is the cluster's, for any GPU it knows.
SHARING_VENDORS: dict[str, frozenset[str] | None] = {
    "process": frozenset({"nvidia"}), "kubernetes": frozenset({"nvidia"}), "slurm": None}


def _check_sharing(where: str, backend: str, vendor: str, units: int) -> None:
    """A pool that cannot enforce its shares must not offer them (docs/sharing.md)."""
    if units > MAX_SHARED_UNITS:
        raise ConfigError(f"{where}: sharing: a sharing pool has at most {MAX_SHARED_UNITS} devices; this one "
                          f"has {units} (split it into several pools)")
    vendors = SHARING_VENDORS[backend]
    if vendors is not None and vendor not in vendors:
        raise ConfigError(f"{where}: sharing: the {backend} backend enforces shares only on "
                          f"{', '.join(sorted(vendors))} devices, not {vendor or 'unknown'} ones; sell whole "
                          "devices (mode \"none\"), or use the slurm backend with gres/shard")
