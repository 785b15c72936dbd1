"""Consuming allocation events exactly once into the ledger.

A durable JetStream pull consumer (shared by every meter replica) delivers the
allocation stream in batches. The events of a batch are grouped by lease; for each lease,
in per-lease ``seq`` order:

1. read the lease's account (a KV entry; cached per replica with its revision);
2. skip every event with ``event.seq <= account.seq``: applied before (a duplicate, a
   redelivery, a replay);
3. compute the account after the remaining events and the ledger entries they post
   (pure: ``accounts.transition``);
4. append those entries to the ledger stream, create-only by deterministic entry id, and
   wait for the acks;
5. write the new account with ``Nats-Expected-Last-Subject-Sequence`` = the revision read
   (on a conflict another replica got there first: reload and go back to 2);
6. ack the events.

The leases of a batch go through these steps together (pipelined: one round trip per step
for the whole batch), and one account write covers all of a lease's events in the batch.
A crash before 4 or between 4 and 5 redelivers the events, which post the same entry ids
again: JetStream refuses them (each entry's subject already holds it, at any age: see
``Ledger.append``). A crash between 5 and 6 redelivers
events that step 2 skips. Events that cannot be decoded or priced go to the dead-letter
stream at once; events whose processing keeps failing go there after
``meter_max_attempts`` attempts (backoff 1, 2, 4, 8 s between them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue
from prometheus_client import Counter

from services.common import tracing
from services.common.jetstream import Publisher, Puller, ensure_consumer, is_wrong_last_sequence
from services.common.lifecycle import forever, stop_tasks
from services.common.messages import AllocEvent
from services.common.settings import Settings
from services.common.subjects import ALLOC, MeterNames, Subjects

from .accounts import (
    MissingPredecessor,
    account_key,
    changed,
    is_duplicate,
    needs_account,
    predecessor_key,
    transition,
)
from .ledger import Ledger, encode
from .model import Account, DeadLetter, LedgerRecord
from .pricing import PricingError, validate

log = logging.getLogger("meter.consumer")

EVENTS = Counter("cb_meter_events", "Allocation events consumed", ["outcome"])  # applied, duplicate, dead
ENTRIES = Counter("cb_meter_ledger_entries", "Ledger entries posted (before de-duplication)")
CONFLICTS = Counter("cb_meter_account_conflicts", "Account updates that lost a race and were retried")
_APPLIED, _DUPLICATE = EVENTS.labels("applied"), EVENTS.labels("duplicate")

_event = msgspec.json.Decoder(AllocEvent)
_account = msgspec.json.Decoder(Account)
_LEASE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class Poison(Exception):
    """An event that can never be applied as it stands."""


class AccountStore:
    """Per-lease accounts in a KV bucket, written with optimistic concurrency. Each replica
    caches what it read or wrote (with the revision): a stale entry only costs a conflict
    and a reload, never a wrong answer."""

    def __init__(self, publisher: Publisher, kv: KeyValue, bucket: str, cache_size: int = 200_000) -> None:
        self.publisher, self.kv, self.bucket = publisher, kv, bucket
        self._cache: OrderedDict[str, tuple[int, Account]] = OrderedDict()
        self._cache_size = cache_size

    def cached(self, key: str) -> tuple[int, Account] | None:
        return self._cache.get(key)

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)

    def remember(self, key: str, revision: int, account: Account) -> None:
        self._cache[key] = (revision, account)
        self._cache.move_to_end(key)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def load(self, key: str) -> tuple[int, Account | None]:
        return (await self.load_many([key]))[key]

    async def load_many(self, keys: list[str], chunk: int = 256) -> dict[str, tuple[int, Account | None]]:
        """The latest account of each key (revision 0 and None where there is none), in one
        batched direct get per ``chunk`` keys."""
        out: dict[str, tuple[int, Account | None]] = dict.fromkeys(keys, (0, None))
        prefix = f"$KV.{self.bucket}."
        for i in range(0, len(keys), chunk):
            subjects = [prefix + k for k in keys[i:i + chunk]]
            request = json.dumps({"multi_last": subjects, "batch": len(subjects)}).encode()
            for msg in await self.publisher.request_many(f"$JS.API.DIRECT.GET.KV_{self.bucket}", request):
                headers = msg.headers or {}
                key = headers.get("Nats-Subject", "")[len(prefix):]
                if key not in out:
                    continue
                if headers.get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
                    continue
                out[key] = (int(headers["Nats-Sequence"]), _account.decode(msg.data))
        for key, (revision, account) in out.items():
            if account is None:
                self.forget(key)
            else:
                self.remember(key, revision, account)
        return out

    async def send(self, key: str, account: Account, revision: int) -> asyncio.Future:
        """Start a write that succeeds iff the key is still at ``revision`` (0: absent)."""
        return await self.publisher.send(f"$KV.{self.bucket}.{key}", encode(account),
                                         {"Nats-Expected-Last-Subject-Sequence": str(revision)})


@dataclass(eq=False)
class _Lease:
    """One lease's events in a batch, on their way through the pipeline."""

    key: str
    items: list[tuple[AllocEvent, Msg]]
    revision: int = 0
    account: Account | None = None
    loaded: bool = False  # account/revision are known (cache, read, or known absent)
    new: Account | None = None
    entries: list[LedgerRecord] = field(default_factory=list)
    write: bool = False  # the new account records something: write it
    applied: int = 0
    duplicates: int = 0
    predecessor: str | None = None  # reserved replacements: the account of the lease replaced
    error: Exception | None = None


