"""What a caller may read: its requests (with queue position and estimated wait) and
its leases. Wrong role is a 403 before any lookup; another tenant's id is a 404."""

from __future__ import annotations

import time

from services.common.auth import Principal
from services.common.delivery import REDACTED, Access
from services.common.errors import Forbidden, NotFound, Unprocessable
from services.common.messages import LeaseInfo

from .core import Core
from .matching.model import Placement as Option
from .leases import LiveLease
from .records import LeaseView, RequestRecord, RequestView, lease_view


def may_see(principal: Principal) -> None:
    if principal.role not in ("admin", "ops", "tenant"):
        raise Forbidden(f"role {principal.role} has no requests or leases")


class Views:
    def __init__(self, core: Core) -> None:
        self.core = core

    async def own_record(self, principal: Principal, request_id: str) -> RequestRecord:
        may_see(principal)
        record = await self.core.record(request_id) if len(request_id) <= 64 else None
        if record is None or not (principal.role in ("admin", "ops") or
                                  (principal.role == "tenant" and principal.subject == record.tenant)):
            raise NotFound(f"no request {request_id}")  # never tell a tenant what another one has
        return record

    async def get_request(self, principal: Principal, request_id: str) -> RequestView:
        return await self.view(await self.own_record(principal, request_id), principal=principal)

    async def lease_views(self, principal: Principal | None, leases: list[LeaseInfo]) -> list[LeaseView]:
        """Views of leases the caller may see (checked before), with their delivery state
        read live in one round trip, and access details as ``access_for`` says."""
        lives = {live.info.lease_id: live for live in await self.core.leases.lives(leases)} if leases else {}
        out = []
        for lease in leases:
            live = lives.get(lease.lease_id)
            out.append(lease_view(live.info if live else lease, live, await self.access_for(principal, live)))
        return out

    async def access_for(self, principal: Principal | None, live: LiveLease | None) -> Access | None:
        """Access details go to the lease's tenant and admin; ops sees that there are some
        (``REDACTED``), nobody else anything. Only a delivered (ready) lease has them."""
        if principal is None or live is None or live.state != "ready" or not live.info.delivery:
            return None
        if principal.role == "ops":
            return REDACTED
        mine = principal.role == "tenant" and principal.subject == live.info.tenant
        if not (mine or principal.role == "admin") or self.core.access is None:
            return None
        return await self.core.access.get(live.info.lease_id)

    async def view(self, record: RequestRecord, leases: list[LeaseInfo] | None = None,
                   placement: Option | None = None, principal: Principal | None = None) -> RequestView:
        """``leases``: fresh grants (shown as granted); otherwise the request's leases are
        read live, with their delivery state (and access details, as ``principal`` may see them)."""
        core = self.core
        if leases is None:
            leases = [lease for lease in [await core.leases.get(i) for i in record.lease_ids] if lease]
            views = await self.lease_views(principal, leases)
        else:
            views = [lease_view(lease) for lease in leases]
        position = wait = None
        if record.state == "queued":
            rank = await core.redis.zrank(core.keys.queue(), record.request_id)
            position = None if rank is None else rank + 1
            wait = await self._estimated_wait(record)
        return RequestView(request_id=record.request_id, tenant=record.tenant, state=record.state,
                           created_at=record.created_at, reasons=record.reasons,
                           leases=views, queue_position=position,
                           estimated_wait_s=wait, deadline_at=record.deadline_at, placement=placement,
                           attempts=record.attempts)

    async def _estimated_wait(self, record: RequestRecord) -> float | None:
        """A lower bound: when enough matching units held by fixed-end leases (duration
        or term) come back. None when only open leases (ended by their clients) hold
        the capacity, as then nobody can know."""
        core = self.core
        ask = core.ask_for(record.body)
        need = ask.units or 1
        regions = ask.regions or set(core.world.countries)
        ends: list[tuple[float, int]] = []
        for region in regions:
            raw = await core.redis.zrange(core.keys.lease_expiry(region), 0, 49, withscores=True)
            for lease_id, score in raw:
                lease_id = lease_id.decode() if isinstance(lease_id, bytes) else lease_id
                lease = await core.leases.get(lease_id)
                if lease is None or lease.ttl_s > 0:
                    continue
                accelerator = core.world.catalogue.get(lease.model)
                if ask.models and lease.model not in ask.models:
                    continue
                if accelerator is not None and accelerator.memory_gib < ask.min_memory_gib:
                    continue
                ends.append((score, lease.units))
        got = 0
        for end, units in sorted(ends):
            got += units
            if got >= need:
                return round(max(0.0, end - time.time()), 1)
        return None

    async def own_lease(self, principal: Principal, lease_id: str) -> LeaseInfo:
        may_see(principal)
        lease = await self.core.leases.get(lease_id) if len(lease_id) <= 64 else None
        if lease is None or not (principal.role in ("admin", "ops") or
                                 (principal.role == "tenant" and principal.subject == lease.tenant)):
            raise NotFound(f"no active lease {lease_id}")
        return lease

    async def list_leases(self, principal: Principal, tenant: str | None) -> list[LeaseInfo]:
        store = self.core.leases
        if principal.role == "tenant":
            if tenant not in (None, principal.subject):
                raise NotFound(f"no tenant {tenant}")  # as for any id of another tenant: nothing leaks
            return await store.of_tenant(principal.subject)
        if principal.role not in ("admin", "ops"):
            raise Forbidden(f"role {principal.role} may not list leases")
        if tenant is None:
            raise Unprocessable("admin and ops list leases per tenant: give ?tenant=")
        return await store.of_tenant(tenant)
