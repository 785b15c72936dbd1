"""The broker's matching engine: pure, synchronous, indexed. See docs/matching.md."""

from .batch import BatchResult, place_batch
from .engine import Engine
from .model import (
    HOURS_PER_MONTH,
    Allocation,
    Ask,
    Billing,
    Decision,
    Metric,
    Objective,
    Placement,
    PoolState,
)

__all__ = [
    "HOURS_PER_MONTH", "Allocation", "Ask", "BatchResult", "Billing", "Decision", "Engine", "Metric",
    "Objective", "Placement", "PoolState", "place_batch",
]
