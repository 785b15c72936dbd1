"""Placing a replacement: the part of a request that a failed or lost lease held,
placed again away from every pool that failed the request, its leases carrying the
ended one's place (``domain.failover``). Shared by the failover (at once) and the
queue pass (a replacement that waited for capacity)."""

from __future__ import annotations

from datetime import datetime

from services.common.messages import LeaseInfo, LeaseReplaced

from .core import Core
from .domain.failover import carry, replacement_body
from .domain.requests import ComputeRequest
from .matching.model import Ask, Placement as Option
from .placement import Placement, Settle
from .records import Replacement, RequestRecord


def by_of(leases: list[LeaseInfo]) -> list[list[str]]:
    """The replacing leases as an outcome records them: ``[lease id, pool id]`` each."""
    return [[lease.lease_id, lease.pool_id] for lease in leases]


class Replacer:
    def __init__(self, core: Core, placement: Placement) -> None:
        self.core, self.placement = core, placement

    @staticmethod
    def body_of(record: RequestRecord) -> ComputeRequest:
        r = record.replacing
        return record.body if r is None else replacement_body(record.body, r.lease, r.whole)

    def ask_of(self, record: RequestRecord) -> Ask:
        """What the engine is asked for this record: a waiting replacement's part, away
        from the pools that failed the request; else the request itself."""
        if record.replacing is None:
            return self.core.ask_for(record.body)
        return self.core.ask_for(self.body_of(record), frozenset(record.excluded_pools))

    async def place(self, record: RequestRecord, replacement: Replacement, now: datetime, settle: Settle,
                    prefer: Option | None = None) -> list[LeaseInfo]:
        """Raises ``NotPlaced`` (nothing fits now), ``Refused`` (``settle`` refused: the
        claim was taken over; the grant was given back) or ``Unavailable``."""
        body = replacement_body(record.body, replacement.lease, replacement.whole)
        ask = self.core.ask_for(body, frozenset(record.excluded_pools))
        leases, _ = await self.placement.try_place(record.request_id, record.tenant, body, now, prefer=prefer,
                                                   ask=ask, settle=settle,
                                                   adjust=lambda lease: carry(lease, replacement.lease))
        return leases

    async def announce(self, old: LeaseInfo, seq: int, by: list[list[str]], at: datetime) -> None:
        """``lease.replaced`` for the ended lease, one per replacing lease, at seqs after
        its ending: the same ids when announced again (a redelivery), so JetStream keeps one."""
        for k, (lease_id, pool_id) in enumerate(by, 1):
            await self.core.publish_alloc(LeaseReplaced(id=f"{old.lease_id}.{seq + k}", at=at, lease=old,
                                                        seq=seq + k, by_lease=lease_id, by_pool=pool_id))
