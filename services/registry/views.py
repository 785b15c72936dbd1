"""Response bodies of the registry's HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from services.common.delivery import Reliability
from services.common.messages import Accelerator, Pool, PoolSpec, PoolStatus

_pool_decoder = msgspec.json.Decoder(Pool)


class PoolView(msgspec.Struct, frozen=True, kw_only=True):
    pool_id: str
    provider: str
    region: str
    zone: str
    model: str
    vendor: str
    stack: str
    status: PoolStatus
    capacity: int
    healthy: int | None  # units the last heartbeat reported healthy, if it said
    leased: int
    free: int
    overcommit: int  # units leased beyond effective capacity (after a shrink)
    last_heartbeat: datetime
    generation: int  # one registration of this pool id: a new one after removal and re-registration
    spec: PoolSpec
    accelerator: Accelerator
    revision: int = 0  # the durable record's revision this state follows (moves on every change)
    # its delivery record (docs/reliability.md), written by the broker; shown by GET, searches
    reliability: Reliability | None = None


class PoolPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[PoolView]
    total: int
    next_cursor: str | None = None


def pool_view(row: dict[str, str]) -> PoolView:
    pool = _pool_decoder.decode(row["record"])
    healthy = int(row["healthy"])
    return PoolView(
        pool_id=pool.pool_id, provider=pool.provider, region=pool.spec.region, zone=pool.spec.zone,
        model=pool.spec.model, vendor=pool.accelerator.vendor, stack=pool.accelerator.stack,
        status=row["status"],  # type: ignore[arg-type]
        capacity=int(row["capacity"]), healthy=None if healthy < 0 else healthy, leased=int(row["leased"]),
        free=int(row["free"]), overcommit=int(row["overcommit"]),
        last_heartbeat=datetime.fromtimestamp(float(row["last_hb"]), UTC), generation=int(row["generation"] or 0),
        spec=pool.spec, accelerator=pool.accelerator, revision=int(row["rev"] or 0),
    )
