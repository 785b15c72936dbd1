"""Reliability of pools and providers, measured from the allocation events
(docs/reliability.md): ``record`` writes it to Redis, one atomic script per batch of
events; ``feed`` runs it as a durable consumer shared by the meter's replicas.

It lives in the meter because it is metering: a fold of the allocation stream, like
billing, that the meter already reads. The broker only reads the scores it ranks with
(``services/common/reliability.py``), so its CPU goes to placing."""

from .feed import ReliabilityFeed
from .record import ReliabilityRecord, event_kind

__all__ = ["ReliabilityFeed", "ReliabilityRecord", "event_kind"]