class AllocConsumer:
    def __init__(self, nc: NATS, js: JetStreamContext, names: MeterNames, subjects: Subjects, settings: Settings,
                 ledger: Ledger, accounts: AccountStore, clock: Callable[[], datetime]) -> None:
        self.nc, self.js, self.names, self.subjects, self.settings = nc, js, names, subjects, settings
        self.ledger, self.accounts, self.clock = ledger, accounts, clock
        self.stream = subjects.stream(ALLOC)
        self._tasks: list[asyncio.Task] = []
        self._advisory = None
        self._stopping = False
        self.stats = {"applied": 0, "duplicate": 0, "dead": 0, "failed": 0}

    @property
    def max_deliver(self) -> int:
        # the server's bound sits above the meter's own (which dead-letters after
        # meter_max_attempts failed attempts): deliveries cut short by a crash also count
        return max(10, 2 * self.settings.meter_max_attempts)

    async def ensure(self) -> None:
        config = ConsumerConfig(
            durable_name=self.names.durable, filter_subject=self.subjects.events(ALLOC),
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT, ack_wait=self.settings.meter_ack_wait_s,
            max_deliver=self.max_deliver, max_ack_pending=max(20_000, 4 * self.settings.meter_batch), max_waiting=512,
            description="meter: allocation events into the ledger")
        await ensure_consumer(self.js, self.stream, config)

    async def start(self, workers: int = 2) -> None:
        await self.ensure()
        advisory = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.{self.names.durable}"
        self._advisory = await self.nc.subscribe(advisory, queue=f"{self.names.durable}-maxdeliver",
                                                 cb=self._on_max_deliveries)
        self._tasks = [asyncio.create_task(forever(f"consumer worker {i}", self._pull, until=lambda: self._stopping,
                                                   logger=log)) for i in range(workers)]

    async def stop(self) -> None:
        self._stopping = True
        await stop_tasks(self._tasks)
        if self._advisory is not None:
            with contextlib.suppress(Exception):
                await self._advisory.unsubscribe()

    async def pending(self) -> tuple[int, int]:
        """(messages not yet delivered, delivered but not acked)."""
        info = await self.js.consumer_info(self.stream, self.names.durable)
        return info.num_pending or 0, info.num_ack_pending or 0

    # --- the loop -----------------------------------------------------------------------------
    async def _pull(self) -> None:
        """One worker, fetching and applying until an error (a NATS restart, the consumer
        deleted): ``forever`` starts it again, and it makes sure the consumer exists."""
        await self.ensure()
        puller = Puller(self.nc, self.stream, self.names.durable)
        try:
            await puller.start()
            while not self._stopping:
                msgs = await puller.fetch(self.settings.meter_batch, timeout=1.0)
                if msgs:
                    await self.handle(msgs)
        finally:
            with contextlib.suppress(Exception):
                await puller.stop()

    async def handle(self, msgs: list[Msg]) -> None:
        leases: dict[str, _Lease] = {}
        for msg in msgs:
            try:
                event = self.decode(msg.data)
            except Poison as exc:
                await self.dead_letter(msg.subject, msg.metadata.sequence.stream, msg.metadata.num_delivered,
                                       str(exc), msg.data)
                await msg.term()
                continue
            key = account_key(event.lease.tenant, event.lease.lease_id)
            group = leases.get(key)
            if group is None:
                leases[key] = _Lease(key, [(event, msg)])
            else:
                group.items.append((event, msg))
        if not leases:
            return
        try:
            done = await self.apply_leases(list(leases.values()))
        except Exception as exc:  # the whole batch failed (e.g. NATS went away): retry it later
            for group in leases.values():
                for _, msg in group.items:
                    await self._failed(msg, exc)
            return
        applied = duplicates = 0
        debug = log.isEnabledFor(logging.DEBUG)
        for group, error in done:
            if error is None:
                applied += group.applied
                duplicates += group.duplicates
                for event, msg in group.items:
                    if debug:
                        log.debug("applied %s seq %d of lease %s", event.__struct_config__.tag, event.seq,
                                  event.lease.lease_id, extra={"request_id": tracing.from_headers(msg.headers),
                                         "stream_seq": msg.metadata.sequence.stream})
                    await msg.ack()
            else:
                for _, msg in group.items:
                    await self._failed(msg, error)
        self.stats["applied"] += applied
        self.stats["duplicate"] += duplicates
        _APPLIED.inc(applied)
        _DUPLICATE.inc(duplicates)

    @staticmethod
    def decode(data: bytes) -> AllocEvent:
        try:
            event = _event.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Poison(f"undecodable allocation event: {exc}") from exc
        if event.seq < 1:
            raise Poison(f"lease {event.lease.lease_id}: seq must be >= 1, got {event.seq}")
        if not _LEASE_ID.match(event.lease.lease_id):
            raise Poison(f"lease id {event.lease.lease_id[:200]!r} is not 1-128 of A-Z a-z 0-9 _ - "
                         "(it names KV keys and ledger entry ids)")
        try:
            validate(event.lease)
        except PricingError as exc:
            raise Poison(str(exc)) from exc
        return event

    def _compute(self, group: _Lease, now: datetime) -> None:
        account, entries, applied, dups = group.account, [], 0, 0
        predecessor = None
        if group.predecessor is not None:
            cached = self.accounts.cached(group.predecessor)
            predecessor = cached[1] if cached else None
        group.error = None
        for event, _ in group.items:
            if is_duplicate(account, event):
                dups += 1
                continue
            try:
                account, posted = transition(account, event, min_bill_s=self.settings.min_bill_s, now=now,
                                             predecessor=predecessor)
            except MissingPredecessor as exc:
                group.error = exc
                return
            entries += posted
            applied += 1
        group.new = account if applied else None
        group.write = applied > 0 and account is not None and (bool(entries) or changed(group.account, account))
        group.entries, group.applied, group.duplicates = entries, applied, dups

    async def apply_leases(self, groups: list[_Lease]) -> list[tuple[_Lease, Exception | None]]:
        """Steps 1-5 for many leases at once; returns each lease with None (done: ack its
        events) or the error that stopped it. A reserved replacement whose predecessor is in
        the same batch goes in a later round, after that lease's account is written."""
        keys = {g.key for g in groups}
        first, later = [], []
        for group in groups:
            group.items.sort(key=lambda item: item[0].seq)
            group.predecessor = next((k for k in (predecessor_key(e) for e, _ in group.items) if k), None)
            (later if group.predecessor in keys and group.predecessor != group.key else first).append(group)
        if not first:  # (a cycle of replacements: never made by the broker) all in one round
            first, later = later, []
        results = await self._apply_round(first)
        if later:
            results += await self.apply_leases(later)
        return results

    async def _apply_round(self, groups: list[_Lease]) -> list[tuple[_Lease, Exception | None]]:
        now = self.clock()
        results: list[tuple[_Lease, Exception | None]] = []
        pending: list[_Lease] = []
        for group in groups:
            cached = self.accounts.cached(group.key)
            if cached is not None:
                group.revision, group.account = cached
                group.loaded = True
                pending.append(group)
                continue
            # Events that would post or record nothing even on a fresh account (grants,
            # provisioning, renewals) do so on no account: an account only ever records
            # facts (billed, ready, ended). They need no read and no write.
            if any(needs_account(event) for event, _ in group.items):
                pending.append(group)
            else:
                group.applied = len(group.items)
                results.append((group, None))
        for _ in range(8):
            unread = [g for g in pending if not g.loaded]
            unread_keys = [g.key for g in unread]
            unread_keys += sorted({g.predecessor for g in pending if g.predecessor is not None
                                   and self.accounts.cached(g.predecessor) is None} - set(unread_keys))
            if unread_keys:
                loaded = await self.accounts.load_many(unread_keys)
                for group in unread:
                    group.revision, group.account = loaded[group.key]
                    group.loaded = True
            for group in pending:
                self._compute(group, now)
            results += [(g, g.error) for g in pending if g.error is not None]
            pending = [g for g in pending if g.error is None]
            entries = [e for g in pending for e in g.entries]
            if entries:
                await self.ledger.append(entries)
                ENTRIES.inc(len(entries))
            # an account is written only when its lease posted or recorded something
            writes = [(g, await self.accounts.send(g.key, g.new, g.revision)) for g in pending
                      if g.new is not None and g.write]
            results += [(g, None) for g in pending if g.new is None or not g.write]
            if writes:
                await asyncio.wait([f for _, f in writes], timeout=self.accounts.publisher.timeout)
            retry = []
            for group, fut in writes:
                if not fut.done():
                    fut.cancel()
                    results.append((group, TimeoutError("account write not acknowledged")))
                elif fut.exception() is None:
                    assert group.new is not None
                    self.accounts.remember(group.key, fut.result(), group.new)
                    results.append((group, None))
                elif is_wrong_last_sequence(fut.exception()):
                    CONFLICTS.inc()
                    self.accounts.forget(group.key)
                    group.loaded = False
                    retry.append(group)
                else:
                    results.append((group, fut.exception()))  # type: ignore[arg-type]
            if not retry:
                return results
            pending = retry
        results += [(g, RuntimeError("account kept changing under us")) for g in pending]
        return results

    async def apply(self, event: AllocEvent) -> str:
        """Apply one event on its own; ``applied`` or ``duplicate``."""
        group = _Lease(account_key(event.lease.tenant, event.lease.lease_id), [(event, None)])  # type: ignore[list-item]
        [(done, error)] = await self.apply_leases([group])
        if error is not None:
            raise error
        return "applied" if done.applied else "duplicate"

    async def _failed(self, msg: Msg, exc: Exception) -> None:
        attempts = msg.metadata.num_delivered or 1
        self.stats["failed"] += 1
        if attempts >= self.settings.meter_max_attempts:
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
