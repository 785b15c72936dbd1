"""A registry and a broker app side by side (in-process, real NATS/Redis/HTTP stack),
with a small world of pools, for broker tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from litestar.testing import AsyncTestClient

from services.broker.app import create_app as create_broker
from services.common.settings import Settings
from services.meter.app import create_app as create_meter
from services.registry.app import create_app as create_registry

from .conftest import pool_body


@dataclass
class World:
    registry: AsyncTestClient
    broker: AsyncTestClient
    admin: dict[str, str]
    provider: dict[str, str]
    tenants: dict[str, dict[str, str]]

    async def key(self, role: str, subject: str = "") -> dict[str, str]:
        r = await self.registry.post("/v1/keys", json={"role": role, "subject": subject}, headers=self.admin)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['key']}"}

    async def pool(self, pool_id: str, **over: object) -> dict:
        r = await self.registry.put(f"/v1/pools/{pool_id}", json=pool_body(**over), headers=self.provider)
        assert r.status_code in (200, 201), r.text
        return r.json()

    async def free(self, pool_id: str) -> int:
        return (await self.registry.get(f"/v1/pools/{pool_id}", headers=self.admin)).json()["free"]

    async def request(self, tenant: str, body: dict, headers: dict[str, str] | None = None):
        return await self.broker.post("/v1/requests", json=body, headers={**self.tenants[tenant], **(headers or {})})


@contextlib.asynccontextmanager
async def broker_world(settings: Settings, pools: dict[str, dict] | None = None,
                       meter: bool = False) -> AsyncIterator[World]:
    """``meter``: a meter app runs beside them (it writes the reliability record the
    broker ranks with)."""
    async with AsyncTestClient(app=create_registry(settings)) as registry:
        admin = {"Authorization": f"Bearer {settings.admin_key}"}
        world = World(registry, None, admin, {}, {})  # type: ignore[arg-type]
        world.provider = await world.key("provider", "acme")
        world.tenants = {"t1": await world.key("tenant", "t1"), "t2": await world.key("tenant", "t2")}
        for pool_id, over in (pools or {}).items():
            await world.pool(pool_id, **over)
        async with contextlib.AsyncExitStack() as stack:
            if meter:
                await stack.enter_async_context(AsyncTestClient(app=create_meter(settings)))
            world.broker = await stack.enter_async_context(AsyncTestClient(app=create_broker(settings)))
            yield world
