"""Making room for a request by preempting interruptible leases, when the policy
allows: an on-demand or reserved request may preempt any interruptible lease; an
interruptible one only those of lower priority. Victims: lowest priority first, then
the newest (they have run the least).

The victims end and the new leases take their units in one script (``lua/preempt.lua``,
one region): if the room is not there after all (a concurrent request took units, or
another preemptor took a victim), nothing ends and the victims are picked again."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import msgspec
from redis.asyncio import Redis

from services.common.errors import Unavailable
from services.common.keys import Keys
from services.common.messages import LeaseInfo, LeaseLost, LeasePreempted
from services.common.redis_conn import read_lua

from .core import Core
from .domain.requests import ComputeRequest
from .leases import Devices, Ended, with_devices
from .matching.engine import Engine
from .matching.model import Placement as Option
from .outbox import Notice, iso
from .placement import Placement

ATTEMPTS = 3  # picks of victims; each refusal means another preemptor or request moved first
_info = msgspec.json.Decoder(LeaseInfo)


@dataclass(frozen=True, slots=True)
class Preempted:
    free_after: list[int]  # per new lease, its pool's free units after
    victims: list[Ended]
    devices: list[Devices | None]  # per new lease on a sharing pool: its devices, their free milli after


@dataclass(frozen=True, slots=True)
class VictimNotices:
    """The events the victims of one preemption owe: ``ended`` (lease.preempted) for a
    confirmed victim, ``never_confirmed`` (its kind and fields; at its grant time) for a
    victim whose grant was still in progress (``_made_room`` says why)."""

    ended: Notice
    never_confirmed: Notice


class PreemptScript:
    """``lua/preempt.lua``: end ``victims`` and reserve ``leases`` (one region) together, or neither."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.keys = keys
        self._script = redis.register_script(read_lua("services.broker.lua", "preempt.lua"))

    async def preempt(self, region: str, victims: Sequence[LeaseInfo], leases: Sequence[LeaseInfo],
                      expires_at: float, owed: VictimNotices | None = None) -> Preempted | None:
        """None when refused (a victim gone, the room taken); ``Unavailable`` while the
        region's leases are being restored after a Redis loss. ``owed``: the victims'
        events, written to the outbox in the same step (a broker that dies before it
        announces them leaves them to the outbox sweep)."""
        k = self.keys
        keys = [k.lease_expiry(region), k.leases_ready(region), k.interruptible_leases(region)]
        args: list[object] = [len(victims), len(leases), expires_at]
        for victim in victims:
            keys += [k.pool(region, victim.pool_id), k.pool_leases(region, victim.pool_id),
                     k.lease(region, victim.lease_id)]
            args.append(victim.lease_id)
        for lease in leases:
            keys += [k.pool(region, lease.pool_id), k.pool_leases(region, lease.pool_id),
                     k.lease(region, lease.lease_id)]
            args += [lease.lease_id, lease.units, msgspec.json.encode(msgspec.structs.replace(lease, devices=())),
                     int(lease.billing == "interruptible"), lease.pool_generation, lease.milli,
                     ",".join(map(str, lease.devices))]  # its devices: the engine's hint
        keys.append(k.lease_provisioning(region))  # a victim still provisioning leaves the timeout sweep's index
        if owed is not None:
            keys.append(k.lease_outbox(region))
            args += [*owed.ended.args(), *owed.never_confirmed.args()[::2], time.time()]
            args += [iso(victim.granted_at) for victim in victims]  # a pending victim ends at its grant
        raw = await self._script(keys=keys, args=args)
        if int(raw[0]) == -1:
            raise Unavailable(f"leases in region {region} are being restored after a Redis loss; retry shortly")
        if int(raw[0]) != 1:
            return None
        placed = [x if isinstance(x, list) else [x] for x in raw[1]]
        return Preempted([int(x[0]) for x in placed],
                         [Ended(_info.decode(v[0]), int(v[1]), int(v[2]), int(v[3]) == 1,
                                tuple(map(int, v[4])) if len(v) > 4 else ()) for v in raw[2]],
                         [(tuple(map(int, x[1])), tuple(map(int, x[2]))) if len(x) > 1 else None for x in placed])


