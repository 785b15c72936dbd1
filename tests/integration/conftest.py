from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from services.common.settings import Settings
from services.registry.app import create_app as create_registry

MODEL = "nvidia-a100-sxm-80gb"
REGION = "cn-yrd"


def pool_body(**over: object) -> dict:
    body = {"region": REGION, "zone": "a", "model": MODEL, "units": 16, "units_per_node": 8,
            "prices": {"currency": "USD", "on_demand": "2.10", "reserved_month": "1100",
                       "reserved_year": "900", "interruptible": "0.80"}}
    body.update(over)
    return body


class Api:
    """The registry through its real HTTP surface, with a key per role."""

    def __init__(self, client: AsyncTestClient, admin_key: str) -> None:
        self.client = client
        self.admin = {"Authorization": f"Bearer {admin_key}"}

    async def key(self, role: str, subject: str = "") -> dict[str, str]:
        r = await self.client.post("/v1/keys", json={"role": role, "subject": subject}, headers=self.admin)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['key']}"}

    async def put_pool(self, pool_id: str, headers: dict[str, str], **over: object):
        return await self.client.put(f"/v1/pools/{pool_id}", json=pool_body(**over), headers=headers)


@pytest.fixture
async def registry_api(settings: Settings, nc) -> AsyncIterator[Api]:  # nc: streams exist, cleaned after
    async with AsyncTestClient(app=create_registry(settings)) as client:
        yield Api(client, settings.admin_key or "")


def with_settings(settings: Settings, **changes: object) -> Settings:
    return msgspec.structs.replace(settings, **changes)
