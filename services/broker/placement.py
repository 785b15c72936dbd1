"""Placing one request: the engine proposes (pure), the reservation script takes the
units atomically in Redis (the authority), the grant event is acknowledged by
JetStream (the durable record), and only then is the grant confirmed. If the event
cannot be made durable, the units are given back and the caller hears 503.

The reservations and the confirmations of concurrent placements share pipelined round
trips (``Coalescer``): per-call client overhead, not Redis, is what limits a broker
process."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta

import msgspec
from redis.asyncio.client import Pipeline

from services.common.coalesce import Coalescer
from services.common.errors import Unavailable
from services.common.ids import new_id
from services.common.delivery import DEFAULT_PROVISION_TIMEOUT_S
from services.common.messages import MILLI, LeaseGranted, LeaseInfo, LeaseLost, LeaseProvisioning

from .core import Core, per_item
from .idempotency import before_grant
from .domain.requests import TERM_MONTHS, ComputeRequest, term_seconds, workload_kind
from .leases import NOT_SHARING, Reservation, by_region, missing_leases, with_devices
from .matching.model import Ask, Decision, Placement as Option
from .records import RequestRecord
from .request_states import Refused

log = logging.getLogger("broker")
ATTEMPTS = 6  # matches per placement; each lost race gives the engine fresher numbers
Settle = Callable[[list[LeaseInfo]], Awaitable[None]]  # the request's own transition, between grant and confirm
DeviceTruth = dict[str, dict[int, int]]  # pool -> device -> free milli, as the scripts said


def held(leases: Iterable[LeaseInfo]) -> list[tuple]:
    """What the engine's view holds for ``leases`` while they are being reserved: (pool,
    units, milli, the engine's device hint). A share holds its milli on the hinted device;
    after the reservation the world takes what the script said about the devices."""
    return [(lease.pool_id, lease.units, lease.milli, lease.devices) for lease in leases]


def note_devices(into: DeviceTruth, lease: LeaseInfo, free_after: Iterable[int]) -> None:
    for device, free in zip(lease.devices, free_after, strict=False):
        if free >= 0:
            into.setdefault(lease.pool_id, {})[device] = free


class NotPlaced(Exception):
    def __init__(self, decision: Decision, contended: bool = False) -> None:
        super().__init__("not placed")
        self.decision, self.contended = decision, contended


class Placement:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._reservations: Coalescer[list[Reservation], list] = Coalescer(self._reserve_batch, drop_cancelled=True)
        self._commits: Coalescer[tuple[list[LeaseInfo], RequestRecord | None], list[str]] = \
            Coalescer(self._commit_batch)
        self._rollbacks: set[asyncio.Task] = set()  # late grants being undone (``_roll_back_late``)

    def leases_for(self, option: Option, request_id: str, tenant: str, body: ComputeRequest,
                   now: datetime) -> list[LeaseInfo]:
        term = term_seconds(body)
        ttl = 0 if term else body.lease_ttl_s
        expires = now + timedelta(seconds=term or ttl)
        kind = workload_kind(body)
        pools = self.core.world.pools
        # a share: milli of one device; the engine may hint the device(s) (docs/sharing.md),
        # else the reservation script picks them on a pool that shares its devices
        milli = body.share.milli if body.share is not None else MILLI
        out = []
        for a in option.allocations:
            timeout = 0
            if kind:  # the pool's own provision timeout (the engine chose it because it delivers the kind)
                pool = pools.get(a.pool_id)
                timeout = pool.provision_timeout_s if pool is not None else DEFAULT_PROVISION_TIMEOUT_S
            out.append(LeaseInfo(
                lease_id=new_id("lease"), request_id=request_id, tenant=tenant, pool_id=a.pool_id,
                provider=a.provider, region=a.region, model=a.model, units=a.units, billing=body.billing,
                unit_price=a.unit_price, price_basis=a.price_basis, currency=option.currency, granted_at=now,
                expires_at=expires, term_months=TERM_MONTHS.get(body.billing, 0), ttl_s=ttl,
                priority=body.priority, pool_generation=self.core.world.generations.get(a.pool_id, 0),
                delivery=kind, provision_timeout_s=timeout, milli=milli,
                devices=a.devices))
        return out

    async def reserve(self, leases: list[LeaseInfo], record: RequestRecord | None = None,
                      settle: Settle | None = None, not_sharing: set[str] | None = None) -> bool:
        """Take the units of every lease (grouped by region; each region atomically),
        make the grants durable, then confirm them (with the lookups and the request
        record). All or nothing. The caller holds the units in the engine; ``truth``
        collects what Redis said about each pool touched. ``settle``: see ``make_durable``.
        On a pool that shares its devices, the leases in ``leases`` are replaced by the
        ones naming the devices the script took. ``not_sharing`` collects the pools that
        refused a share because they do not share."""
        core = self.core
        truth: dict[str, int] = {}
        devices_after: dict[str, tuple[int, ...]] = {}  # lease id -> its devices' free milli after
        devices: DeviceTruth = {}
        allocations = held(leases)  # (with the engine's hints: before the script names the devices)
        # provisional until the grant is durable and confirmed (a broker dying in between leaks little)
        expires = min(leases[0].expires_at.timestamp(), time.time() + self.core.pending_s)
        try:
            await before_grant(leases)  # an idempotency key names them first (a recovery point)
            groups = [(region, group, expires) for region, group in by_region(leases).items()]
            done: list[LeaseInfo] = []
            failure: Exception | None = None
            refused = False
            try:
                results = await self._reservations.submit(groups)
            except Exception:
                # the whole batch failed (Redis unreachable, a cluster node down, the script
                # reload refused) after some of it may have run: give back whatever did
                truth.update(await self.undo(leases, devices))
                raise
            for (_, group, _), result in zip(groups, results, strict=True):
                if isinstance(result, Exception):
                    # this region's slot is unreachable or refused (on Redis Cluster regions
                    # live on different nodes): the regions reserved give back
                    failure = failure or result
                elif result[0]:
                    taken = result[2] if len(result) > 2 else [None] * len(group)
                    for lease, free, on in zip(group, result[1], taken, strict=True):
                        truth[lease.pool_id] = free
                        if on is not None:  # a sharing pool: (its devices, their free milli after)
                            leases[leases.index(lease)] = lease = with_devices(lease, on)
                            devices_after[lease.lease_id] = on[1]
                            note_devices(devices, lease, on[1])
                        done.append(lease)
                else:
                    refused = True
                    index, free = result[1]
                    truth[group[index].pool_id] = free
                    if not_sharing is not None and len(result) > 2 and result[2] == NOT_SHARING:
                        not_sharing.add(group[index].pool_id)
                    if len(result) > 3:  # no device fitted: the engine takes the devices as they are
                        devices.setdefault(group[index].pool_id, {}).update(result[3])
            if failure is not None or refused:
                truth.update(await self.undo(done, devices))
                if failure is not None:
                    raise failure
                return False
            await self.make_durable(leases, done, truth, record, settle, devices_after, devices)
            return True
        except asyncio.CancelledError:
            self._roll_back_late(leases)
            raise
        finally:
            core.world.settle(allocations, truth, devices)

    def _roll_back_late(self, leases: list[LeaseInfo]) -> None:
        """The placement's deadline passed mid-grant (its client hears 503): whatever step
        the grant reached is undone (units given back, the lease ended in the durable
        record at its grant time: nothing billed), never confirmed late. In the
        background, so that the answer is not held up by a store that is not answering;
        a reservation or confirmation of this grant still in flight meets a lease that
        is gone (or is ended after it)."""
        async def undo() -> None:
            await self.undo(leases)
            await self.retract(leases)

        task = asyncio.create_task(undo())
        self._rollbacks.add(task)
        task.add_done_callback(self._rollbacks.discard)

    async def make_durable(self, leases: list[LeaseInfo], done: list[LeaseInfo], truth: dict[str, int],
                           record: RequestRecord | None, settle: Settle | None = None,
                           devices_after: dict[str, tuple[int, ...]] | None = None,
                           devices: DeviceTruth | None = None) -> None:
        """Reserved leases: publish their grants, then confirm them (with ``record``);
        raise ``Unavailable`` after giving back ``done`` if the record did not take them.

        ``settle`` (a queued request's placing → placed) runs once the grants are durable
        and before they are confirmed: if it is refused (the claim was taken over) the
        grants are given back and retracted, and ``Refused`` raised; if the broker dies
        after it, the unconfirmed leases end at their provisional expiry (nothing billed),
        never placing a request twice."""
        # a lease that must be delivered starts provisioning (billed from its lease.ready)
        grants = [(LeaseProvisioning if lease.delivery else LeaseGranted)(
            id=f"{lease.lease_id}.1", at=lease.granted_at, lease=lease, seq=1,
            free_after=truth.get(lease.pool_id, -1),
            devices_free_after=(devices_after or {}).get(lease.lease_id, ())) for lease in leases]
        if len(grants) == 1:
            results: list[object] = [None]
            try:
                await self.core.publish_alloc(grants[0])
            except Exception as exc:  # noqa: BLE001 - handled with the others below
                results[0] = exc
        else:
            results = await asyncio.gather(*map(self.core.publish_alloc, grants), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is None and settle is not None:
            try:
                await settle(leases)
            except Exception as exc:  # noqa: BLE001 - handled below: the grant is given back
                failed = exc
        if failed is None:
            if record is not None:
                record.lease_ids = [lease.lease_id for lease in leases]
            try:
                gone = await self._commits.submit((leases, record))
                if gone:
                    failed = Unavailable(f"leases {gone} expired before their grants were confirmed")
            except Exception as exc:  # noqa: BLE001 - as if the grant had failed
                failed = exc
        if failed is not None:
            log.error("grant not durable (%s): giving the units back", failed)
            truth.update(await self.undo(done, devices))
            await self.retract([lease for lease, r in zip(leases, results, strict=True)
                                if not isinstance(r, BaseException)])
            if isinstance(failed, Refused):
                raise failed
            raise Unavailable("the event store did not acknowledge the grant; nothing was reserved") from failed

    async def _reserve_batch(self, items: list[list[Reservation]]) -> list[list[tuple[bool, list[int]] | Exception]]:
        """The reservations of concurrent placements in one pipelined round trip."""
        results = await self.core.leases.reserve_many([group for item in items for group in item])
        return per_item(results, [len(item) for item in items])

    async def _commit_batch(self, items: list[tuple[list[LeaseInfo], RequestRecord | None]]) -> list[list[str]]:
        """Durable grants of concurrent placements confirmed in one pipelined round trip,
        with their lookups and request records. Returns, per placement, the leases that
        were gone (their provisional expiry passed first)."""
        store = self.core.leases
        per_placement = [list(by_region(leases).values()) for leases, _ in items]
        groups = [group for item_groups in per_placement for group in item_groups]

        def build(pipe: Pipeline) -> int:
            n = store.confirm_into(pipe, groups)
            self.core.save_into(pipe, *(record for _, record in items if record is not None),
                                lookups=store.index_lookups([lease for leases, _ in items for lease in leases]))
            return n

        n, replies = await store.run_pipeline(build, also=self.core.requests.scripts)  # every command idempotent
        confirmed = per_item(store.confirmed(replies, n), [len(g) for g in per_placement])
        return [missing_leases(item_groups, replies)
                for item_groups, replies in zip(per_placement, confirmed, strict=True)]

    async def retract(self, leases: list[LeaseInfo]) -> None:
        """Grants that reached the durable record although the grant as a whole failed
        (the client hears 503 and the units were given back): end them there too, at their
        grant time, so that the meter bills nothing and a Redis rebuild does not bring
        them back."""
        for lease in leases:
            try:
                await self.core.publish_alloc(LeaseLost(id=f"{lease.lease_id}.2", at=lease.granted_at, lease=lease,
                                                        seq=2, reason="grant not completed"))
            except Exception as exc:  # noqa: BLE001 - the record is unreachable: say so, nothing more to do
                log.error("grant of %s is in the record but could not be retracted (%s)", lease.lease_id, exc)

    async def undo(self, leases: list[LeaseInfo], devices: DeviceTruth | None = None) -> dict[str, int]:
        """Compensation of a placement that failed part-way: every lease already reserved
        gives its units back. Each one is tried even if another fails (a Redis Cluster
        node may be down); one that cannot be undone stays until its expiry sweeps it.
        ``devices`` collects the free milli of the devices given back."""
        now = time.time()
        truth = {}
        for lease in leases:
            try:
                ended = await self.core.leases.end(lease, "release", now)
            except Exception as exc:  # noqa: BLE001 - best effort, logged
                log.error("could not give back lease %s in %s (%s); it expires at its TTL",
                          lease.lease_id, lease.region, exc)
                continue
            if ended is not None and ended.free_after >= 0:
                truth[lease.pool_id] = ended.free_after
                if devices is not None:
                    note_devices(devices, ended.lease, ended.devices_free_after)
        return truth

    @staticmethod
    def _adjusted(leases: list[LeaseInfo], adjust: Callable[[LeaseInfo], LeaseInfo] | None) -> list[LeaseInfo]:
        return leases if adjust is None else [adjust(lease) for lease in leases]

    async def try_place(self, request_id: str, tenant: str, body: ComputeRequest, now: datetime,
                        record: RequestRecord | None = None,
                        prefer: Option | None = None, ask: Ask | None = None,
                        settle: Settle | None = None,
                        adjust: Callable[[LeaseInfo], LeaseInfo] | None = None) -> tuple[list[LeaseInfo], Option]:
        """``prefer``: a placement planned for this request (a queue pass's batch plan),
        tried first; if its units are gone by now, the request is matched afresh.
        ``ask``: the request as the engine sees it, if the caller has it already.
        ``adjust``: applied to each new lease before it is reserved (a failover's
        replacement carries the ended lease's attempt and end)."""
        world = self.core.world
        ask = ask or self.core.ask_for(body)
        if prefer is not None:
            leases = self._adjusted(self.leases_for(prefer, request_id, tenant, body, now), adjust)
            if world.hold(held(leases)) and await self.reserve(leases, record, settle):
                return leases, prefer
        decision = Decision()
        not_sharing: set[str] = set()  # pools that refused a share: they do not share their devices
        attempt = 0
        while attempt < ATTEMPTS:
            # the best option alone first (the walk stops sooner and builds one placement,
            # about a third of a match's time). Once a race is lost, the runners-up too, in
            # a random order: replicas that lost a race to each other would otherwise all
            # reach for the same next-best units and lose again (seen as 409s with two
            # broker processes)
            decision = world.engine.match(ask, limit=1 if attempt == 0 else 3)
            if not decision.placed:
                raise NotPlaced(decision)
            options = list(decision.options)
            if attempt:
                self.core.spread.shuffle(options)
            excluded = len(not_sharing)
            for option in options:
                leases = self._adjusted(self.leases_for(option, request_id, tenant, body, now), adjust)
                if not world.hold(held(leases)):
                    continue  # a concurrent request here took these units since the match
                if await self.reserve(leases, record, settle, not_sharing):
                    return leases, option
                if len(not_sharing) > excluded:
                    break
            if len(not_sharing) > excluded:
                # the script refused a share there ('sharing': the pool does not share, or
                # not that small a share, as Redis has it now): that pool is left out and the
                # match runs again, not counted as a lost race (each time one pool fewer)
                ask = msgspec.structs.replace(ask, exclude_pools=ask.exclude_pools | not_sharing)
                continue
            attempt += 1
            # every option was lost to a concurrent request: match again on fresher numbers
        raise NotPlaced(Decision(reasons=("the matching capacity was taken by concurrent requests; retry",)),
                        contended=True)
