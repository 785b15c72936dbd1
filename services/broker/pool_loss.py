"""Pool loss, durably: the leases of a pool that went offline or was removed end as
``lease.lost`` even if no broker was running when it happened.

A durable JetStream pull consumer on the capacity stream, shared by every broker replica
(each event goes to one of them), delivers ``pool.offline`` and ``pool.removed``; an
event is acknowledged only once its leases are ended, so a broker that was down (or
crashed half-way) ends them when it comes back. A core-NATS subscription would miss
every event published while no broker listened, and those leases would live on, their
units counted against whatever pool next took the id (docs/lifecycle.md, "Pool").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.common import tracing
from services.common.jetstream import Puller, ensure_consumer
from services.common.lifecycle import forever, stop_tasks
from services.common.messages import CapacityEvent, PoolOffline, PoolRemoved
from services.common.subjects import CAPACITY, Subjects

log = logging.getLogger("broker.pool_loss")
_capacity = msgspec.json.Decoder(CapacityEvent)
DURABLE = "broker-pool-loss"
RETRY_S = 1.0  # a loss that could not be handled (Redis away) comes back this much later

PoolLoss = PoolOffline | PoolRemoved


class PoolLossFeed:
    def __init__(self, nc: NATS, js: JetStreamContext, subjects: Subjects,
                 on_loss: Callable[[PoolLoss], Awaitable[object]], batch: int = 64) -> None:
        self.nc, self.js, self.subjects, self.on_loss, self.batch = nc, js, subjects, on_loss, batch
        self.stream = subjects.stream(CAPACITY)
        self._tasks: list[asyncio.Task] = []

    async def ensure(self) -> None:
        """Created on first start, from the events that come next: a broker installed over
        an old stream must not replay years of removals. Every later start finds it."""
        config = ConsumerConfig(
            durable_name=DURABLE, filter_subject=self.subjects.events(CAPACITY), deliver_policy=DeliverPolicy.NEW,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=60, max_deliver=-1,
            description="broker: leases of pools gone offline or removed")
        await ensure_consumer(self.js, self.stream, config)

    async def start(self) -> None:
        await self.ensure()
        self._tasks = [asyncio.create_task(forever("pool-loss feed", self._follow, interval=RETRY_S, logger=log))]

    async def stop(self) -> None:
        await stop_tasks(self._tasks)

    async def _follow(self) -> None:
        """Until an error (NATS restarting, the consumer gone): ``forever`` starts it again."""
        await self.ensure()
        puller = Puller(self.nc, self.stream, DURABLE)
        await puller.start()
        try:
            while True:
                for msg in await puller.fetch(self.batch, timeout=1.0):
                    await self._handle(msg)
        finally:
            await puller.stop()

    async def _handle(self, msg: Msg) -> None:
        try:
            event = _capacity.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("undecodable capacity event on %s: skipped", msg.subject)
            await msg.ack()
            return
        if isinstance(event, (PoolOffline, PoolRemoved)):
            try:
                with tracing.bound(tracing.from_headers(msg.headers)):  # lease.lost events carry the request id
                    await self.on_loss(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis or NATS away: the event comes back
                log.warning("leases of pool %s not ended yet (%r); retried", event.pool_id, exc)
                await msg.nak(delay=RETRY_S)
                return
        await msg.ack()
