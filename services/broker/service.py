"""The broker's use cases: place, quote, queue, renew, release, expire.

Order of every grant: the engine proposes (pure), the reservation script takes the
units atomically in Redis (the authority), the grant event is acknowledged by
JetStream (the durable record), and only then does the client hear 201. If the event
cannot be made durable, the units are given back and the client gets 503.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from services.common.auth import Principal
from services.common.coalesce import Coalescer
from services.common.errors import BrokerError, Conflict, Forbidden, NotFound, Unavailable, Unprocessable
from services.common.ids import new_id
from services.common.keys import Keys
from services.common.messages import (
    AllocEvent,
    BillingEvent,
    BudgetExhausted,
    BudgetRestored,
    LeaseExpired,
    LeaseGranted,
    LeaseInfo,
    LeaseLost,
    LeasePreempted,
    LeaseReleased,
    LeaseRenewed,
    LeaseRevoked,
    RequestAccepted,
    RequestCancelled,
    RequestEvent,
    RequestPlaced,
    RequestQueued,
    RequestRejected,
)
from services.common.nats_conn import FAILOVER_ERRORS, AckedPublisher, publish_durably, read_stream
from services.common.redis_conn import is_cluster
from services.common.tracing import nats_headers
from services.common.subjects import Subjects

from .idempotency import before_grant
from .domain.requests import TERM_MONTHS, ComputeRequest, term_seconds, to_ask
from .leases import PENDING_S, Ended, LeaseStore, Reservation, by_region, missing_leases
from .metrics import LEASE_ENDS, QUEUE_WAIT_SECONDS
from .matching.batch import plan_queue
from .matching.engine import Engine
from .matching.model import Ask, Decision, Placement
from .queue_cap import TenantQueueCap, refused
from .records import QuoteView, RequestRecord, RequestView, lease_view
from .world import World

log = logging.getLogger("broker")
_record = msgspec.json.Decoder(RequestRecord)
_alloc = msgspec.json.Decoder(AllocEvent)
_request_event = msgspec.json.Decoder(RequestEvent)
ATTEMPTS = 6  # matches per placement; each lost race gives the engine fresher numbers
QUEUE_PLAN_BUDGET_S = 0.02  # a queue pass plans jointly for at most this long (it blocks the loop)
QUEUE_PLAN_MAX = 200  # requests at the head of the queue planned jointly


def utcnow() -> datetime:
    return datetime.now(UTC)


class NotPlaced(Exception):
    def __init__(self, decision: Decision, contended: bool = False) -> None:
        super().__init__("not placed")
        self.decision, self.contended = decision, contended


def _per_item(flat: list, sizes: list[int]) -> list[list]:
    """``flat`` (the results of a batch's groups, in order) cut back into one list per
    item of ``sizes`` groups."""
    out, i = [], 0
    for size in sizes:
        out.append(flat[i:i + size])
        i += size
    return out


class Broker:
    def __init__(self, *, nc: NATS, js: JetStreamContext, redis: Redis, keys: Keys, subjects: Subjects,
                 world: World, leases: LeaseStore, clock: Callable[[], datetime] = utcnow) -> None:
        self.nc, self.js, self.redis, self.keys, self.subjects = nc, js, redis, keys, subjects
        self.world, self.leases, self.clock = world, leases, clock
        self.queue_kick = asyncio.Event()
        self.blocked: dict[str, float] = {}  # tenant -> when its budget ran out (mirrors Redis)
        self.budget_grace_s = 300.0
        self.queue_cap = TenantQueueCap(redis, keys, 0)  # the app sets the cap from its settings
        self._lost_regions: set[str] = set()  # regions refused for a lost live state (logged once)
        self._cluster = is_cluster(redis)
        self.acks = AckedPublisher(nc)
        self._spread = random.Random()  # the order of the options tried after a lost race
        self._reservations: Coalescer[list[Reservation], list] = Coalescer(self._reserve_batch)
        self._commits: Coalescer[tuple[list[LeaseInfo], RequestRecord | None], list[str]] = \
            Coalescer(self._commit_batch)
        self._rollbacks: set[asyncio.Task] = set()  # late grants being undone (``_roll_back_late``)

    # --- helpers -------------------------------------------------------------------------
    @staticmethod
    def tenant_of(principal: Principal) -> str:
        if principal.role != "tenant":
            raise Forbidden("only a tenant key places requests (its tenant id is the one billed)")
        return principal.subject

    def ask_for(self, body: ComputeRequest, exclude: frozenset[str] = frozenset()):  # noqa: ANN201
        return to_ask(body, self.world.catalogue, self.world.countries, exclude)

    async def _publish_request(self, event: RequestEvent) -> None:
        """Request events are informational: published without waiting for the ack
        (JetStream still stores them); the lease events are the durable record."""
        await self.nc.publish(self.subjects.request(event.tenant), msgspec.json.encode(event),
                              headers=nats_headers({"Nats-Msg-Id": event.id}))

    async def _publish_alloc(self, event: AllocEvent) -> None:
        """Published with the concurrent others (``AckedPublisher``); retried through a
        NATS failover: a grant not acknowledged is undone by the caller, but a release,
        renewal or expiry has already happened in Redis."""
        subject = self.subjects.alloc(event.lease.region, event.lease.tenant)
        try:
            await self.acks.publish(subject, event)
        except FAILOVER_ERRORS:
            await publish_durably(self.js, subject, event)

    async def _save(self, record: RequestRecord) -> None:
        pipe = self.redis.pipeline(transaction=False)
        self._save_into(pipe, record)
        await pipe.execute()

    def _save_into(self, pipe: Pipeline, *records: RequestRecord) -> None:
        """Few commands for many records: one MSET (per record on Redis Cluster, where
        the keys live in different slots) and one ZADD per tenant."""
        values = {self.keys.request(r.request_id): msgspec.json.encode(r) for r in records}
        if len(values) == 1 or self._cluster:
            for key, value in values.items():
                pipe.set(key, value)
        elif values:
            pipe.mset(values)
        by_tenant: dict[str, dict[str, float]] = {}
        for r in records:
            by_tenant.setdefault(r.tenant, {})[r.request_id] = r.created_at.timestamp()
        for tenant, members in by_tenant.items():
            pipe.zadd(self.keys.tenant_requests(tenant), members)

    async def record(self, request_id: str) -> RequestRecord | None:
        raw = await self.redis.get(self.keys.request(request_id))
        return _record.decode(raw) if raw else None

    # --- placing ---------------------------------------------------------------------------
    def _leases_for(self, option: Placement, request_id: str, tenant: str, body: ComputeRequest,
                    now: datetime) -> list[LeaseInfo]:
        term = term_seconds(body)
        ttl = 0 if term else body.lease_ttl_s
        expires = now + timedelta(seconds=term or ttl)
        out = []
        for a in option.allocations:
            out.append(LeaseInfo(
                lease_id=new_id("lease"), request_id=request_id, tenant=tenant, pool_id=a.pool_id,
                provider=a.provider, region=a.region, model=a.model, units=a.units, billing=body.billing,
                unit_price=a.unit_price, price_basis=a.price_basis, currency=option.currency, granted_at=now,
                expires_at=expires, term_months=TERM_MONTHS.get(body.billing, 0), ttl_s=ttl,
                priority=body.priority, pool_generation=self.world.generations.get(a.pool_id, 0)))
        return out

    async def _reserve(self, leases: list[LeaseInfo], record: RequestRecord | None = None) -> bool:
        """Take the units of every lease (grouped by region; each region atomically),
        make the grants durable, then confirm them (with the lookups and the request
        record). All or nothing. The caller holds the units in the engine; ``truth``
        collects what Redis said about each pool touched.

        The reservations and the confirmations of concurrent placements share pipelined
        round trips (``Coalescer``): per-call client overhead, not Redis, is what limits a
        broker process."""
        truth: dict[str, int] = {}
        allocations = [(lease.pool_id, lease.units) for lease in leases]
        # provisional until the grant is durable and confirmed (a broker dying in between leaks little)
        expires = min(leases[0].expires_at.timestamp(), time.time() + PENDING_S)
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
                truth.update(await self._undo(leases))
                raise
            for (_, group, _), result in zip(groups, results, strict=True):
                if isinstance(result, Exception):
                    # this region's slot is unreachable or refused (on Redis Cluster regions
                    # live on different nodes): the regions reserved give back
                    failure = failure or result
                elif result[0]:
                    done += group
                    truth.update({lease.pool_id: free for lease, free in zip(group, result[1], strict=True)})
                else:
                    refused = True
                    index, free = result[1]
                    truth[group[index].pool_id] = free
            if failure is not None or refused:
                truth.update(await self._undo(done))
                if failure is not None:
                    raise failure
                return False
            grants = [LeaseGranted(id=f"{lease.lease_id}.1", at=lease.granted_at, lease=lease, seq=1,
                                   free_after=truth.get(lease.pool_id, -1)) for lease in leases]
            if len(grants) == 1:
                results: list[object] = [None]
                try:
                    await self._publish_alloc(grants[0])
                except Exception as exc:  # noqa: BLE001 - handled with the others below
                    results[0] = exc
            else:
                results = await asyncio.gather(*map(self._publish_alloc, grants), return_exceptions=True)
            failed = next((r for r in results if isinstance(r, BaseException)), None)
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
                truth.update(await self._undo(done))
                await self._retract([lease for lease, r in zip(leases, results, strict=True)
                                     if not isinstance(r, BaseException)])
                raise Unavailable("the event store did not acknowledge the grant; nothing was reserved") from failed
            return True
        except asyncio.CancelledError:
            self._roll_back_late(leases)
            raise
        finally:
            self.world.settle(allocations, truth)

    def _roll_back_late(self, leases: list[LeaseInfo]) -> None:
        """The placement's deadline passed mid-grant (its client hears 503): whatever step
        the grant reached is undone (units given back, the lease ended in the durable
        record at its grant time: nothing billed), never confirmed late. In the
        background, so that the answer is not held up by a store that is not answering;
        a reservation or confirmation of this grant still in flight meets a lease that
        is gone (or is ended after it)."""
        async def undo() -> None:
            await self._undo(leases)
            await self._retract(leases)

        task = asyncio.create_task(undo())
        self._rollbacks.add(task)
        task.add_done_callback(self._rollbacks.discard)

    async def _reserve_batch(self, items: list[list[Reservation]]) -> list[list[tuple[bool, list[int]] | Exception]]:
        """The reservations of concurrent placements in one pipelined round trip."""
        results = await self.leases.reserve_many([group for item in items for group in item])
        return _per_item(results, [len(item) for item in items])

    async def _commit_batch(self, items: list[tuple[list[LeaseInfo], RequestRecord | None]]) -> list[list[str]]:
        """Durable grants of concurrent placements confirmed in one pipelined round trip,
        with their lookups and request records. Returns, per placement, the leases that
        were gone (their provisional expiry passed first)."""
        per_item = [list(by_region(leases).values()) for leases, _ in items]
        groups = [group for item_groups in per_item for group in item_groups]

        def build(pipe: Pipeline) -> int:
            n = self.leases.confirm_into(pipe, groups)
            self.leases.index_into(pipe, [lease for leases, _ in items for lease in leases])
            self._save_into(pipe, *(record for _, record in items if record is not None))
            return n

        n, replies = await self.leases.run_pipeline(build)  # every command idempotent
        confirmed = _per_item(self.leases.confirmed(replies, n), [len(g) for g in per_item])
        return [missing_leases(item_groups, replies) for item_groups, replies in zip(per_item, confirmed, strict=True)]

    async def _retract(self, leases: list[LeaseInfo]) -> None:
        """Grants that reached the durable record although the grant as a whole failed
        (the client hears 503 and the units were given back): end them there too, at their
        grant time, so that the meter bills nothing and a Redis rebuild does not bring
        them back."""
        for lease in leases:
            try:
                await self._publish_alloc(LeaseLost(id=f"{lease.lease_id}.2", at=lease.granted_at, lease=lease,
                                                    seq=2, reason="grant not completed"))
            except Exception as exc:  # noqa: BLE001 - the record is unreachable: say so, nothing more to do
                log.error("grant of %s is in the record but could not be retracted (%s)", lease.lease_id, exc)

    async def _undo(self, leases: list[LeaseInfo]) -> dict[str, int]:
        """Compensation of a placement that failed part-way: every lease already reserved
        gives its units back. Each one is tried even if another fails (a Redis Cluster
        node may be down); one that cannot be undone stays until its expiry sweeps it."""
        now = time.time()
        truth = {}
        for lease in leases:
            try:
                ended = await self.leases.end(lease, "release", now)
            except Exception as exc:  # noqa: BLE001 - best effort, logged
                log.error("could not give back lease %s in %s (%s); it expires at its TTL",
                          lease.lease_id, lease.region, exc)
                continue
            if ended is not None and ended.free_after >= 0:
                truth[lease.pool_id] = ended.free_after
        return truth

    async def _try_place(self, request_id: str, tenant: str, body: ComputeRequest, now: datetime,
                         record: RequestRecord | None = None,
                         prefer: Placement | None = None, ask: Ask | None = None) -> tuple[list[LeaseInfo], Placement]:
        """``prefer``: a placement planned for this request (a queue pass's batch plan),
        tried first; if its units are gone by now, the request is matched afresh.
        ``ask``: the request as the engine sees it, if the caller has it already."""
        ask = ask or self.ask_for(body)
        if prefer is not None and self.world.hold((a.pool_id, a.units) for a in prefer.allocations):
            leases = self._leases_for(prefer, request_id, tenant, body, now)
            if await self._reserve(leases, record):
                return leases, prefer
        decision = Decision()
        for attempt in range(ATTEMPTS):
            # the best option alone first (the walk stops sooner and builds one placement,
            # about a third of a match's time). Once a race is lost, the runners-up too, in
            # a random order: replicas that lost a race to each other would otherwise all
            # reach for the same next-best units and lose again (seen as 409s with two
            # broker processes)
            decision = self.world.engine.match(ask, limit=1 if attempt == 0 else 3)
            if not decision.placed:
                raise NotPlaced(decision)
            options = list(decision.options)
            if attempt:
                self._spread.shuffle(options)
            for option in options:
                if not self.world.hold((a.pool_id, a.units) for a in option.allocations):
                    continue  # a concurrent request here took these units since the match
                leases = self._leases_for(option, request_id, tenant, body, now)
                if await self._reserve(leases, record):
                    return leases, option
            # every option was lost to a concurrent request: match again on fresher numbers
        raise NotPlaced(Decision(reasons=("the matching capacity was taken by concurrent requests; retry",)),
                        contended=True)

    async def _try_preempt(self, request_id: str, tenant: str, body: ComputeRequest,
                           now: datetime) -> tuple[list[LeaseInfo], Placement] | None:
        """Make room by preempting interruptible leases, when the policy allows: an
        on-demand or reserved request may preempt any interruptible lease; an
        interruptible one only those of lower priority. Victims: lowest priority first,
        then the newest (they have run the least)."""
        def eligible(victim: LeaseInfo) -> bool:
            return body.billing != "interruptible" or victim.priority < body.priority

        victims: dict[str, list[LeaseInfo]] = defaultdict(list)
        ask = self.ask_for(body)
        for region in ask.regions or list(self.world.countries):
            for lease in await self.leases.interruptible(region):
                if eligible(lease):
                    victims[lease.pool_id].append(lease)
        if not victims:
            return None
        trial = Engine(self.world.topology)
        for pool_id, held in victims.items():
            state = self.world.engine.get(pool_id)
            if state is not None:
                trial.upsert(msgspec.structs.replace(state, free=state.free + sum(v.units for v in held)))
        decision = trial.match(ask, limit=1)
        if not decision.placed:
            return None
        option = decision.options[0]
        for a in option.allocations:
            state = self.world.engine.get(a.pool_id)
            missing = a.units - (state.free if state else 0)
            for victim in sorted(victims[a.pool_id], key=lambda v: (v.priority, -v.granted_at.timestamp())):
                if missing <= 0:
                    break
                ended = await self.leases.end(victim, "preempt", now.timestamp())
                if ended is not None:
                    await self._ended(LeasePreempted, ended, now, by_request=request_id)
                    missing -= victim.units
        if not self.world.hold((a.pool_id, a.units) for a in option.allocations):
            return None
        leases = self._leases_for(option, request_id, tenant, body, now)
        return (leases, option) if await self._reserve(leases) else None

    # --- budgets --------------------------------------------------------------------------
    async def load_budgets(self) -> None:
        raw = await self.redis.hgetall(self.keys.budget_blocked())
        self.blocked = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}

    async def on_billing(self, event: BillingEvent) -> None:
        """The meter said a tenant's budget ran out (or was topped up)."""
        if isinstance(event, BudgetExhausted):
            when = event.at.timestamp()
            if await self.redis.hsetnx(self.keys.budget_blocked(), event.tenant, when):
                log.warning("budget of %s exhausted: no new placements; leases revoked in %.0fs", event.tenant,
                            self.budget_grace_s)
            self.blocked.setdefault(event.tenant, when)
        elif isinstance(event, BudgetRestored):
            await self.redis.hdel(self.keys.budget_blocked(), event.tenant)
            self.blocked.pop(event.tenant, None)
            self.queue_kick.set()

    def _check_budget(self, tenant: str) -> None:
        if tenant in self.blocked:
            raise Unprocessable(f"tenant {tenant} is out of budget; top it up to place again",
                                reasons=["budget exhausted"])

    async def revoke_over_budget(self) -> int:
        """After the grace, end the pay-as-you-go leases of tenants out of budget
        (reserved terms are paid in advance and keep running)."""
        now = self.clock()
        n = 0
        for tenant, since in list(self.blocked.items()):
            if now.timestamp() < since + self.budget_grace_s:
                continue
            for lease in await self.leases.of_tenant(tenant):
                if lease.billing not in ("on_demand", "interruptible"):
                    continue
                ended = await self.leases.end(lease, "revoke", now.timestamp())
                if ended is not None:
                    await self._ended(LeaseRevoked, ended, now, reason="budget exhausted")
                    n += 1
        return n

    async def place(self, principal: Principal, body: ComputeRequest,
                    request_id: str | None = None) -> tuple[int, RequestView]:
        """``request_id``: the one an idempotency key claimed for this placement."""
        tenant = self.tenant_of(principal)
        self._check_budget(tenant)
        ask = self.ask_for(body)  # validate before anything happens
        now = self.clock()
        request_id = request_id or new_id("req")
        record = RequestRecord(request_id=request_id, tenant=tenant, state="placed", created_at=now,
                               updated_at=now, body=body)
        await self._publish_request(RequestAccepted(id=new_id("ev"), at=now, request_id=request_id, tenant=tenant,
                                                    units=body.units or 0))
        try:
            try:
                leases, option = await self._try_place(request_id, tenant, body, now, record, ask=ask)
            except NotPlaced as np:
                preempted = None if np.decision.never or np.contended else \
                    await self._try_preempt(request_id, tenant, body, now)
                if preempted is None:
                    raise
                leases, option = preempted
        except NotPlaced as np:
            reasons = list(np.decision.reasons) or ["no capacity matches right now"]
            record.reasons = reasons
            full = None if np.decision.never or not body.queue else await self.queue_cap.refusal(tenant, request_id)
            if full is not None:  # the tenant's queue is at its cap (docs/overload.md)
                record.reasons = reasons = [*reasons, full]
            if np.decision.never or not body.queue or full is not None:
                record.state = "rejected"
                await self._save(record)
                await self._publish_request(RequestRejected(id=new_id("ev"), at=now, request_id=request_id,
                                                            tenant=tenant, reasons=tuple(reasons)))
                if full is not None:
                    raise refused(full, reasons, request_id) from None
                if np.decision.never:
                    raise Unprocessable("this request can never be placed on the registered capacity",
                                        reasons=reasons, request_id=request_id) from None
                raise Conflict("no capacity for this request right now (queue: false)", reasons=reasons,
                               request_id=request_id) from None
            record.state = "queued"
            if body.deadline_s:
                record.deadline_at = now + timedelta(seconds=body.deadline_s)
            await self._enqueue(record, now)
            return 202, await self.view(record)
        if record.lease_ids != [lease.lease_id for lease in leases]:  # placed by preemption
            record.lease_ids = [lease.lease_id for lease in leases]
            await self._save(record)
        await self._publish_request(RequestPlaced(id=new_id("ev"), at=now, request_id=request_id, tenant=tenant,
                                                  lease_ids=tuple(record.lease_ids)))
        return 201, await self.view(record, leases=leases, placement=option)

    async def quote(self, principal: Principal, body: ComputeRequest) -> QuoteView:
        if principal.role not in ("tenant", "admin", "ops"):
            raise Forbidden(f"role {principal.role} may not ask for quotes")
        decision = self.world.engine.match(self.ask_for(body), limit=5)
        return QuoteView(options=list(decision.options), reasons=list(decision.reasons),
                         placeable_now=decision.placed, never=decision.never)

    # --- queue -------------------------------------------------------------------------------
    async def _enqueue(self, record: RequestRecord, now: datetime, announce: bool = True) -> None:
        """Score: priority band first, then a per-tenant virtual time so tenants take
        turns (fair share), FIFO within a tenant."""
        vtime = await self.redis.hget(self.keys.tenant_vtime(), record.tenant)
        start = max(now.timestamp(), float(vtime or 0))
        await self.redis.hset(self.keys.tenant_vtime(), record.tenant, start + 1.0)
        score = (9 - record.body.priority) * 1e11 + start
        await self._save(record)
        await self.redis.zadd(self.keys.queue(), {record.request_id: score})
        if announce:
            await self._publish_request(RequestQueued(id=new_id("ev"), at=now, request_id=record.request_id,
                                                      tenant=record.tenant, reasons=tuple(record.reasons),
                                                      body=msgspec.json.encode(record.body)))

    async def run_queue(self, limit: int = 1000) -> int:
        """One pass over the queue, in order; whatever fits now is placed (backfill).
        One replica at a time (a Redis lock); any replica may kick it."""
        lock = self.keys.lock("queue")
        if not await self.redis.set(lock, "1", nx=True, px=10_000):
            return 0
        placed = 0
        try:
            ids = await self.redis.zrange(self.keys.queue(), 0, limit - 1)
            records = {r.request_id: r for r in await self._records(ids)}
            plan = self._plan_queue([records[k] for k in records if not self._skip(records[k])])
            for raw_id in ids:
                request_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                record = records.get(request_id)
                now = self.clock()
                if record is None or record.state != "queued":
                    await self.redis.zrem(self.keys.queue(), request_id)
                    continue
                if record.deadline_at and now >= record.deadline_at:
                    await self._finish_queued(record, "rejected", now,
                                              reasons=[*record.reasons, "deadline passed while queued"])
                    continue
                if record.tenant in self.blocked:
                    continue  # stays queued until the budget is topped up
                try:
                    leases, _ = await self._try_place(record.request_id, record.tenant, record.body, now,
                                                      prefer=plan.get(record.request_id))
                except NotPlaced as np:
                    record.reasons = list(np.decision.reasons)
                    continue
                except Unavailable as exc:  # the event store or Redis did not answer: try again next pass
                    log.warning("queued request %s stays queued: %s", record.request_id, exc.detail)
                    record.reasons = [f"capacity was found but not granted: {exc.detail}; retried on the next pass"]
                    await self._save(record)
                    continue
                except BrokerError as exc:  # e.g. a model vanished from the catalogue
                    await self._finish_queued(record, "rejected", now, reasons=[exc.detail])
                    continue
                record.lease_ids = [lease.lease_id for lease in leases]
                await self._finish_queued(record, "placed", now)
                placed += 1
        finally:
            await self.redis.delete(lock)
        return placed

    async def _records(self, ids: list) -> list[RequestRecord]:
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)  # not MGET: on Redis Cluster the keys span slots
        for i in ids:
            pipe.get(self.keys.request(i.decode() if isinstance(i, bytes) else i))
        return [_record.decode(raw) for raw in await pipe.execute() if raw]

    def _skip(self, record: RequestRecord) -> bool:
        """Not placed by this pass whatever the capacity (see run_queue)."""
        return (record.state != "queued" or record.tenant in self.blocked
                or bool(record.deadline_at and self.clock() >= record.deadline_at))

    def _plan_queue(self, records: list[RequestRecord]) -> dict[str, Placement]:
        """Placements for this pass, planned jointly (``plan_queue``: who is served stays
        what the queue's order says; only where they go is planned together)."""
        asks: list[tuple[str, Ask]] = []
        for record in records[:QUEUE_PLAN_MAX]:
            try:
                asks.append((record.request_id, self.ask_for(record.body)))
            except BrokerError:
                continue
        plan = plan_queue(self.world.engine, [ask for _, ask in asks], time_budget_s=QUEUE_PLAN_BUDGET_S)
        return {asks[i][0]: placement for i, placement in plan.items()}

    async def _finish_queued(self, record: RequestRecord, state: str, now: datetime,
                             reasons: list[str] | None = None) -> None:
        QUEUE_WAIT_SECONDS.labels(state).observe(max(0.0, (now - record.created_at).total_seconds()))
        record.state = state  # type: ignore[assignment]
        record.updated_at = now
        if reasons is not None:
            record.reasons = reasons
        await self._save(record)
        await self.redis.zrem(self.keys.queue(), record.request_id)
        base = {"id": new_id("ev"), "at": now, "request_id": record.request_id, "tenant": record.tenant}
        if state == "placed":
            await self._publish_request(RequestPlaced(**base, lease_ids=tuple(record.lease_ids)))
        elif state == "rejected":
            await self._publish_request(RequestRejected(**base, reasons=tuple(record.reasons)))
        else:
            await self._publish_request(RequestCancelled(**base))

    async def cancel(self, principal: Principal, request_id: str) -> RequestView:
        if principal.role == "ops":
            raise Forbidden("ops reads requests; only their tenant cancels them")
        record = await self._own_record(principal, request_id)
        if record.state != "queued":
            raise Conflict(f"request {request_id} is {record.state}; only a queued request can be cancelled "
                           "(release its leases instead)")
        await self._finish_queued(record, "cancelled", self.clock())
        return await self.view(record)

    # --- reading ------------------------------------------------------------------------------
    async def _own_record(self, principal: Principal, request_id: str) -> RequestRecord:
        self._may_see(principal)
        record = await self.record(request_id) if len(request_id) <= 64 else None
        if record is None or not (principal.role in ("admin", "ops") or
                                  (principal.role == "tenant" and principal.subject == record.tenant)):
            raise NotFound(f"no request {request_id}")  # never tell a tenant what another one has
        return record

    async def get_request(self, principal: Principal, request_id: str) -> RequestView:
        return await self.view(await self._own_record(principal, request_id))

    async def view(self, record: RequestRecord, leases: list[LeaseInfo] | None = None,
                   placement: Placement | None = None) -> RequestView:
        if leases is None:
            leases = [lease for lease in [await self.leases.get(i) for i in record.lease_ids] if lease]
        position = wait = None
        if record.state == "queued":
            rank = await self.redis.zrank(self.keys.queue(), record.request_id)
            position = None if rank is None else rank + 1
            wait = await self._estimated_wait(record)
        return RequestView(request_id=record.request_id, tenant=record.tenant, state=record.state,
                           created_at=record.created_at, reasons=record.reasons,
                           leases=[lease_view(lease) for lease in leases], queue_position=position,
                           estimated_wait_s=wait, deadline_at=record.deadline_at, placement=placement)

    async def _estimated_wait(self, record: RequestRecord) -> float | None:
        """A lower bound: when enough matching units held by fixed-end leases (duration
        or term) come back. None when only open leases (ended by their clients) hold
        the capacity, as then nobody can know."""
        ask = self.ask_for(record.body)
        need = ask.units or 1
        regions = ask.regions or set(self.world.countries)
        ends: list[tuple[float, int]] = []
        for region in regions:
            raw = await self.redis.zrange(self.keys.lease_expiry(region), 0, 49, withscores=True)
            for lease_id, score in raw:
                lease_id = lease_id.decode() if isinstance(lease_id, bytes) else lease_id
                lease = await self.leases.get(lease_id)
                if lease is None or lease.ttl_s > 0:
                    continue
                accelerator = self.world.catalogue.get(lease.model)
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

    # --- leases -------------------------------------------------------------------------------
    @staticmethod
    def _may_see(principal: Principal) -> None:
        """Wrong role is a 403 before any lookup; another tenant's id is then a 404."""
        if principal.role not in ("admin", "ops", "tenant"):
            raise Forbidden(f"role {principal.role} has no requests or leases")

    async def own_lease(self, principal: Principal, lease_id: str) -> LeaseInfo:
        self._may_see(principal)
        lease = await self.leases.get(lease_id) if len(lease_id) <= 64 else None
        if lease is None or not (principal.role in ("admin", "ops") or
                                 (principal.role == "tenant" and principal.subject == lease.tenant)):
            raise NotFound(f"no active lease {lease_id}")
        return lease

    async def list_leases(self, principal: Principal, tenant: str | None) -> list[LeaseInfo]:
        if principal.role == "tenant":
            if tenant not in (None, principal.subject):
                raise NotFound(f"no tenant {tenant}")  # as for any id of another tenant: nothing leaks
            return await self.leases.of_tenant(principal.subject)
        if principal.role not in ("admin", "ops"):
            raise Forbidden(f"role {principal.role} may not list leases")
        if tenant is None:
            raise Unprocessable("admin and ops list leases per tenant: give ?tenant=")
        return await self.leases.of_tenant(tenant)

    async def renew(self, principal: Principal, lease_id: str) -> LeaseInfo:
        if principal.role == "ops":
            raise Forbidden("ops reads leases; only their tenant renews them")
        lease = await self.own_lease(principal, lease_id)
        if lease.ttl_s <= 0:
            raise Conflict("this lease has a fixed end (duration or reserved term); it cannot be renewed")
        now = self.clock()
        renewed = msgspec.structs.replace(lease, expires_at=now + timedelta(seconds=lease.ttl_s))
        seq = await self.leases.renew(renewed, now.timestamp())
        if seq is None:
            raise NotFound(f"no active lease {lease_id} (it expired)")
        await self._publish_alloc(LeaseRenewed(id=f"{lease_id}.{seq}", at=now, lease=renewed, seq=seq))
        return renewed

    async def release(self, principal: Principal, lease_id: str) -> LeaseInfo:
        if principal.role == "ops":
            raise Forbidden("ops reads leases; only their tenant releases them")
        lease = await self.own_lease(principal, lease_id)
        now = self.clock()
        ended = await self.leases.end(lease, "release", now.timestamp())
        if ended is None:
            raise NotFound(f"no active lease {lease_id}")
        await self._ended(LeaseReleased, ended, now)
        return ended.lease

    async def _ended(self, kind: type, ended: Ended, now: datetime, **extra: object) -> None:
        LEASE_ENDS.labels(kind.__name__.removeprefix("Lease").lower()).inc()
        if ended.free_after >= 0:
            self.world.observe_free(ended.lease.pool_id, ended.free_after)
        await self._publish_alloc(kind(id=f"{ended.lease.lease_id}.{ended.seq}", at=now, lease=ended.lease,
                                       seq=ended.seq, free_after=ended.free_after, **extra))
        self.queue_kick.set()

    # --- background ---------------------------------------------------------------------------
    async def sweep_and_rebuild(self) -> None:
        await self.rebuild_if_lost()
        if await self.redis.exists(self.keys.rebuilt_marker("broker")):
            await self._mark_new_regions_ready()
        await self.sweep()
        await self.revoke_over_budget()

    async def _mark_new_regions_ready(self) -> None:
        """Regions added since the last rebuild start ready: they have no leases to lose.
        A region without its marker but with allocations in the durable record lost its
        live state on its own (its Redis Cluster master came back empty, while the global
        rebuilt markers live elsewhere): it stays refused (503) rather than be booked over
        leases Redis no longer holds, and the rebuilt markers are removed, so that the
        registry puts its pools back and ``rebuild_if_lost`` its leases."""
        missing = await self.leases.not_ready(list(self.world.countries))
        self._lost_regions.intersection_update(missing)
        new = []
        for region in missing:
            info = await self.js.stream_info(self.subjects.stream("alloc"),
                                             subjects_filter=self.subjects.alloc(region, "*"))
            if not info.state.subjects:
                new.append(region)
            elif region not in self._lost_regions:
                self._lost_regions.add(region)
                log.error("region %s lost its live leases in Redis while the rest did not; it refuses "
                          "placements while the registry and the broker rebuild it from JetStream", region)
                for service in ("registry", "broker"):  # the rebuild restores the regions without a marker
                    await self.redis.delete(self.keys.rebuilt_marker(service))
        if new:
            await self.leases.mark_ready(new)

    async def sweep(self) -> int:
        """Expire unrenewed leases. Safe in every replica: the script re-checks expiry
        and only the caller that removed a lease announces it."""
        now = self.clock()
        n = 0
        for lease in await self.leases.expired_in(list(self.world.countries), now.timestamp()):
            ended = await self.leases.end(lease, "expire", now.timestamp())
            if ended is not None and ended.pending:
                # its broker died between reservation and confirmation: nobody was told
                # 201; end it in the record at its grant time (nothing billed)
                log.warning("lease %s was never confirmed by its broker: given back", lease.lease_id)
                await self._ended(LeaseLost, ended, lease.granted_at, reason="grant never completed")
                n += 1
            elif ended is not None:
                await self._ended(LeaseExpired, ended, now)
                n += 1
        return n

    async def rebuild_if_lost(self) -> int:
        """Redis lost or flushed: once the registry has put the pools back, replay the
        allocation stream and restore every live lease (and the units it holds), then
        the queue from the request stream. One replica does it (a lock)."""
        marker = self.keys.rebuilt_marker("broker")
        if await self.redis.exists(marker):
            return 0
        if not await self.redis.set(self.keys.lock("rebuild"), "1", nx=True, px=60_000):
            return 0
        try:
            # read the record while the registry puts the pools back; restore after it has
            t0 = time.perf_counter()
            last: dict[str, AllocEvent] = {}
            async for _, data in read_stream(self.js, self.subjects.stream("alloc"), self.subjects.events("alloc"),
                                             batch=5000):
                event = _alloc.decode(data)
                seen = last.get(event.lease.lease_id)
                if seen is None or event.seq >= seen.seq:
                    last[event.lease.lease_id] = event
            for _ in range(200):
                if await self.redis.exists(self.keys.rebuilt_marker("registry")):
                    break
                await asyncio.sleep(0.05)
            else:
                return 0  # the registry is not back: try again on the next pass
            t_read = time.perf_counter()
            now = self.clock()
            open_ = [e for e in last.values() if isinstance(e, (LeaseGranted, LeaseRenewed))]
            # the regions that lost their leases (all of them after a flush; one when a Redis
            # Cluster master came back empty): only theirs are restored, as a lease of an
            # intact region released meanwhile must not come back; the others' lookups are
            # written again (they may have been on that master)
            lost = set(await self.leases.not_ready(sorted(set(self.world.countries) |
                                                          {e.lease.region for e in open_})))
            alive = [e for e in open_ if e.lease.expires_at > now]
            await self.leases.restore([(e.lease, e.seq) for e in alive if e.lease.region in lost])
            await self.leases.index([e.lease for e in alive if e.lease.region not in lost])
            restored = sum(1 for e in alive if e.lease.region in lost)
            t_restored = time.perf_counter()
            # expired while Redis was lost, so no sweeper saw them: end them in the record,
            # else the meter (which bills on the ending event) would never bill them
            gone = [e for e in open_ if e.lease.expires_at <= now and e.lease.region in lost]
            for i in range(0, len(gone), 500):
                await asyncio.gather(*(self._publish_alloc(LeaseExpired(
                    id=f"{e.lease.lease_id}.{e.seq + 1}", at=now, lease=e.lease, seq=e.seq + 1))
                    for e in gone[i:i + 500]))
            queued: dict[str, RequestEvent] = {}
            async for _, data in read_stream(self.js, self.subjects.stream("request"),
                                             self.subjects.events("request")):
                event = _request_event.decode(data)
                queued[event.request_id] = event
            for event in queued.values():
                if isinstance(event, RequestQueued) and event.body:
                    body = msgspec.json.decode(event.body, type=ComputeRequest)
                    record = RequestRecord(request_id=event.request_id, tenant=event.tenant, state="queued",
                                           created_at=event.at, updated_at=now, body=body,
                                           reasons=list(event.reasons))
                    await self._enqueue(record, event.at, announce=False)
            await self.leases.mark_ready(list(self.world.countries))
            await self.redis.set(marker, now.isoformat())
            await self.world.resync()
            if restored:
                log.warning("rebuilt %d live leases in Redis from the allocation stream (%d events read in %.2fs, "
                            "restored in %.2fs, ready after %.2fs)", restored, len(last), t_read - t0,
                            t_restored - t_read, time.perf_counter() - t0)
            self.queue_kick.set()
            return restored
        finally:
            await self.redis.delete(self.keys.lock("rebuild"))

    async def pool_lost(self, region: str, pool_id: str, reason: str, generation: int = 0,
                        lease_ids: tuple[str, ...] = ()) -> int:
        """End the leases a pool outage or removal took: those the event names (the pool's
        leases at that moment), else every lease on the pool of that generation or older;
        never a lease granted on a later generation (the pool registered again since)."""
        now = self.clock()
        if lease_ids:
            leases = await self.leases.of_region(region, lease_ids)
        else:
            leases = [lease for lease in await self.leases.on_pool(region, pool_id)
                      if not generation or lease.pool_generation <= generation]
        n = 0
        for lease in leases:
            ended = await self.leases.end(lease, "lost", now.timestamp())
            if ended is not None:
                await self._ended(LeaseLost, ended, now, reason=reason)
                n += 1
        return n
