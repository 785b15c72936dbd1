"""Which device indices each lease holds, per pool.

The invariant the process backend's isolation rests on: a device index is held by at
most one lease at a time, so two tenants never see the same device. The book is the
agent's memory only; after a restart it is rebuilt (``restore``) from what the broker
recorded for each live lease (its access details' ``devices``) and what the backend
says still runs, and a lease the backend no longer runs gets nothing back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class DeviceConflict(Exception):
    """Restoring two leases that claim one device, or a device the pool does not have."""


class DeviceBook:
    def __init__(self, pools: Mapping[str, Iterable[int]]) -> None:
        """``pools``: pool id → the device indices it sells (disjoint across pools)."""
        self._pool_devices: dict[str, tuple[int, ...]] = {}
        owner: dict[int, str] = {}
        for pool, indices in pools.items():
            unique = tuple(sorted(set(indices)))
            for index in unique:
                if index in owner:
                    raise DeviceConflict(f"device {index} is in pools {owner[index]!r} and {pool!r}")
                owner[index] = pool
            self._pool_devices[pool] = unique
        self._held: dict[str, tuple[str, tuple[int, ...]]] = {}  # lease → (pool, devices)
        self._holder: dict[int, str] = {}  # device → lease
        self._unhealthy: set[int] = set()

    def free(self, pool: str) -> list[int]:
        """Healthy devices of the pool no lease holds, lowest first."""
        return [i for i in self._pool_devices[pool] if i not in self._holder and i not in self._unhealthy]

    def held(self, lease_id: str) -> tuple[int, ...]:
        return self._held.get(lease_id, ("", ()))[1]

    def leases(self) -> dict[str, tuple[int, ...]]:
        return {lease: devices for lease, (_, devices) in self._held.items()}

    def set_unhealthy(self, indices: Iterable[int]) -> None:
        """Devices a tool reports unhealthy are not handed out (a lease holding one keeps
        it until it ends; the agent reports that lease's health)."""
        self._unhealthy = set(indices)

    def allocate(self, lease_id: str, pool: str, units: int) -> tuple[int, ...] | None:
        """``units`` free devices for the lease, or None (nothing taken) if there are not
        that many. Idempotent: a lease that already holds devices gets the same ones."""
        if lease_id in self._held:
            return self._held[lease_id][1]
        free = self.free(pool)
        if units < 1 or len(free) < units:
            return None
        chosen = tuple(free[:units])
        self._take(lease_id, pool, chosen)
        return chosen

    def release(self, lease_id: str) -> tuple[int, ...]:
        """The lease's devices go back; releasing twice (or an unknown lease) is a no-op."""
        _, devices = self._held.pop(lease_id, ("", ()))
        for index in devices:
            self._holder.pop(index, None)
        return devices

    def restore(self, pool: str, records: Mapping[str, Iterable[int]], running: Iterable[str]) -> list[str]:
        """After a restart: ``records`` are the broker's live leases on this pool with the
        devices their access recorded, ``running`` the lease ids the backend still runs.
        Leases in both get their devices back; returns the recorded leases the backend
        no longer runs (the agent reports them lost: their work is gone)."""
        running = set(running)
        gone = []
        for lease_id, devices in records.items():
            if lease_id not in running:
                gone.append(lease_id)
                continue
            devices = tuple(sorted(set(devices)))
            for index in devices:
                if index not in self._pool_devices.get(pool, ()):
                    raise DeviceConflict(f"lease {lease_id} records device {index}, which pool {pool!r} does not have")
                if self._holder.get(index, lease_id) != lease_id:
                    raise DeviceConflict(f"leases {self._holder[index]} and {lease_id} both record device {index}")
            self._take(lease_id, pool, devices)
        return gone

    def _take(self, lease_id: str, pool: str, devices: tuple[int, ...]) -> None:
        self._held[lease_id] = (pool, devices)
        for index in devices:
            self._holder[index] = lease_id
