"""Domain metrics of the broker (Prometheus). Placements are the hot path, so they are
counted here instead of by the per-request HTTP middleware."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PLACEMENTS = Counter("cb_broker_placements", "Placement requests by outcome", ["outcome"])
PLACEMENT_SECONDS = Histogram("cb_broker_placement_seconds", "Time to decide and reserve a placement",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
LEASE_ENDS = Counter("cb_broker_lease_ends", "Leases ended, by how", ["how"])
QUEUE_WAIT_SECONDS = Histogram("cb_broker_queue_wait_seconds", "Time a queued request waited, by how it left the queue",
                               ["outcome"], buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400))
# set at scrape time from Redis (deployment-wide, the same in every replica)
QUEUE_DEPTH = Gauge("cb_broker_queue_depth", "Requests waiting in the queue")
LEASES = Gauge("cb_broker_leases", "Leases by state: live (held now), interruptible (live and preemptible)",
               ["state"])
BUDGET_BLOCKED = Gauge("cb_broker_budget_blocked_tenants", "Tenants whose budget ran out (nothing is placed for them)")


async def refresh(redis, keys) -> None:  # noqa: ANN001 - redis client, Keys
    """Scrape-time gauges: a few counts, no scans."""
    pipe = redis.pipeline(transaction=False)
    pipe.zcard(keys.queue())
    pipe.hlen(keys.lease_index())
    pipe.hlen(keys.budget_blocked())
    depth, live, blocked = await pipe.execute()
    interruptible = 0
    for raw in await redis.smembers(keys.regions()):
        region = raw.decode() if isinstance(raw, bytes) else raw  # one key per region (its own hash slot)
        interruptible += int(await redis.scard(keys.interruptible_leases(region)))
    QUEUE_DEPTH.set(int(depth))
    LEASES.labels("live").set(int(live))
    LEASES.labels("interruptible").set(interruptible)
    BUDGET_BLOCKED.set(int(blocked))
FAILOVERS = Counter("cb_broker_failovers", "Leases failed or lost, by what failover did: replaced, queued, stopped",
                    ["outcome"])
FAILOVER_SECONDS = Histogram("cb_broker_failover_seconds", "From a lease failing (its event's time) to its "
                             "replacement granted", buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5, 10, 30))
