"""Consuming allocation events exactly once into the ledger.

A durable JetStream pull consumer (shared by every meter replica) delivers the
allocation stream. For each event, in per-lease ``seq`` order:

1. read the lease's account (a KV entry; cached per replica with its revision);
2. if ``event.seq <= account.seq`` it was applied before: ack, done;
3. otherwise compute the entries it posts (pure: ``accounts.transition``) and append them
   to the ledger stream with deterministic ``Nats-Msg-Id``s, waiting for the acks;
4. write the new account with ``Nats-Expected-Last-Subject-Sequence`` = the revision read
   (on a conflict another replica got there first: reload and go back to 2);
5. ack the event.

A crash before 3 or between 3 and 4 redelivers the event, which posts the same entry ids
again: JetStream drops them (7-day duplicate window). A crash between 4 and 5 redelivers
an event that step 2 skips. Events that cannot be decoded or priced go to the dead-letter
stream at once; events whose processing keeps failing go there after
``meter_max_attempts`` attempts (backoff 1, 2, 4, 8 s between them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from prometheus_client import Counter

from services.common.messages import AllocEvent
from services.common.subjects import ALLOC, Subjects

from .accounts import account_key, is_duplicate, transition
from .ledger import PUBLISH_TIMEOUT_S, Ledger, encode
from .model import Account, DeadLetter
from .pricing import PricingError, validate
from .settings import MeterNames, MeterSettings

log = logging.getLogger("meter.consumer")

EVENTS = Counter("cb_meter_events", "Allocation events consumed", ["outcome"])  # applied, duplicate, dead
ENTRIES = Counter("cb_meter_ledger_entries", "Ledger entries posted (before de-duplication)")
CONFLICTS = Counter("cb_meter_account_conflicts", "Account updates that lost a race and were retried")

_event = msgspec.json.Decoder(AllocEvent)
_account = msgspec.json.Decoder(Account)
WRONG_LAST_SEQUENCE = (10071, 10164)


class Poison(Exception):
    """An event that can never be applied as it stands."""


class Conflict(Exception):
    pass


class AccountStore:
    """Per-lease accounts in a KV bucket, written with optimistic concurrency. Each replica
    caches what it read or wrote (with the revision): a stale entry only costs a conflict
    and a reload, never a wrong answer."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str, cache_size: int = 200_000) -> None:
        self.js, self.kv, self.bucket = js, kv, bucket
        self._cache: OrderedDict[str, tuple[int, Account]] = OrderedDict()
        self._cache_size = cache_size

    def cached(self, key: str) -> tuple[int, Account] | None:
        return self._cache.get(key)

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)

    def _remember(self, key: str, revision: int, account: Account) -> None:
        self._cache[key] = (revision, account)
        self._cache.move_to_end(key)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def load(self, key: str) -> tuple[int, Account | None]:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            self.forget(key)
            return 0, None
        account = _account.decode(entry.value)
        self._remember(key, entry.revision, account)
        return entry.revision, account

    async def write(self, key: str, account: Account, revision: int) -> int:
        """Write iff the key is still at ``revision`` (0: does not exist yet)."""
        try:
            ack = await self.js.publish(f"$KV.{self.bucket}.{key}", encode(account), timeout=PUBLISH_TIMEOUT_S,
                                        headers={"Nats-Expected-Last-Subject-Sequence": str(revision)})
        except APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                self.forget(key)
                raise Conflict(key) from exc
            raise
        self._remember(key, ack.seq, account)
        return ack.seq


