"""Domain metrics of the registry (Prometheus). Heartbeats are the hottest path, so
they are counted here with one counter increment rather than by the per-request HTTP
middleware."""

from __future__ import annotations

from prometheus_client import Counter

HEARTBEATS = Counter("cb_registry_heartbeats", "Pool heartbeats ingested", ["outcome"])
STATUS_CHANGES = Counter("cb_registry_pool_status_changes", "Pool status transitions", ["status"])
HEARTBEAT_MISSES = Counter("cb_registry_heartbeat_misses", "Pools taken offline because they missed their heartbeat")
