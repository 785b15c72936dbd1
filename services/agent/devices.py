"""Which device indices each lease holds, per pool, and how much of each (milli).

The invariant the process backend's isolation rests on: a device is held whole by at
most one lease, and never more than 1,000 milli of it are held in all, so two tenants
never see the same device unless both hold shares of it (docs/sharing.md). Whole-device
leases on pools that do not share get devices the book picks (``allocate``); a lease that
names its devices (every lease on a sharing pool: the broker decided them) gets exactly
those or nothing (``take``) — the book never picks other devices than the broker's. The
book is the agent's memory only; after a restart it is rebuilt (``restore``) from what
the broker recorded for each live lease (its access details' ``devices``) and what the
backend says still runs, and a lease the backend no longer runs gets nothing back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

MILLI = 1000  # a whole device (services.common.messages.MILLI; the agent imports no service code)


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
        self._held: dict[str, tuple[str, tuple[int, ...], int]] = {}  # lease → (pool, devices, milli)
        self._taken: dict[int, dict[str, int]] = {}  # device → {lease: milli}
        self._unhealthy: set[int] = set()

    def free(self, pool: str) -> list[int]:
        """Healthy devices of the pool no lease holds any of, lowest first."""
        return [i for i in self._pool_devices[pool] if not self._taken.get(i) and i not in self._unhealthy]

    def free_milli(self, index: int) -> int:
        return MILLI - sum(self._taken.get(index, {}).values())

    def held(self, lease_id: str) -> tuple[int, ...]:
        return self._held.get(lease_id, ("", (), 0))[1]

    def leases(self) -> dict[str, tuple[int, ...]]:
        return {lease: devices for lease, (_, devices, _) in self._held.items()}

    def holders(self, indices: Iterable[int]) -> set[str]:
        """The leases holding any part of these devices."""
        return {lease for i in indices for lease in self._taken.get(i, {})}

    def set_unhealthy(self, indices: Iterable[int]) -> None:
        """Devices a tool reports unhealthy are not handed out (a lease holding one keeps
        it until it ends; the agent reports that lease's health)."""
        self._unhealthy = set(indices)

    def allocate(self, lease_id: str, pool: str, units: int) -> tuple[int, ...] | None:
        """``units`` wholly free devices for the lease, or None (nothing taken) if there are
        not that many. Idempotent: a lease that already holds devices gets the same ones."""
        if lease_id in self._held:
            return self._held[lease_id][1]
        free = self.free(pool)
        if units < 1 or len(free) < units:
            return None
        chosen = tuple(free[:units])
        self._take(lease_id, pool, chosen, MILLI)
        return chosen

    def take(self, lease_id: str, pool: str, indices: Iterable[int], milli: int = MILLI) -> str | None:
        """``milli`` of each of exactly these devices (the broker named them), all or
        nothing: None when taken, else why not (one line). Idempotent for the same ask."""
        devices = tuple(indices)
        if lease_id in self._held:
            _, have, had = self._held[lease_id]
            return None if (sorted(have), had) == (sorted(devices), milli) else \
                f"lease {lease_id} already holds {had} milli of devices {_names(have)}"
        if not 1 <= milli <= MILLI:
            return f"a share of {milli} milli is not 1-{MILLI}"
        if not devices or len(set(devices)) != len(devices):
            return f"devices {_names(devices)} are not distinct devices"
        for index in devices:
            if index not in self._pool_devices.get(pool, ()):
                return f"pool {pool!r} has no device {index}"
            if index in self._unhealthy:
                return f"device {index} is reported unhealthy"
            if self.free_milli(index) < milli:
                held = ", ".join(sorted(self._taken.get(index, {})))
                return f"device {index} has {self.free_milli(index)} milli free here ({held} hold the rest); {milli} leased"
        self._take(lease_id, pool, devices, milli)
        return None

    def release(self, lease_id: str) -> tuple[int, ...]:
        """The lease's devices (or shares) go back; releasing twice (or an unknown lease) is a no-op."""
        _, devices, _ = self._held.pop(lease_id, ("", (), 0))
        for index in devices:
            taken = self._taken.get(index, {})
            taken.pop(lease_id, None)
            if not taken:
                self._taken.pop(index, None)
        return devices

    def restore(self, pool: str, records: Mapping[str, Iterable[int]], running: Iterable[str],
                milli: Mapping[str, int] | None = None) -> list[str]:
        """After a restart: ``records`` are the broker's live leases on this pool with the
        devices their access recorded (``milli``: each one's share, whole if absent),
        ``running`` the lease ids the backend still runs. Leases in both get their devices
        back; returns the recorded leases the backend no longer runs (the agent reports
        them lost: their work is gone)."""
        running = set(running)
        gone = []
        for lease_id, devices in records.items():
            if lease_id not in running:
                gone.append(lease_id)
                continue
            devices = tuple(sorted(set(devices)))
            share = (milli or {}).get(lease_id, MILLI)
            for index in devices:
                if index not in self._pool_devices.get(pool, ()):
                    raise DeviceConflict(f"lease {lease_id} records device {index}, which pool {pool!r} does not have")
                others = {k: v for k, v in self._taken.get(index, {}).items() if k != lease_id}
                if others and sum(others.values()) + share > MILLI:
                    raise DeviceConflict(f"leases {', '.join(sorted(others))} and {lease_id} both record device {index}")
            self.release(lease_id)
            self._take(lease_id, pool, devices, share)
        return gone

    def _take(self, lease_id: str, pool: str, devices: tuple[int, ...], milli: int) -> None:
        self._held[lease_id] = (pool, devices, milli)
        for index in devices:
            self._taken.setdefault(index, {})[lease_id] = milli


def _names(devices: Iterable[int]) -> str:
    return ", ".join(map(str, devices)) or "(none)"
