"""The reliability record follows the allocation stream through one durable JetStream
pull consumer that every meter replica shares (each event goes to one of them), like
``pool_loss``. An event is acknowledged only once the record holds it; a batch that
could not be written (Redis away) comes back, and the script counts each fact once.

The consumer starts from the first event the stream holds, so the record is what the
event record says, whenever the meter was installed."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from services.common.jetstream import Puller, ensure_consumer
from services.common.lifecycle import forever, stop_tasks
from services.common.messages import AllocEvent
from services.common.subjects import ALLOC, Subjects

from .record import RecordLost, ReliabilityRecord

log = logging.getLogger("meter.reliability")
_alloc = msgspec.json.Decoder(AllocEvent)
DURABLE = "meter-reliability"
RETRY_S = 1.0


class ReliabilityFeed:
    def __init__(self, nc: NATS, js: JetStreamContext, subjects: Subjects, record: ReliabilityRecord,
                 batch: int = 256) -> None:
        self.nc, self.js, self.subjects, self.record, self.batch = nc, js, subjects, record, batch
        self.stream = subjects.stream(ALLOC)
        self._tasks: list[asyncio.Task] = []

    async def ensure(self) -> None:
        """The consumer, and a record in Redis to match: a Redis without the record (new,
        or lost) gets the whole stream replayed into it from a fresh consumer, by the one
        replica that claims the rebuild."""
        config = ConsumerConfig(
            durable_name=DURABLE, filter_subject=self.subjects.events(ALLOC), deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=60, max_deliver=-1,
            description="meter: reliability of pools and providers (docs/reliability.md)")
        if not await self.record.claim():
            await ensure_consumer(self.js, self.stream, config)
            return
        # 1. no replica reads on from where the lost record stood
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(self.stream, DURABLE)
        # 2. nothing of the old record is left to be counted again
        await self.record.clear()
        # 3. a consumer from the stream's first event
        await ensure_consumer(self.js, self.stream, config)
        # 4. the record takes writes (the events other replicas were refused come back)
        if not await self.record.open():
            raise RecordLost("the rebuild's claim lapsed before it ended: claimed again")

    async def start(self) -> None:
        try:
            await self.ensure()
        except RecordLost as lost:  # another replica rebuilds it: the feed's loop looks again
            log.warning("reliability record: %s", lost)
        self._tasks = [asyncio.create_task(forever("reliability feed", self._follow, interval=RETRY_S, logger=log))]

    async def stop(self) -> None:
        await stop_tasks(self._tasks)

    async def _follow(self) -> None:
        """Until an error (NATS restarting, the consumer gone): ``forever`` starts it again."""
        await self.ensure()
        puller = Puller(self.nc, self.stream, DURABLE)
        await puller.start()
        try:
            while True:
                msgs = await puller.fetch(self.batch, timeout=1.0)
                if msgs:
                    await self._handle(msgs)
        finally:
            await puller.stop()

    async def _handle(self, msgs: list) -> None:
        events, readable = [], []
        for msg in msgs:
            try:
                events.append(_alloc.decode(msg.data))
                readable.append(msg)
            except msgspec.DecodeError:
                log.warning("undecodable allocation event on %s: skipped", msg.subject)
                await msg.ack()
        try:
            await self.record.apply_all(events)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis away: the batch comes back, counted once
            log.warning("reliability record not written (%r); %d events retried", exc, len(events))
            for msg in readable:
                await msg.nak(delay=RETRY_S)
            if isinstance(exc, RecordLost):
                raise  # ``forever`` starts the feed again: ``ensure`` replays the stream
            return
        for msg in readable:
            await msg.ack()
