"""Reliability of pools and providers, measured from the allocation events
(docs/reliability.md): ``record`` writes it to Redis, one atomic script per event;
``feed`` runs it as a durable consumer shared by the broker's replicas."""

from .feed import ReliabilityFeed
from .record import ReliabilityRecord, event_kind

__all__ = ["ReliabilityFeed", "ReliabilityRecord", "event_kind"]
