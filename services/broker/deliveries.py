"""The provider's side of a lease that must be delivered (docs/lifecycle.md, "Lease"):
its assignments, and its answers — ready (with access details), failed, health.

Every transition is one script (``lua/lease_ready.lua``, ``lua/end_lease.lua`` with the
state it must be in); Python only checks who asks. A provider sees and answers only the
leases on its own pools (another provider's lease is a 404, as if it did not exist);
admin answers for any. A lease-scoped lock keeps two answers for one lease from
interleaving their access-details writes; it decides nothing (the scripts do)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from services.common.auth import Principal
from services.common.delivery import CompleteBody, FailedBody, HealthBody, ReadyBody
from services.common.errors import Conflict, Forbidden, NotFound, Unavailable, Unprocessable
from services.common.messages import LeaseFailed, LeaseInfo, LeaseLost, LeaseReady, LeaseReleased

from .access import AccessStore, encoded
from .core import Core
from .domain.printable import check_printable
from .leases import Ended, LiveLease
from .locks import OwnedLock
from .outbox import Notice
from .records import Assignment, LeaseView, lease_view

ANSWER_LOCK_MS = 10_000  # one answer for a lease at a time; a crashed answerer's lock lapses


def timeout_reason(lease: LeaseInfo) -> str:
    return f"not ready within {lease.provision_timeout_s} s"


def _refused(lease_id: str, state: str, wanted: str) -> Exception:
    if state == "gone":
        return NotFound(f"no active lease {lease_id}")
    if state == "pending":
        return Conflict(f"lease {lease_id} is still being granted; retry in a moment")
    return Conflict(f"lease {lease_id} is {state}, not {wanted}")


async def time_out(core: Core, lease: LeaseInfo, now: datetime) -> Ended | None:
    """provisioning → failed at the deadline (the sweep, or a ready that came late); the
    script re-checks the state and the deadline, so every replica may try."""
    notice = Notice(LeaseFailed, now, {"reason": timeout_reason(lease)})
    ended = await core.leases.end_from(lease, "timeout", now.timestamp(), notice=notice)
    if isinstance(ended, Ended):
        await core.announce(notice, ended)
        return ended
    return None


class Deliveries:
    def __init__(self, core: Core) -> None:
        self.core = core

    @property
    def access(self) -> AccessStore | None:
        return self.core.access

    # --- who may answer ------------------------------------------------------------------
    async def provider_lease(self, principal: Principal, lease_id: str) -> LiveLease:
        if principal.role not in ("provider", "admin"):
            raise Forbidden(f"role {principal.role} may not answer for a lease (provider of its pool, or admin)")
        live = await self.core.leases.live(lease_id) if len(lease_id) <= 64 else None
        if live is None or not principal.may_act_for("provider", live.info.provider):
            raise NotFound(f"no active lease {lease_id}")  # another provider's lease: nothing leaks
        return live

    @contextlib.asynccontextmanager
    async def _answering(self, lease_id: str) -> AsyncIterator[None]:
        """One answer for a lease at a time (409 to a second one meanwhile)."""
        lock = OwnedLock(self.core.redis, self.core.keys.lock(f"answer:{lease_id}"), ANSWER_LOCK_MS)
        token = await lock.acquire()
        if token is None:
            raise Conflict(f"another answer for lease {lease_id} is being handled; look at the lease again")
        try:
            yield
        finally:
            await lock.release(token)

    async def _late(self, lease: LeaseInfo, now: datetime) -> Conflict:
        """A ready after the deadline: the lease fails now (if no sweep failed it yet)."""
        await self.time_out(lease, now)
        return Conflict(f"lease {lease.lease_id} was {timeout_reason(lease)}: it failed")

    # --- provisioning → ready ------------------------------------------------------------
    async def ready(self, principal: Principal, lease_id: str, body: ReadyBody) -> LeaseView:
        raw = encoded(body.access)  # too large: a 400 before anything is read or written
        live = await self.provider_lease(principal, lease_id)
        lease = live.info
        if not lease.delivery:
            raise Conflict(f"lease {lease_id} delivers nothing (capacity only): it was ready at its grant")
        async with self._answering(lease_id):
            [live] = await self.core.leases.lives([lease]) or [None]  # again, under the lock: the state now
            if live is None:
                raise NotFound(f"no active lease {lease_id}")
            now = self.core.clock()
            if live.state == "provisioning" and live.deadline is not None and live.deadline <= now.timestamp():
                raise await self._late(lease, now)
            if live.state != "provisioning":
                raise _refused(lease_id, live.state, "provisioning")
            if self.access is None:
                raise Unavailable("access details cannot be stored right now; retry")
            await self.access.put(lease_id, raw)  # durable before the transition is answered
            done = await self.core.leases.lease_ready(lease, now.timestamp(), at=now)
            if isinstance(done, str):
                await self.access.delete(lease_id)  # ours, and the lease is not ready: nothing stays
                if done == "deadline":
                    raise await self._late(lease, now)
                if done == "generation":
                    raise Conflict(f"lease {lease_id}'s pool was removed or registered again since its grant")
                raise _refused(lease_id, done, "provisioning")
            seq, info = done
            await self.core.publish_owed(LeaseReady(id=f"{lease_id}.{seq}", at=now, lease=info, seq=seq))
        return lease_view(info, LiveLease(info, "ready", ready_at=now.timestamp()), body.access)

    # --- provisioning → failed -----------------------------------------------------------
    async def failed(self, principal: Principal, lease_id: str, body: FailedBody) -> dict[str, object]:
        check_printable(body, "body")
        live = await self.provider_lease(principal, lease_id)
        async with self._answering(lease_id):
            now = self.core.clock()
            notice = Notice(LeaseFailed, now, {"reason": body.reason})
            ended = await self.core.leases.end_from(live.info, "fail", now.timestamp(), "provisioning", notice)
            if isinstance(ended, str):
                raise _refused(lease_id, ended, "provisioning")
            await self.core.announce(notice, ended)
        return {"lease_id": lease_id, "state": "failed", "reason": body.reason}

    async def time_out(self, lease: LeaseInfo, now: datetime) -> Ended | None:
        return await time_out(self.core, lease, now)

    # --- ready → lost (unhealthy) -------------------------------------------------------
    async def health(self, principal: Principal, lease_id: str, body: HealthBody) -> dict[str, object]:
        check_printable(body, "body")
        live = await self.provider_lease(principal, lease_id)
        if body.healthy:
            if live.state not in ("ready", "provisioning"):
                raise _refused(lease_id, live.state, "ready")
            return {"lease_id": lease_id, "state": live.state}
        now = self.core.clock()
        reason = body.detail or "unhealthy"
        notice = Notice(LeaseLost, now, {"reason": reason})
        ended = await self.core.leases.end_from(live.info, "lost", now.timestamp(), "ready", notice)
        if isinstance(ended, str):
            if ended == "provisioning":
                raise Conflict(f"lease {lease_id} is provisioning, not ready: answer failed instead")
            raise _refused(lease_id, ended, "ready")
        await self.core.announce(notice, ended)
        return {"lease_id": lease_id, "state": "lost", "reason": reason}

    # --- ready → released (the delivered workload ended by itself) ----------------------
    async def complete(self, principal: Principal, lease_id: str, body: CompleteBody) -> dict[str, object]:
        """A process that exited or a job that finished: the lease is over and its units go
        back (billing stops at this event). Only a ready lease completes; a provisioning
        one that cannot run is answered ``failed``, a killed one ``health`` unhealthy."""
        live = await self.provider_lease(principal, lease_id)
        if not live.info.delivery:
            raise Conflict(f"lease {lease_id} delivers nothing (capacity only): its tenant releases it")
        now = self.core.clock()
        notice = Notice(LeaseReleased, now, {"by": "provider", "exit_code": body.exit_code})
        ended = await self.core.leases.end_from(live.info, "release", now.timestamp(), "ready", notice)
        if isinstance(ended, str):
            if ended == "provisioning":
                raise Conflict(f"lease {lease_id} is provisioning, not ready: answer failed instead")
            raise _refused(lease_id, ended, "ready")
        await self.core.announce(notice, ended)
        return {"lease_id": lease_id, "state": "released", "exit_code": body.exit_code}

    # --- what a provider is asked to deliver ----------------------------------------------
    async def assignments(self, principal: Principal, state: str | None, provider: str | None,
                          limit: int = 1000) -> list[Assignment]:
        if principal.role == "provider":
            if provider not in (None, principal.subject):
                raise NotFound(f"no provider {provider}")
            provider = principal.subject
        elif principal.role != "admin":
            raise Forbidden(f"role {principal.role} has no assignments (providers see the leases on their pools)")
        elif provider is None:
            raise Unprocessable("admin lists assignments per provider: give ?provider=")
        pools = [(p.region, p.pool_id) for p in self.core.world.pools.values() if p.provider == provider]
        lives = await self.core.leases.on_pools(pools, limit)
        out: list[Assignment] = []
        workloads: dict[str, object] = {}
        for live in sorted(lives, key=lambda x: (x.info.granted_at, x.info.lease_id)):
            shown = "provisioning" if live.state == "pending" else live.state
            if live.state == "pending" or (state is not None and shown != state):
                continue  # a grant not confirmed yet is nobody's assignment
            lease = live.info
            if lease.request_id not in workloads:
                record = await self.core.record(lease.request_id)
                workloads[lease.request_id] = record.body.workload if record is not None else \
                    await self.access.workload(lease.request_id) if self.access is not None else None
            out.append(Assignment(
                lease_id=lease.lease_id, request_id=lease.request_id, tenant=lease.tenant, pool_id=lease.pool_id,
                provider=lease.provider, region=lease.region, model=lease.model, units=lease.units, state=shown,
                delivery=lease.delivery, workload=workloads[lease.request_id],  # type: ignore[arg-type]
                granted_at=lease.granted_at, expires_at=lease.expires_at,
                provision_deadline=_at(live.deadline) if shown == "provisioning" else None,
                ready_at=_at(live.ready_at), attempt=lease.attempt, replaces=lease.replaces or None,
                milli=lease.milli, devices=lease.devices))
        return out


def _at(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)

