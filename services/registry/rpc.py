"""NATS request/reply for lookups other services must not wait an event for: the
catalogue and the topology in force (``cb.rpc.registry.catalogue|topology``)."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.common.subjects import Subjects

from .service import Registry

QUEUE = "registry"


async def serve_rpc(nc: NATS, subjects: Subjects, registry: Registry) -> None:
    catalogue = msgspec.json.encode(list(registry.catalogue.values()))

    async def on_catalogue(msg: Msg) -> None:
        await msg.respond(catalogue)

    async def on_topology(msg: Msg) -> None:
        await registry.regions.refresh()
        await msg.respond(msgspec.json.encode(registry.regions.topology))

    await nc.subscribe(subjects.rpc("registry", "catalogue"), queue=QUEUE, cb=on_catalogue)
    await nc.subscribe(subjects.rpc("registry", "topology"), queue=QUEUE, cb=on_topology)
