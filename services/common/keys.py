"""Redis key builders.

Keys that a Lua script touches together share a ``{region}`` hash tag, so the same
scripts run unchanged on Redis Cluster. Keys that are looked up by id alone (the
pool index, API keys) are single-key and may live in any slot.

The global keys below carry no hash tag on purpose: each is read and written one key
per command (never in a script or transaction with another), so they need no common
slot, and untagged they spread over the masters instead of piling onto one. A script
that ever needs several of them must first give them a tag of their own
(docs/decisions.md, "Cluster mode").
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

    def pool_devices(self, region: str, pool_id: str) -> str:
        """Hash, only for pools that share devices (``PoolSpec.sharing``): device index
        (0-based; node = index // units_per_node) -> free milli (0-1000). The pool hash's
        ``free`` counts the devices with all 1000 free, so whole-unit asks read as before
        (docs/sharing.md)."""
        return f"{self._r(region)}:pool:{pool_id}:dev"

    def region_pools(self, region: str) -> str:
        """Set: ids of the pools registered in a region."""
        return f"{self._r(region)}:pools"

    def removed_pools(self, region: str) -> str:
        """Hash: pool id -> the last generation of it removed (a late write of that
        generation must not bring it back)."""
        return f"{self._r(region)}:pools:removed"

    def heartbeats(self, region: str) -> str:
        """Sorted set: pool id scored by its last heartbeat (unix seconds)."""
        return f"{self._r(region)}:hb"

    def lease(self, region: str, lease_id: str) -> str:
        """Hash: one live lease (units, expiry, seq, the LeaseInfo JSON)."""
        return f"{self._r(region)}:lease:{lease_id}"

    def lease_expiry(self, region: str) -> str:
        """Sorted set: lease id scored by expiry (unix seconds), for the sweeper."""
        return f"{self._r(region)}:lexp"

    def lease_provisioning(self, region: str) -> str:
        """Sorted set: ids of the region's leases in 'provisioning', scored by their
        provision deadline (unix seconds), for the provision-timeout sweep."""
        return f"{self._r(region)}:lprov"

    def lease_outbox(self, region: str) -> str:
        """Hash: the region's lease events owed to the record (docs/lifecycle.md,
        "Outbox"): event id ``<lease id>.<seq>`` -> what rebuilds the event. Written by
        the transition's script, removed once JetStream acknowledged the event."""
        return f"{self._r(region)}:outbox"

    def pool_leases(self, region: str, pool_id: str) -> str:
        """Set: ids of the live leases on one pool (offline -> lost, preemption)."""
        return f"{self._r(region)}:pool:{pool_id}:leases"

    def interruptible_leases(self, region: str) -> str:
        """Set: ids of the region's live interruptible leases (preemption candidates)."""
        return f"{self._r(region)}:intr"

    def leases_ready(self, region: str) -> str:
        """String: set by the broker once this region's leases are known to be in Redis
        (after a start or a rebuild). The reserve script refuses without it, so a Redis
        that lost its leases can never be booked over them."""
        return f"{self._r(region)}:leases-ready"

    # --- reliability (docs/reliability.md): one hash slot of its own ------------------
    # The record script touches a lease's facts, its pool's and its provider's counters
    # and the score map together, so they share the ``{rel}`` tag. The script builds the
    # per-lease, per-pool and per-provider names itself from ``reliability_prefix`` (a
    # batch touches thousands), exactly as the builders below do.
    def _rel(self) -> str:
        return f"{self.prefix}:{{rel}}"

    def reliability_prefix(self) -> str:
        """What every key of the record starts with."""
        return f"{self._rel()}:"

    def reliability(self, kind: str, subject: str) -> str:
        """Hash: counters of one pool or provider (``kind`` "pool" | "provider"):
        deliveries, failures, losses, closed lease-ms, open leases and their start sum."""
        return f"{self._rel()}:{kind}:{subject}"

    def reliability_samples(self, kind: str, subject: str) -> str:
        """List: the most recent times to ready (seconds), newest first, bounded."""
        return f"{self._rel()}:{kind}:{subject}:ready"

    def reliability_pools(self, provider: str) -> str:
        """Set: pools of a provider that have a record."""
        return f"{self._rel()}:provider:{provider}:pools"

    def reliability_lease(self, lease_id: str) -> str:
        """Hash: what the record has seen of one lease (ready, its end): a redelivered or
        reordered event changes nothing twice."""
        return f"{self._rel()}:lease:{lease_id}"

    def reliability_scores(self) -> str:
        """Hash: pool id -> score, for the engines' periodic refresh."""
        return f"{self._rel()}:scores"

    def reliability_all(self) -> str:
        """Pattern (SCAN MATCH) of every key of the record."""
        return f"{self._rel()}:*"

    def reliability_since(self) -> str:
        """String: when this record started from the first event of the stream. Without it
        (a new or a lost Redis) the record script refuses and the feed replays the stream."""
        return f"{self._rel()}:since"

    def reliability_version(self) -> str:
        """String: bumped by every change of a score (a refresh with nothing new reads one key)."""
        return f"{self._rel()}:version"

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

    def rate_limit(self, bucket: str) -> str:
        """String: request counter of one API key's current rate-limit window."""
        return f"{self.prefix}:rl:{bucket}"

    def lease_index(self) -> str:
        """Hash: lease id -> region."""
        return f"{self.prefix}:leaseidx"

    def tenant_leases(self, tenant: str) -> str:
        """Sorted set: a tenant's live lease ids scored by grant time."""
        return f"{self.prefix}:tenant:{tenant}:leases"

    def request(self, request_id: str) -> str:
        """Hash: one request's lifecycle state (``state``, ``claim``...) and its JSON record
        (docs/lifecycle.md, "Request")."""
        return f"{self.prefix}:req:{request_id}"

    def tenant_requests(self, tenant: str) -> str:
        """Sorted set: a tenant's request ids scored by creation time."""
        return f"{self.prefix}:tenant:{tenant}:reqs"

    def idempotency(self, tenant: str, key_hash: str) -> str:
        """String: the stored response to an Idempotency-Key."""
        return f"{self.prefix}:idem:{tenant}:{key_hash}"

    def queue(self) -> str:
        """Sorted set: queued request ids, scored priority first, then fair share."""
        return f"{self.prefix}:queue"

    def tenant_queued(self, tenant: str) -> str:
        """Set: ids of a tenant's requests that went into the queue (pruned of those that
        left it when the tenant reaches its cap; docs/overload.md)."""
        return f"{self.prefix}:queue:tenant:{tenant}"

    def tenant_vtime(self) -> str:
        """Hash: tenant -> virtual finish time of its last queued request (fair share)."""
        return f"{self.prefix}:queue:vtime"

    def budget_blocked(self) -> str:
        """Hash: tenant -> unix time its budget ran out (the broker places nothing for it)."""
        return f"{self.prefix}:budget:blocked"

    def lock(self, name: str) -> str:
        return f"{self.prefix}:lock:{name}"

    def rebuilt_marker(self, service: str) -> str:
        """String: set once a service has (re)loaded Redis from its durable record."""
        return f"{self.prefix}:rebuilt:{service}"
