"""The agent's only way to the broker and the registry: their public HTTP APIs with the
provider's key. Every call either returns what the service said or raises ``ApiError``
(a 4xx/5xx with its problem details) or ``httpx.TransportError`` (nothing answered); the
callers decide what a failure means for a lease (docs/agent.md, "The agent's loop")."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
import msgspec

from services.common.client_errors import ApiError, raise_for_problem
from services.common.delivery import Access, Workload
from services.common.messages import PoolSpec

__all__ = ["AgentApi", "ApiError", "Assigned"]


class Assigned(msgspec.Struct, frozen=True, kw_only=True):
    """One item of ``GET /v1/assignments``: a lease on one of the provider's pools."""

    lease_id: str
    request_id: str
    tenant: str
    pool_id: str
    model: str
    units: int
    state: str  # provisioning | ready
    delivery: str = ""  # "" = capacity only: nothing to run
    workload: Workload | None = None
    expires_at: datetime | None = None
    # shares (docs/sharing.md): milli of each device, and which devices of the pool (indices
    # in the pool; empty on pools that do not share: the agent picks whole devices)
    milli: int = 1000
    devices: tuple[int, ...] = ()


class AgentApi:
    def __init__(self, broker_url: str, registry_url: str, key: str, timeout: float = 10.0) -> None:
        headers = {"Authorization": f"Bearer {key}", "User-Agent": "cbroker-agent"}
        self.broker = httpx.AsyncClient(base_url=broker_url, headers=headers, timeout=timeout)
        self.registry = httpx.AsyncClient(base_url=registry_url, headers=headers, timeout=timeout)

    async def close(self) -> None:
        await self.broker.aclose()
        await self.registry.aclose()

    # --- registry -------------------------------------------------------------------------
    async def whoami(self) -> dict[str, Any]:
        return raise_for_problem(await self.registry.get("/v1/keys/self")).json()

    async def catalogue(self) -> list[dict[str, Any]]:
        return raise_for_problem(await self.registry.get("/v1/accelerators")).json()

    async def put_pool(self, pool_id: str, spec: PoolSpec) -> dict[str, Any]:
        r = await self.registry.put(f"/v1/pools/{pool_id}", content=msgspec.json.encode(spec),
                                    headers={"Content-Type": "application/json"})
        return raise_for_problem(r).json()

    async def heartbeats(self, pools: list[str], healthy: dict[str, int]) -> dict[str, str]:
        r = await self.registry.post("/v1/heartbeats", json={"pools": pools, "healthy_units": healthy})
        return raise_for_problem(r).json()["pools"]

    async def drain(self, pool_id: str, on: bool = True) -> dict[str, Any]:
        path = f"/v1/pools/{pool_id}/drain"
        r = await (self.registry.post(path) if on else self.registry.delete(path))
        return raise_for_problem(r).json()

    # --- broker ---------------------------------------------------------------------------
    async def assignments(self, limit: int = 1000) -> list[Assigned]:
        r = raise_for_problem(await self.broker.get("/v1/assignments", params={"limit": limit}))
        return msgspec.json.decode(r.content, type=list[Assigned])

    async def ready(self, lease_id: str, access: Access) -> None:
        r = await self.broker.post(f"/v1/leases/{lease_id}/ready", content=msgspec.json.encode({"access": access}),
                                   headers={"Content-Type": "application/json"})
        raise_for_problem(r)

    async def failed(self, lease_id: str, reason: str) -> None:
        raise_for_problem(await self.broker.post(f"/v1/leases/{lease_id}/failed", json={"reason": _line(reason)}))

    async def unhealthy(self, lease_id: str, detail: str) -> None:
        r = await self.broker.post(f"/v1/leases/{lease_id}/health", json={"healthy": False, "detail": _line(detail)})
        raise_for_problem(r)

    async def complete(self, lease_id: str, exit_code: int | None) -> None:
        code = exit_code if exit_code is not None and 0 <= exit_code <= 255 else None
        raise_for_problem(await self.broker.post(f"/v1/leases/{lease_id}/complete", json={"exit_code": code}))


def _line(text: str) -> str:
    """What the broker accepts as a reason: one printable line, at most 1,024 characters."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return (flat or "no reason given")[:1024]