class Preemption:
    def __init__(self, core: Core, placement: Placement) -> None:
        self.core, self.placement = core, placement
        self.script = PreemptScript(core.redis, core.keys)

    async def try_preempt(self, request_id: str, tenant: str, body: ComputeRequest,
                          now: datetime) -> tuple[list[LeaseInfo], Option] | None:
        for _ in range(ATTEMPTS):
            picked = await self._pick(body)
            if picked is None:
                return None
            option, victims = picked
            regions = {a.region for a in option.allocations}
            if len(regions) != 1:
                return None  # one region is one atomic step; across regions it could not be
            leases = self.placement.leases_for(option, request_id, tenant, body, now)
            expires = min(leases[0].expires_at.timestamp(), time.time() + self.core.pending_s)
            # a grant still in progress: its placement finds its lease gone at confirmation
            # and answers 503, so it ends at its grant time, billed nothing (as its own
            # retraction would say; both carry the id of seq 2)
            owed = VictimNotices(Notice(LeasePreempted, now, {"by_request": request_id}),
                                 Notice(LeaseLost, now, {"reason": "grant not completed"}))
            done = await self.script.preempt(regions.pop(), victims, leases, expires, owed)
            if done is None:
                continue  # another preemptor or request moved first: look again
            leases = [with_devices(lease, on) for lease, on in zip(leases, done.devices, strict=True)]
            await self._made_room(leases, done, owed)
            return leases, option
        return None

    async def _pick(self, body: ComputeRequest) -> tuple[Option, list[LeaseInfo]] | None:
        """The best placement if the eligible victims were gone, and the victims it needs."""
        core = self.core

        def eligible(victim: LeaseInfo) -> bool:
            # a lease of a pool generation since removed frees nothing on the pool there now
            current = core.world.generations.get(victim.pool_id, 0)
            same = not victim.pool_generation or not current or victim.pool_generation == current
            return same and (body.billing != "interruptible" or victim.priority < body.priority)

        by_pool: dict[str, list[LeaseInfo]] = defaultdict(list)
        ask = core.ask_for(body)
        for region in ask.regions or list(core.world.countries):
            for lease in await core.leases.interruptible(region):
                if eligible(lease):
                    by_pool[lease.pool_id].append(lease)
        if not by_pool:
            return None
        trial = Engine(core.world.topology)
        for pool_id, held in by_pool.items():
            state = core.world.engine.get(pool_id)
            if state is not None:
                trial.upsert(msgspec.structs.replace(state, free=state.free + sum(v.units for v in held)))
        trial.set_reliability(core.world.engine.reliability.scores)  # min_reliability and ranking as in the world
        decision = trial.match(ask, limit=1)
        if not decision.placed:
            return None
        option = decision.options[0]
        victims: list[LeaseInfo] = []
        for a in option.allocations:
            state = core.world.engine.get(a.pool_id)
            missing = a.units - (state.free if state else 0)
            for victim in sorted(by_pool[a.pool_id], key=lambda v: (v.priority, -v.granted_at.timestamp())):
                if missing <= 0:
                    break
                if victim not in victims:
                    victims.append(victim)
                    missing -= victim.units
        return option, victims

    async def _made_room(self, leases: list[LeaseInfo], done: Preempted, owed: VictimNotices) -> None:
        """The victims ended and the leases are reserved: announce the ends (the events
        the script put in the outbox), then make the grants durable (given back if the
        event store refuses them)."""
        core = self.core
        truth = {lease.pool_id: free for lease, free in zip(leases, done.free_after, strict=True) if free >= 0}
        for ended in done.victims:
            if ended.pending:
                never = owed.never_confirmed
                await core.announce_end(never.kind, ended, ended.lease.granted_at, **never.extra)
            else:
                await core.announce(owed.ended, ended)
        try:
            await self.placement.make_durable(leases, leases, truth, None, devices_after={
                lease.lease_id: on[1] for lease, on in zip(leases, done.devices, strict=True) if on is not None})
        finally:
            for pool_id, free in truth.items():
                core.world.observe_free(pool_id, free)
