"""Durable event feeds shared by the broker replicas: a JetStream pull consumer that
every replica reads (each event goes to one of them) and that acknowledges an event only
once its handler has finished with it. A broker that was down, or crashed half-way,
handles what it missed when it (or another replica) comes back; a core-NATS
subscription would lose every event published while no broker listened.

Used for pool loss (``pool_loss``: leases of a vanished pool end as lost) and for
failover (``failover``: a failed or lost lease is replaced; it reads a work queue of its
own that holds only those endings)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from services.common import tracing
from services.common.jetstream import Puller, ensure_consumer
from services.common.nats_conn import ensure_stream
from services.common.lifecycle import forever, stop_tasks
from services.common.subjects import Subjects

log = logging.getLogger("broker.feeds")
RETRY_S = 1.0  # an event that could not be handled (Redis away) comes back this much later


class Later(Exception):
    """The handler cannot decide now (another replica holds what it needs): the event
    comes back after ``delay_s``, unacknowledged meanwhile."""

    def __init__(self, delay_s: float, why: str = "") -> None:
        super().__init__(why or f"retry in {delay_s}s")
        self.delay_s = delay_s


class DurableFeed:
    """``handle`` runs for every event of ``wanted`` (others are acknowledged unread),
    one after the other, or (``parallel``) up to ``batch`` at once, each acknowledged when
    its own handler returns."""

    def __init__(self, nc: NATS, js: JetStreamContext, subjects: Subjects, *, kind: str, durable: str,
                 decoder: msgspec.json.Decoder, wanted: tuple[type, ...],
                 handle: Callable[[Any], Awaitable[object]], description: str,
                 ack_wait_s: float = 60.0, batch: int = 64, parallel: bool = False,
                 work: StreamConfig | None = None) -> None:
        """``kind``: an event stream, read from the events that come after the consumer's
        creation; or ``work``: a work-queue stream (created here if missing), read whole."""
        self.nc, self.js, self.subjects = nc, js, subjects
        self.kind, self.durable, self.decoder, self.wanted = kind, durable, decoder, wanted
        self.handle, self.description = handle, description
        self.ack_wait_s, self.batch, self.parallel = ack_wait_s, batch, parallel
        self.work = work
        self.stream = work.name if work is not None else subjects.stream(kind)
        self._tasks: list[asyncio.Task] = []

    async def ensure(self) -> None:
        """An event stream's consumer is created on first start, from the events that come
        next: a broker installed over an old stream must not replay years of them. A work
        queue holds only work not yet done, so its consumer takes all of it. Every later
        start finds it."""
        if self.work is not None:
            await ensure_stream(self.js, self.work)
        config = ConsumerConfig(
            durable_name=self.durable,
            filter_subject=self.work.subjects[0] if self.work is not None else self.subjects.events(self.kind),
            deliver_policy=DeliverPolicy.ALL if self.work is not None else DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s, max_deliver=-1, description=self.description)
        await ensure_consumer(self.js, self.stream, config)

    async def start(self) -> None:
        await self.ensure()
        self._tasks = [asyncio.create_task(forever(self.durable, self._follow, interval=RETRY_S, logger=log))]

    async def stop(self) -> None:
        await stop_tasks(self._tasks)

    async def _follow(self) -> None:
        """Until an error (NATS restarting, the consumer gone): ``forever`` starts it again."""
        await self.ensure()
        puller = Puller(self.nc, self.stream, self.durable)
        await puller.start()
        running: set[asyncio.Task] = set()
        room = asyncio.Event()
        room.set()
        try:
            while True:
                if not self.parallel:
                    for msg in await puller.fetch(self.batch, timeout=1.0):
                        await self._handle(msg)
                    continue
                # up to ``batch`` events in hand at once, and more fetched as soon as one is
                # done: a slow one (a replacement racing for units) holds up no other
                await room.wait()
                for msg in await puller.fetch(self.batch - len(running), timeout=1.0):
                    task = asyncio.create_task(self._handle(msg))
                    running.add(task)
                    task.add_done_callback(lambda t: (running.discard(t), room.set()))
                if len(running) >= self.batch:
                    room.clear()
        finally:
            for task in running:
                task.cancel()
            await puller.stop()

    async def _handle(self, msg: Msg) -> None:
        try:
            event = self.decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("undecodable event on %s: skipped", msg.subject)
            await msg.ack()
            return
        if isinstance(event, self.wanted):
            try:
                with tracing.bound(tracing.from_headers(msg.headers)):  # what it emits carries the request id
                    await self.handle(event)
            except asyncio.CancelledError:
                raise
            except Later as later:
                await msg.nak(delay=later.delay_s)
                return
            except Exception as exc:  # noqa: BLE001 - Redis or NATS away: the event comes back
                log.warning("%s: %s not handled yet (%r); retried", self.durable, type(event).__name__, exc)
                await msg.nak(delay=RETRY_S)
                return
        await msg.ack()
