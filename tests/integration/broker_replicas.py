"""Broker replicas built in the test's own event loop (no HTTP, no background tasks),
over a registry app, real NATS and Redis: a test drives each replica's queue passes and
placements itself and can stop one mid-step at a gate, to lay out a race exactly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from litestar.testing import AsyncTestClient

from services.broker.leases import LeaseStore
from services.broker.service import Broker
from services.broker.world import World
from services.common.auth import Principal
from services.common.keys import Keys
from services.common.messages import LeaseInfo
from services.common.settings import Settings
from services.common.startup import close_connections, open_connections
from services.common.subjects import Subjects
from services.registry.app import create_app as create_registry

from ..helpers import eventually
from .conftest import REGION, pool_body


def tenant(name: str) -> Principal:
    return Principal(role="tenant", subject=name, key_id=f"k-{name}")


class Gate:
    """Stops an awaited method of one object until opened; ``entered`` says a caller is
    waiting at it. Our own code stopped, not a stand-in: what runs after is the real call."""

    def __init__(self, owner: Any, name: str) -> None:
        self.entered, self.open = asyncio.Event(), asyncio.Event()
        original: Callable[..., Awaitable[Any]] = getattr(owner, name)

        async def gated(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            await self.open.wait()
            return await original(*args, **kwargs)

        setattr(owner, name, gated)


async def reached(gate: Gate, task: asyncio.Task) -> bool:
    """Wait until ``task`` waits at ``gate`` (True) or finished without passing it (False)."""
    entered = asyncio.ensure_future(gate.entered.wait())
    await asyncio.wait({entered, task}, return_when=asyncio.FIRST_COMPLETED, timeout=15)
    entered.cancel()
    return gate.entered.is_set()


@dataclass
class Replicas:
    brokers: list[Broker]
    keys: Keys
    subjects: Subjects
    registry: AsyncTestClient
    provider: dict[str, str]

    async def pool(self, pool_id: str, units: int, **over: object) -> None:
        r = await self.registry.put(f"/v1/pools/{pool_id}", json=pool_body(units=units, units_per_node=units, **over),
                                    headers=self.provider)
        assert r.status_code in (200, 201), r.text
        for broker in self.brokers:
            await eventually(lambda b=broker: (state := b.world.engine.get(pool_id)) is not None
                             and state.capacity == units, timeout=10, what=f"a replica sees pool {pool_id}")

    async def sees_free(self, broker: Broker, pool_id: str, free: int) -> None:
        await eventually(lambda: (state := broker.world.engine.get(pool_id)) is not None and state.free == free,
                         timeout=10, what=f"a replica sees {free} free on {pool_id}")

    async def leases_of(self, request_id: str) -> list[LeaseInfo]:
        broker = self.brokers[0]
        out = []
        for name in ("t1", "t2", "t3"):
            out += [lease for lease in await broker.leases.of_tenant(name) if lease.request_id == request_id]
        return out


@contextlib.asynccontextmanager
async def replicas(settings: Settings, n: int = 2) -> AsyncIterator[Replicas]:
    keys, subjects = Keys(settings.prefix), Subjects(settings.prefix)
    async with AsyncTestClient(app=create_registry(settings)) as registry:
        admin = {"Authorization": f"Bearer {settings.admin_key}"}
        r = await registry.post("/v1/keys", json={"role": "provider", "subject": "acme"}, headers=admin)
        provider = {"Authorization": f"Bearer {r.json()['key']}"}
        opened = []
        brokers = []
        try:
            for i in range(n):
                nc, redis, js = await open_connections(settings, subjects, f"broker-{i}", no_echo=True)
                opened.append((nc, redis))
                world = World(nc, js, redis, keys, subjects)
                await world.load()
                await world.start()
                broker = Broker(nc=nc, js=js, redis=redis, keys=keys, subjects=subjects, world=world,
                                leases=LeaseStore(redis, keys))
                await broker.sweep_and_rebuild()
                brokers.append(broker)
            yield Replicas(brokers, keys, subjects, registry, provider)
        finally:
            for nc, redis in opened:
                await close_connections(nc, redis)


__all__ = ["REGION", "Gate", "Replicas", "reached", "replicas", "tenant"]
