"""Failover (docs/lifecycle.md, "Failover"): a lease that ended failed or lost is
replaced on the next-best other pool under the same request id, within the request's
replacement budget; the attempt is recorded in the request either way.

The trigger is the durable consumer ``broker-failover`` on the failover work queue
(``Subjects.failover_work``: every ``lease.failed`` and ``lease.lost`` is published there
before it is published as an event, ``Core.publish_alloc``), shared by the replicas
(``feeds.DurableFeed``): an ending is acknowledged only once its replacement is granted,
queued or recorded as impossible, so a broker that dies between a lease ending and its
replacement leaves it to another replica (or to itself, restarted). Reading a queue of
its own, failover costs a placement nothing (it read every allocation event before). Each step on the request is one script: the claim
(placed → replacing, once per lease: a lease whose outcome is recorded is never
replaced again) and the settle (replacing → placed | queued | failed) made between the
replacement's durable grant and its confirmation, as a queue pass settles."""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from services.common.errors import BrokerError, Unavailable
from services.common.messages import AllocEvent, LeaseFailed, LeaseInfo, LeaseLost
from services.common.nats_conn import failover_work_config
from services.common.subjects import FAILOVER, Subjects

from .core import Core
from .domain.failover import REPLACED_ON, attempt_of, queue_deadline, stop_reason
from .feeds import DurableFeed, Later
from .matching.model import Decision
from .metrics import FAILOVER_SECONDS, FAILOVERS
from .placement import NotPlaced
from .queue import RequestQueue
from .records import Replacement, RequestRecord
from .replacement import Replacer, by_of
from .request_states import Busy, Handled, Refused, ReplacementClaim

log = logging.getLogger("broker.failover")
DURABLE = "broker-failover"
CLAIM_S = 10.0  # a failover outlives a placement (placement_timeout_s); a dead claimer's claim is taken over after
BUSY_S = 0.2  # another lease of the same request is being replaced: this one right after
WAITING_S = 5.0  # the request waits in the queue for another lease's replacement


