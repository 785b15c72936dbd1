"""Tenants whose budget ran out (the meter says so): nothing new is placed for them,
and after a grace their pay-as-you-go leases are revoked."""

from __future__ import annotations

import logging

from services.common.errors import Unprocessable
from services.common.messages import BillingEvent, BudgetExhausted, BudgetRestored, LeaseRevoked

from .core import Core
from .outbox import Notice

log = logging.getLogger("broker")


class Budgets:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.blocked: dict[str, float] = {}  # tenant -> when its budget ran out (mirrors Redis)
        self.grace_s = 300.0

    async def load(self) -> None:
        raw = await self.core.redis.hgetall(self.core.keys.budget_blocked())
        self.blocked = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}

    async def on_billing(self, event: BillingEvent) -> None:
        """The meter said a tenant's budget ran out (or was topped up)."""
        core = self.core
        if isinstance(event, BudgetExhausted):
            when = event.at.timestamp()
            if await core.redis.hsetnx(core.keys.budget_blocked(), event.tenant, when):
                log.warning("budget of %s exhausted: no new placements; leases revoked in %.0fs", event.tenant,
                            self.grace_s)
            self.blocked.setdefault(event.tenant, when)
        elif isinstance(event, BudgetRestored):
            await core.redis.hdel(core.keys.budget_blocked(), event.tenant)
            self.blocked.pop(event.tenant, None)
            core.queue_kick.set()

    def check(self, tenant: str) -> None:
        if tenant in self.blocked:
            raise Unprocessable(f"tenant {tenant} is out of budget; top it up to place again",
                                reasons=["budget exhausted"])

    async def revoke_over_budget(self) -> int:
        """After the grace, end the pay-as-you-go leases of tenants out of budget
        (reserved terms are paid in advance and keep running)."""
        core = self.core
        now = core.clock()
        n = 0
        for tenant, since in list(self.blocked.items()):
            if now.timestamp() < since + self.grace_s:
                continue
            for lease in await core.leases.of_tenant(tenant):
                if lease.billing not in ("on_demand", "interruptible"):
                    continue
                notice = Notice(LeaseRevoked, now, {"reason": "budget exhausted"})
                ended = await core.leases.end(lease, "revoke", now.timestamp(), notice)
                if ended is not None:
                    await core.announce(notice, ended)
                    n += 1
        return n
