"""Making room for a request by preempting interruptible leases, when the policy
allows: an on-demand or reserved request may preempt any interruptible lease; an
interruptible one only those of lower priority. Victims: lowest priority first, then
the newest (they have run the least)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

import msgspec

from services.common.messages import LeaseInfo, LeasePreempted

from .core import Core
from .domain.requests import ComputeRequest
from .matching.engine import Engine
from .matching.model import Placement as Option
from .placement import Placement


class Preemption:
    def __init__(self, core: Core, placement: Placement) -> None:
        self.core, self.placement = core, placement

    async def try_preempt(self, request_id: str, tenant: str, body: ComputeRequest,
                          now: datetime) -> tuple[list[LeaseInfo], Option] | None:
        core = self.core

        def eligible(victim: LeaseInfo) -> bool:
            return body.billing != "interruptible" or victim.priority < body.priority

        victims: dict[str, list[LeaseInfo]] = defaultdict(list)
        ask = core.ask_for(body)
        for region in ask.regions or list(core.world.countries):
            for lease in await core.leases.interruptible(region):
                if eligible(lease):
                    victims[lease.pool_id].append(lease)
        if not victims:
            return None
        trial = Engine(core.world.topology)
        for pool_id, held in victims.items():
            state = core.world.engine.get(pool_id)
            if state is not None:
                trial.upsert(msgspec.structs.replace(state, free=state.free + sum(v.units for v in held)))
        decision = trial.match(ask, limit=1)
        if not decision.placed:
            return None
        option = decision.options[0]
        for a in option.allocations:
            state = core.world.engine.get(a.pool_id)
            missing = a.units - (state.free if state else 0)
            for victim in sorted(victims[a.pool_id], key=lambda v: (v.priority, -v.granted_at.timestamp())):
                if missing <= 0:
                    break
                ended = await core.leases.end(victim, "preempt", now.timestamp())
                if ended is not None:
                    await core.announce_end(LeasePreempted, ended, now, by_request=request_id)
                    missing -= victim.units
        if not core.world.hold((a.pool_id, a.units) for a in option.allocations):
            return None
        leases = self.placement.leases_for(option, request_id, tenant, body, now)
        return (leases, option) if await self.placement.reserve(leases) else None
