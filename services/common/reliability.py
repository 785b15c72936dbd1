"""Reading a reliability record (docs/reliability.md) the same way everywhere.

The broker writes the record (its ``reliability`` package, one Lua script per event);
the broker's endpoint, its engine refresh and the registry's pool views read it through
these helpers and the key builders in ``keys.py``, so the field names and the score
formula live in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from redis.asyncio import Redis

from .delivery import RELIABILITY_PRIOR, Reliability
from .keys import Keys

POOL, PROVIDER = "pool", "provider"
READY_WINDOW = 200  # times to ready kept per pool and provider (the most recent ones)
# fields of a counters hash
DELIVERIES, FAILURES, LOSSES = "d", "f", "l"
CLOSED_MS = "hc"  # lease-milliseconds of ended leases
OPEN, OPEN_START_MS = "on", "os"  # leases running now, and the sum of their start times (unix ms)


def score(deliveries: int, failures: int, losses: int) -> float:
    """Posterior mean of delivering under the Beta prior: a newcomer scores 0.9."""
    good, bad = RELIABILITY_PRIOR
    return (deliveries + good) / (deliveries + failures + losses + good + bad)


PRIOR_SCORE = score(0, 0, 0)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (a value that occurred, never an interpolation)."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def reliability_view(subject: str, counters: Mapping, samples: Sequence, now_ms: int) -> Reliability:
    """One ``Reliability`` from a counters hash and its window of times to ready, at ``now_ms``
    (leases still running count their hours so far)."""
    c = {_text(k): int(float(_text(v))) for k, v in counters.items()}
    d, f, lost = c.get(DELIVERIES, 0), c.get(FAILURES, 0), c.get(LOSSES, 0)
    lease_ms = c.get(CLOSED_MS, 0) + max(0, c.get(OPEN, 0) * now_ms - c.get(OPEN_START_MS, 0))
    hours = lease_ms / 3_600_000
    ready = sorted(float(_text(s)) for s in samples)
    return Reliability(
        subject=subject, deliveries=d, failures=f, losses=lost, lease_hours=round(hours, 6),
        losses_per_1000h=round(lost * 1000 / hours, 6) if hours > 0 else None,
        ready_p50_s=percentile(ready, 0.50), ready_p95_s=percentile(ready, 0.95),
        score=round(score(d, f, lost), 6))


async def read_reliability(redis: Redis, keys: Keys, kind: str, subjects: Sequence[str],
                           now_ms: int) -> list[Reliability]:
    """The record of each of ``subjects`` (pools or providers), in one round trip; one
    without a record gets the prior."""
    if not subjects:
        return []
    pipe = redis.pipeline(transaction=False)
    for subject in subjects:
        pipe.hgetall(keys.reliability(kind, subject))
        pipe.lrange(keys.reliability_samples(kind, subject), 0, READY_WINDOW - 1)
    out = await pipe.execute()
    return [reliability_view(s, out[2 * i], out[2 * i + 1], now_ms) for i, s in enumerate(subjects)]


async def read_scores(redis: Redis, keys: Keys) -> dict[str, float]:
    """Every pool with a record -> its score."""
    return {_text(k): float(_text(v)) for k, v in (await redis.hgetall(keys.reliability_scores())).items()}