class AllocConsumer:
    def __init__(self, nc: NATS, js: JetStreamContext, names: MeterNames, subjects: Subjects, ms: MeterSettings,
                 ledger: Ledger, accounts: AccountStore, clock: Callable[[], datetime]) -> None:
        self.nc, self.js, self.names, self.subjects, self.ms = nc, js, names, subjects, ms
        self.ledger, self.accounts, self.clock = ledger, accounts, clock
        self.stream = subjects.stream(ALLOC)
        self._tasks: list[asyncio.Task] = []
        self._advisory = None
        self.stats = {"applied": 0, "duplicate": 0, "dead": 0, "failed": 0}

    @property
    def max_deliver(self) -> int:
        # the server's bound sits above the meter's own (which dead-letters after
        # meter_max_attempts failed attempts): deliveries cut short by a crash also count
        return max(10, 2 * self.ms.meter_max_attempts)

    async def ensure(self) -> None:
        config = ConsumerConfig(
            durable_name=self.names.durable, filter_subject=self.subjects.events(ALLOC),
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ms.meter_ack_wait_s,
            max_deliver=self.max_deliver, max_ack_pending=max(20_000, 4 * self.ms.meter_batch), max_waiting=512,
            description="meter: allocation events into the ledger")
        try:
            await self.js.consumer_info(self.stream, self.names.durable)
        except NotFoundError:
            try:
                await self.js.add_consumer(self.stream, config)
            except APIError as exc:  # another replica created it
                if exc.err_code not in (10148, 10013):
                    raise

    async def start(self, workers: int = 2) -> None:
        await self.ensure()
        advisory = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.{self.names.durable}"
        self._advisory = await self.nc.subscribe(advisory, queue=f"{self.names.durable}-maxdeliver",
                                                 cb=self._on_max_deliveries)
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._advisory is not None:
            with contextlib.suppress(Exception):
                await self._advisory.unsubscribe()

    async def pending(self) -> tuple[int, int]:
        """(messages not yet delivered, delivered but not acked)."""
        info = await self.js.consumer_info(self.stream, self.names.durable)
        return info.num_pending or 0, info.num_ack_pending or 0

    # --- the loop -----------------------------------------------------------------------------
    async def _run(self, worker: int) -> None:
        while True:
            sub = None
            try:
                sub = await self.js.pull_subscribe_bind(self.names.durable, stream=self.stream)
                while True:
                    try:
                        msgs = await sub.fetch(self.ms.meter_batch, timeout=1.0)
                    except TimeoutError:
                        continue
                    await self.handle(msgs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS restart, consumer being created: keep going
                log.warning("consumer worker %d restarting after %r", worker, exc)
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    await self.ensure()
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def handle(self, msgs: list[Msg]) -> None:
        groups: dict[str, list[tuple[AllocEvent, Msg]]] = {}
        for msg in msgs:
            try:
                event = self.decode(msg.data)
            except Poison as exc:
                await self.dead_letter(msg.subject, msg.metadata.sequence.stream, msg.metadata.num_delivered,
                                       str(exc), msg.data)
                await msg.term()
                continue
            groups.setdefault(event.lease.lease_id, []).append((event, msg))
        await asyncio.gather(*(self._lease(items) for items in groups.values()))

    @staticmethod
    def decode(data: bytes) -> AllocEvent:
        try:
            event = _event.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Poison(f"undecodable allocation event: {exc}") from exc
        if event.seq < 1:
            raise Poison(f"lease {event.lease.lease_id}: seq must be >= 1, got {event.seq}")
        try:
            validate(event.lease)
        except PricingError as exc:
            raise Poison(str(exc)) from exc
        return event

    async def _lease(self, items: list[tuple[AllocEvent, Msg]]) -> None:
        items.sort(key=lambda x: x[0].seq)
        for i, (event, msg) in enumerate(items):
            try:
                outcome = await self.apply(event)
            except Exception as exc:
                for _, later in items[i:]:
                    await self._failed(later, exc)
                return
            self.stats[outcome] += 1
            EVENTS.labels(outcome).inc()
            await msg.ack()

    async def apply(self, event: AllocEvent) -> str:
        """Apply one event to its lease's account; ``applied`` or ``duplicate``."""
        lease = event.lease
        key = account_key(lease.tenant, lease.lease_id)
        cached = self.accounts.cached(key)
        if cached is not None:
            revision, account = cached
        else:
            # an event that posts nothing on a fresh account (a grant or renewal billed per
            # second) is written blind as a create: if the account exists, the conflict
            # reloads it. Anything that posts entries reads the account first.
            _, entries = transition(None, event, min_bill_s=self.ms.min_bill_s, now=self.clock())
            revision, account = (0, None) if not entries else await self.accounts.load(key)
        while True:
            if is_duplicate(account, event):
                return "duplicate"
            new, entries = transition(account, event, min_bill_s=self.ms.min_bill_s, now=self.clock())
            if entries:
                await self.ledger.append(entries)
                ENTRIES.inc(len(entries))
            try:
                await self.accounts.write(key, new, revision)
                return "applied"
            except Conflict:
                CONFLICTS.inc()
                revision, account = await self.accounts.load(key)

    async def _failed(self, msg: Msg, exc: Exception) -> None:
        attempts = msg.metadata.num_delivered or 1
        self.stats["failed"] += 1
        if attempts >= self.ms.meter_max_attempts:
            log.error("event at %s seq %d failed %d times (%r): dead-lettered", msg.subject,
                      msg.metadata.sequence.stream, attempts, exc)
            with contextlib.suppress(Exception):
                await self.dead_letter(msg.subject, msg.metadata.sequence.stream, attempts,
                                       f"failed {attempts} times: {exc!r}", msg.data)
                await msg.term()
            return
        log.warning("event at %s seq %d failed (attempt %d): %r", msg.subject, msg.metadata.sequence.stream,
                    attempts, exc)
        with contextlib.suppress(Exception):
            await msg.nak(delay=min(2.0 ** (attempts - 1), 30.0))

    # --- dead letters -------------------------------------------------------------------------
    async def dead_letter(self, subject: str, stream_seq: int, attempts: int, error: str, data: bytes) -> None:
        letter = DeadLetter(id=f"dlq.{self.stream}.{stream_seq}", at=self.clock(), stream=self.stream,
                            subject=subject, stream_seq=stream_seq, attempts=attempts, error=error[:2000],
                            data=data.decode("utf-8", errors="replace")[:100_000])
        await self.js.publish(self.names.dlq, encode(letter), headers={"Nats-Msg-Id": letter.id})
        self.stats["dead"] += 1
        EVENTS.labels("dead").inc()

    async def _on_max_deliveries(self, msg: Msg) -> None:
        """The server gave up redelivering (the meter died on it too often): never drop it
        silently: dead-letter it so that ops see it (and can retry it)."""
        try:
            advisory = json.loads(msg.data)
            seq = int(advisory["stream_seq"])
            raw = await self.js.get_msg(self.stream, seq)
            await self.dead_letter(raw.subject or "", seq, int(advisory.get("deliveries", 0)),
                                   "delivered the maximum number of times without an ack", raw.data or b"")
        except Exception:
            log.exception("could not dead-letter after max deliveries: %s", msg.data[:500])

    async def retry(self, stream_seq: int) -> str:
        """Apply a (dead-lettered) event again straight from the allocation stream."""
        raw = await self.js.get_msg(self.stream, stream_seq)
        return await self.apply(self.decode(raw.data or b""))
