"""A merged, resumable feed over the event streams, for one watcher.

One ephemeral *ordered* push consumer per stream (the server filters by subject, the
client library re-creates the consumer from the last sequence if it sees a gap), all
feeding one queue. Every item carries the cursor after it (see
``domain/event_scope.py``). The consumers live exactly as long as the watcher: the
generator's ``finally`` unsubscribes (shielded from the cancellation that a client
disconnect delivers), and the server drops an ephemeral consumer without interest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import anyio
import msgspec
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from services.common.subjects import Subjects

from .domain.event_scope import Cursor, Plan, Since, StreamPlan

QUEUE_MAX = 10_000


class _Lease(msgspec.Struct):
    provider: str = ""


class _AllocProbe(msgspec.Struct):
    """Just enough of an allocation event to apply the provider check."""

    lease: _Lease = msgspec.field(default_factory=_Lease)


class _TypeProbe(msgspec.Struct):
    type: str = ""


_alloc_probe = msgspec.json.Decoder(_AllocProbe)
_type_probe = msgspec.json.Decoder(_TypeProbe)


@dataclass(frozen=True)
class FeedItem:
    kind: str
    seq: int
    subject: str
    data: bytes  # the event as published (JSON)
    cursor: Cursor  # position after this item

    def envelope(self) -> bytes:
        """What a watcher gets: where the event came from, and the event unchanged."""
        return (b'{"kind":"' + self.kind.encode() + b'","seq":' + str(self.seq).encode() + b',"subject":"'
                + self.subject.encode() + b'","event":' + self.data + b"}")


async def _start_seq_at(js: JetStreamContext, stream: str, at: datetime) -> int:
    """The first sequence of ``stream`` at or after ``at``: the server answers through a
    throw-away consumer (its ``delivered`` is one before where it would start)."""
    info = await js.add_consumer(stream, ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=at.isoformat().replace("+00:00", "Z"),
        ack_policy=AckPolicy.NONE, inactive_threshold=5.0, mem_storage=True))
    try:
        return (info.delivered.stream_seq if info.delivered else 0) + 1
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, info.name)


async def start_positions(js: JetStreamContext, subjects: Subjects, plan: Plan, since: Since) -> tuple[Cursor, Cursor]:
    """``(cursor, last)``: where each planned stream starts (as "last sequence sent") and
    each stream's last sequence now (for a feed that stops once it has caught up)."""
    cursor: Cursor = {}
    last: Cursor = {}
    for sp in plan.streams:
        name = subjects.stream(sp.kind)
        try:
            state = (await js.stream_info(name)).state
        except NotFoundError:
            state = None
        last[sp.kind] = state.last_seq if state else 0
        if since.cursor is not None:
            cursor[sp.kind] = since.cursor.get(sp.kind, 0)
        elif since.beginning:
            cursor[sp.kind] = 0
        elif since.time is not None and state is not None and state.messages:
            cursor[sp.kind] = await _start_seq_at(js, name, since.time) - 1
        else:
            cursor[sp.kind] = last[sp.kind]
    if since.cursor is not None:  # kinds outside this plan keep their place for a later, wider watcher
        cursor = {**since.cursor, **cursor}
    return cursor, last


class EventFeed:
    """Iterate ``items()``; ``None`` items are idle ticks (every ``idle_s``) so the caller
    can send keep-alives. With ``follow=False`` the feed ends once every stream has
    delivered what it held when the feed started."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, plan: Plan, cursor: Cursor, last: Cursor, *,
                 follow: bool = True, idle_s: float = 15.0) -> None:
        self.js, self.subjects, self.plan = js, subjects, plan
        self.cursor = dict(cursor)
        self.last = last
        self.follow, self.idle_s = follow, idle_s
        self._queue: asyncio.Queue[tuple[StreamPlan, int, int, str, bytes]] = asyncio.Queue(QUEUE_MAX)
        self._subs: list = []

    async def _subscribe(self, sp: StreamPlan) -> None:
        async def on_msg(msg) -> None:  # noqa: ANN001
            meta = msg.metadata
            await self._queue.put((sp, meta.sequence.stream, meta.num_pending, msg.subject, msg.data))

        start = self.cursor.get(sp.kind, 0) + 1
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
                                inactive_threshold=10.0)
        sub = await self.js.subscribe(sp.filter_subject, stream=self.subjects.stream(sp.kind), cb=on_msg,
                                      ordered_consumer=True, config=config, idle_heartbeat=5.0)
        self._subs.append(sub)

    def _pending_done(self) -> set[str]:
        """Streams with nothing to deliver before the end (``follow=False``)."""
        return {sp.kind for sp in self.plan.streams if self.cursor.get(sp.kind, 0) >= self.last.get(sp.kind, 0)}

    def _keep(self, sp: StreamPlan, data: bytes) -> bool:
        if sp.provider is not None:
            try:
                if _alloc_probe.decode(data).lease.provider != sp.provider:
                    return False
            except msgspec.DecodeError:
                return False
        if self.plan.types:
            try:
                return _type_probe.decode(data).type in self.plan.types
            except msgspec.DecodeError:
                return False
        return True

    async def open(self) -> None:
        """Create the consumers (a watcher told "ready" after this misses nothing)."""
        if not self._subs:
            for sp in self.plan.streams:
                await self._subscribe(sp)

    async def items(self) -> AsyncIterator[FeedItem | None]:
        try:
            await self.open()
            done = self._pending_done()
            if not self.follow:
                done |= await self._empty_streams()
            while self.follow or len(done) < len(self.plan.streams):
                try:
                    sp, seq, pending, subject, data = await asyncio.wait_for(self._queue.get(), self.idle_s)
                except TimeoutError:
                    yield None
                    continue
                if seq <= self.cursor.get(sp.kind, 0):
                    continue  # an ordered consumer's restart may repeat what was sent
                if not self.follow and seq > self.last.get(sp.kind, 0):
                    done.add(sp.kind)
                    continue
                self.cursor[sp.kind] = seq
                if not self.follow and (pending == 0 or seq >= self.last.get(sp.kind, 0)):
                    done.add(sp.kind)
                if self._keep(sp, data):
                    yield FeedItem(sp.kind, seq, subject, data, dict(self.cursor))
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()

    async def _empty_streams(self) -> set[str]:
        """Streams whose filter matches nothing between the start and the end: no
        message will come to say so, the consumer's pending count does."""
        empty = set()
        for sp, sub in zip(self.plan.streams, self._subs, strict=True):
            with contextlib.suppress(Exception):
                info = await sub.consumer_info()
                if info.num_pending == 0 and not info.delivered.consumer_seq:  # nothing matched, nothing sent
                    empty.add(sp.kind)
        return empty

    async def close(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            info = None
            with contextlib.suppress(Exception):  # the consumer now (an ordered one is renamed on each reset)
                info = await sub.consumer_info()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if info is not None:
                with contextlib.suppress(Exception):  # else the server drops it after inactive_threshold
                    await self.js.delete_consumer(info.stream_name, info.name)
