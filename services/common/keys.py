"""Redis key builders.

Keys that a Lua script touches together share a ``{region}`` hash tag, so the same
scripts run unchanged on Redis Cluster. Keys that are looked up by id alone (the
pool index, API keys) are single-key and may live in any slot.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "cb"

    def _r(self, region: str) -> str:
        return f"{self.prefix}:{{{region}}}"

    # --- per region (one hash slot) ---------------------------------------------
    def pool(self, region: str, pool_id: str) -> str:
        """Hash: live state of one pool (capacity, leased, free, status, spec)."""
        return f"{self._r(region)}:pool:{pool_id}"

    def region_pools(self, region: str) -> str:
        """Set: ids of the pools registered in a region."""
        return f"{self._r(region)}:pools"

    def heartbeats(self, region: str) -> str:
        """Sorted set: pool id scored by its last heartbeat (unix seconds)."""
        return f"{self._r(region)}:hb"

    # --- global, single-key -------------------------------------------------------
    def pool_index(self) -> str:
        """Hash: pool id -> region, so a pool can be found from its id alone."""
        return f"{self.prefix}:poolidx"

    def regions(self) -> str:
        """Set: regions that have (or had) pools."""
        return f"{self.prefix}:regions"

    def api_key(self, key_hash: str) -> str:
        """String: JSON principal for a hashed API key."""
        return f"{self.prefix}:apikey:{key_hash}"

    def rebuilt_marker(self, service: str) -> str:
        """String: set once a service has (re)loaded Redis from its durable record."""
        return f"{self.prefix}:rebuilt:{service}"
