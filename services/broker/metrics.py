"""Domain metrics of the broker (Prometheus). Placements are the hot path, so they are
counted here instead of by the per-request HTTP middleware."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

PLACEMENTS = Counter("cb_broker_placements", "Placement requests by outcome", ["outcome"])
PLACEMENT_SECONDS = Histogram("cb_broker_placement_seconds", "Time to decide and reserve a placement",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
LEASE_ENDS = Counter("cb_broker_lease_ends", "Leases ended, by how", ["how"])
