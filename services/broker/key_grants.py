"""What an idempotency key's recovery does with the leases its abandoned owner named:
read whether they are live and confirmed, end them (rollback), or answer them (resume).
Over the broker's own lease scripts and events; the key's state machine is in
``idempotency.py``."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec

from services.common.messages import LeaseInfo, LeaseLost

from .idempotency import Named
from .outbox import Notice
from .records import RequestRecord

if TYPE_CHECKING:
    from .domain.requests import ComputeRequest
    from .service import Broker

_info = msgspec.json.Decoder(LeaseInfo)
ROLLED_BACK = "grant rolled back: its idempotent request was never answered"


class LeaseGrants:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def _read(self, named: Named) -> list[tuple[LeaseInfo | None, bool]]:
        """Per named lease: its record in Redis (None if gone) and whether it is still
        pending (reserved, its grant not confirmed)."""
        keys = self.broker.keys
        pipe = self.broker.redis.pipeline(transaction=False)
        for region, lease_id in named:
            pipe.hmget(keys.lease(region, lease_id), "info", "pending")
        return [(_info.decode(info) if info else None, bool(pending)) for info, pending in await pipe.execute()]

    async def live(self, named: Named) -> list[LeaseInfo] | None:
        read = await self._read(named)
        if not read or any(lease is None or pending for lease, pending in read):
            return None
        return [lease for lease, _ in read if lease is not None]

    async def roll_back(self, named: Named) -> None:
        """End each named lease still in Redis, in the durable record at its grant time
        (``lease.lost``: the meter bills nothing), as the sweep does for a grant its
        broker never confirmed."""
        now = time.time()
        for lease, _ in await self._read(named):
            if lease is None:
                continue
            notice = Notice(LeaseLost, lease.granted_at, {"reason": ROLLED_BACK})
            ended = await self.broker.leases.end(lease, "lost", now, notice)
            if ended is not None:
                await self.broker.announce_end(notice.kind, ended, notice.at, **notice.extra)


    async def queued(self, request_id: str) -> tuple[int, bytes] | None:
        """A request that went to the queue names no leases: its record says so (queued,
        or placed since by a queue pass, or cancelled). Its answer was a 202."""
        record = await self.broker.record(request_id)
        if record is None or not (record.state in ("queued", "cancelled") or
                                  (record.state == "placed" and record.lease_ids)):
            return None
        return 202, msgspec.json.encode(await self.broker.view(record))


    async def withdraw(self, request_id: str) -> None:
        record = await self.broker.record(request_id)
        if record is not None and record.state == "queued":
            self.broker.queue.take_back_later(record, datetime.now(UTC))


async def adopt(broker: Broker, tenant: str, body: ComputeRequest, request_id: str,
                leases: list[LeaseInfo]) -> tuple[int, bytes]:
    """The 201 of a placement whose broker granted ``leases`` and died (or missed its
    deadline) before answering: its request record is written again, as placed."""
    now = datetime.now(UTC)
    record = RequestRecord(request_id=request_id, tenant=tenant, state="placed",
                           created_at=min(lease.granted_at for lease in leases), updated_at=now, body=body,
                           lease_ids=[lease.lease_id for lease in leases])
    await broker.save(record)
    return 201, msgspec.json.encode(await broker.view(record, leases=leases))