class Failover:
    def __init__(self, core: Core, replacer: Replacer, queue: RequestQueue, claim_s: float = CLAIM_S) -> None:
        self.core, self.replacer, self.queue, self.claim_s = core, replacer, queue, claim_s

    def feed(self, nc: NATS, js: JetStreamContext, subjects: Subjects, ack_wait_s: float = 30.0,
             replicas: int = 1) -> DurableFeed:
        """The durable consumer that calls ``on_ended``. A redelivery before the claim
        expires finds it held and comes back (``Later``), so ``ack_wait_s`` only bounds
        how soon a dead replica's event is tried again."""
        return DurableFeed(nc, js, subjects, kind=FAILOVER, durable=DURABLE,
                           decoder=msgspec.json.Decoder(AllocEvent), wanted=REPLACED_ON, handle=self.on_ended,
                           description="broker: failed and lost leases replaced", ack_wait_s=ack_wait_s,
                           batch=256, parallel=True, work=failover_work_config(subjects, replicas))

    async def on_ended(self, event: LeaseFailed | LeaseLost) -> None:
        """Returns once the lease's outcome is recorded; raises ``Later`` (or any error)
        for the event to come back."""
        lease = event.lease
        claim = await self.core.requests.claim_replacement(lease.request_id, lease.lease_id, claim_s=self.claim_s)
        if claim is None:
            return  # the request does not hold this lease (a grant given back, a request gone): nothing to replace
        if isinstance(claim, Handled):
            await self._handled_again(lease, event.seq, claim.outcome)
            return
        if isinstance(claim, Busy):
            raise Later(BUSY_S if claim.state == "replacing" else WAITING_S,
                        f"request {lease.request_id} is {claim.state}")
        try:
            await self._decide(claim, event)
        except Refused as refused:  # the claim was taken over: the redelivery finds what its new owner decided
            raise Later(BUSY_S, f"request {lease.request_id} is {refused.state}") from None
        except Exception:
            # undecided (Redis or the event store away): the claim is given up, the event comes back
            with contextlib.suppress(Exception):
                await self.core.requests.settle_replacement(claim, "placed", None, None)
            raise

    async def _handled_again(self, lease: LeaseInfo, seq: int, outcome: dict) -> None:
        """A redelivered event whose outcome was recorded: finish what its handler may not
        have (the announcement, the queue index), idempotently."""
        if outcome.get("by"):
            await self.replacer.announce(lease, seq, outcome["by"], datetime.fromisoformat(outcome["at"]))
        elif outcome.get("outcome") == "queued":
            record = await self.core.requests.get(lease.request_id)
            if record is not None and record.state == "queued":
                await self.queue.index(record, self.core.clock())

    async def _decide(self, claim: ReplacementClaim, event: LeaseFailed | LeaseLost) -> None:
        core, lease, record = self.core, event.lease, claim.record
        now = core.clock()
        record.updated_at = now
        record.attempts = [*record.attempts, attempt_of(event)]
        record.lease_ids = [i for i in record.lease_ids if i != lease.lease_id]
        if lease.pool_id not in record.excluded_pools:
            record.excluded_pools = [*record.excluded_pools, lease.pool_id]
        what = f"lease {lease.lease_id} on {lease.pool_id} {'failed' if isinstance(event, LeaseFailed) else 'lost'}"
        if event.reason:
            what += f" ({event.reason})"
        stop = stop_reason(record.body, record.replacements, lease, now)
        if stop is None:
            replacement = Replacement(lease=lease, seq=event.seq, whole=not record.lease_ids)
            record.replacements += 1
            stop = await self._replace(claim, record, replacement, now, what, event.at)
            if stop is None:
                return
        record.reasons = [*record.reasons, f"{what}; {stop}"]
        await core.requests.settle_replacement(claim, "placed" if record.lease_ids else "failed", record,
                                               {"outcome": "stopped", "reason": stop})
        FAILOVERS.labels("stopped").inc()
        log.info("request %s: %s; %s", record.request_id, what, stop)

    async def _replace(self, claim: ReplacementClaim, record: RequestRecord, replacement: Replacement,
                       now: datetime, what: str, ended_at: datetime) -> str | None:
        """Placed now (None), queued for capacity (None), or the reason it stops."""
        core, lease = self.core, replacement.lease
        kept = list(record.lease_ids)
        outcome: dict = {"outcome": "replaced", "at": now.isoformat()}

        async def settle(leases: list[LeaseInfo]) -> None:
            record.lease_ids = [*kept, *(new.lease_id for new in leases)]
            outcome["by"] = by_of(leases)
            await core.requests.settle_replacement(claim, "placed", record, outcome)

        try:
            if record.tenant in self.queue.budgets.blocked:  # out of budget: it waits, as its queued requests do
                raise NotPlaced(Decision(reasons=("the tenant's budget is exhausted; placed once it is topped up",)))
            await self.replacer.place(record, replacement, now, settle)
        except NotPlaced as np:
            reasons = "; ".join(np.decision.reasons) or "no capacity matches right now"
            deadline = queue_deadline(record.body, lease, now)
            if np.decision.never:
                return f"not replaced: no other pool can take it ({reasons})"
            if not record.body.queue:
                return f"not replaced: no capacity now and the request does not queue ({reasons})"
            if deadline is not None and deadline <= now:
                return f"not replaced: no capacity before its deadline ({reasons})"
            record.lease_ids, record.replacing, record.deadline_at = kept, replacement, deadline
            record.reasons = [*record.reasons, f"{what}; its replacement waits for capacity ({reasons})"]
            await core.requests.settle_replacement(claim, "queued", record, {"outcome": "queued",
                                                                              "at": now.isoformat()})
            await self.queue.index(record, now)
            core.queue_kick.set()
            FAILOVERS.labels("queued").inc()
            return None
        except Unavailable:
            raise
        except BrokerError as exc:  # e.g. its model left the catalogue
            return f"not replaced: {exc.detail}"
        FAILOVER_SECONDS.observe(max(0.0, (core.clock() - ended_at).total_seconds()))
        await self.replacer.announce(lease, replacement.seq, outcome["by"], now)
        FAILOVERS.labels("replaced").inc()
        return None
