"""NATS request/reply for lookups other services must not wait an event for: the
catalogue (``cb.rpc.registry.catalogue``). The topology is not served here: it lives in
the ``regions`` bucket, which every service reads incrementally (``docs/topology.md``)."""

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

    await nc.subscribe(subjects.rpc("registry", "catalogue"), queue=QUEUE, cb=on_catalogue)
