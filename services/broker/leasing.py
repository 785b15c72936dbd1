"""A tenant's own lease transitions: renew (ready → ready, a new expiry) and release
(→ released)."""

from __future__ import annotations

from datetime import timedelta

import msgspec

from services.common.auth import Principal
from services.common.errors import Conflict, Forbidden, NotFound
from services.common.messages import LeaseInfo, LeaseReleased, LeaseRenewed

from .core import Core
from .outbox import Notice
from .views import Views


class Leasing:
    def __init__(self, core: Core, views: Views) -> None:
        self.core, self.views = core, views

    async def renew(self, principal: Principal, lease_id: str) -> LeaseInfo:
        if principal.role == "ops":
            raise Forbidden("ops reads leases; only their tenant renews them")
        lease = await self.views.own_lease(principal, lease_id)
        if lease.ttl_s <= 0:
            raise Conflict("this lease has a fixed end (duration or reserved term); it cannot be renewed")
        now = self.core.clock()
        renewed = msgspec.structs.replace(lease, expires_at=now + timedelta(seconds=lease.ttl_s))
        seq = await self.core.leases.renew(renewed, now.timestamp(), at=now)
        if seq is None:
            raise NotFound(f"no active lease {lease_id} (it expired)")
        await self.core.publish_owed(LeaseRenewed(id=f"{lease_id}.{seq}", at=now, lease=renewed, seq=seq))
        return renewed

    async def release(self, principal: Principal, lease_id: str) -> LeaseInfo:
        if principal.role == "ops":
            raise Forbidden("ops reads leases; only their tenant releases them")
        lease = await self.views.own_lease(principal, lease_id)
        now = self.core.clock()
        notice = Notice(LeaseReleased, now)
        ended = await self.core.leases.end(lease, "release", now.timestamp(), notice)
        if ended is None:
            raise NotFound(f"no active lease {lease_id}")
        await self.core.announce(notice, ended)
        return ended.lease
