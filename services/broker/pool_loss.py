"""Pool loss, durably: the leases of a pool that went offline or was removed end as
``lease.lost`` even if no broker was running when it happened.

A durable consumer on the capacity stream (``feeds.DurableFeed``) delivers
``pool.offline`` and ``pool.removed``; an event is acknowledged only once its leases are
ended, so a broker that was down (or crashed half-way) ends them when it comes back. A
core-NATS subscription would miss every event published while no broker listened, and
those leases would live on, their units counted against whatever pool next took the id
(docs/lifecycle.md, "Pool")."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from services.common.messages import CapacityEvent, PoolOffline, PoolRemoved
from services.common.subjects import CAPACITY, Subjects

from .feeds import DurableFeed

DURABLE = "broker-pool-loss"

PoolLoss = PoolOffline | PoolRemoved


def PoolLossFeed(nc: NATS, js: JetStreamContext, subjects: Subjects,  # noqa: N802 - builds the feed
                 on_loss: Callable[[PoolLoss], Awaitable[object]], batch: int = 64) -> DurableFeed:
    return DurableFeed(nc, js, subjects, kind=CAPACITY, durable=DURABLE, decoder=msgspec.json.Decoder(CapacityEvent),
                       wanted=(PoolOffline, PoolRemoved), handle=on_loss, batch=batch,
                       description="broker: leases of pools gone offline or removed")
