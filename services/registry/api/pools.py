"""Provider-facing pool endpoints; thin over ``Registry``."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Response, delete, get, patch, post, put
from litestar.params import Parameter

from services.common.http import AuthedRequest
from services.common.messages import PoolSpec, PoolStatus

from ..domain.pools import BatchHeartbeat, Heartbeat, PoolPatch
from ..service import SearchFilter
from . import registry_of
from ..views import PoolPage, PoolView

PoolId = Annotated[str, Parameter(max_length=200, description="pool id: 1-63 of a-z 0-9 _ -")]


class BulkItem(PoolSpec, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pool_id: str


class PoolController(Controller):
    path = "/v1/pools"
    tags = ["pools"]

    @get("/", summary="Search pools: what is available where, right now")
    async def search(
        self, request: AuthedRequest,
        region: str | None = None, vendor: str | None = None, model: str | None = None,
        stack: str | None = None, provider: str | None = None, status: PoolStatus | None = None,
        min_free: Annotated[int, Parameter(ge=0, le=1_000_000)] = 0,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
        cursor: str | None = None,
    ) -> PoolPage:
        return await registry_of(request).search(SearchFilter(
            region=region, vendor=vendor, model=model, stack=stack, provider=provider, status=status,
            min_free=min_free, limit=limit, cursor=cursor))

    @get("/{pool_id:str}", summary="One pool with its live availability")
    async def get_pool(self, request: AuthedRequest, pool_id: PoolId) -> PoolView:
        return await registry_of(request).view(pool_id)

    @put("/{pool_id:str}", summary="Register or replace a pool", status_code=200)
    async def put_pool(self, request: AuthedRequest, pool_id: PoolId,
                       data: PoolSpec) -> Response[PoolView]:
        view, created = await registry_of(request).register(request.user, pool_id, data)
        return Response(view, status_code=201 if created else 200)

    @post("/bulk", summary="Register or replace many pools (all validated before any is written)")
    async def bulk(self, request: AuthedRequest,
                   data: Annotated[list[BulkItem], Parameter(max_length=5000)]) -> dict[str, Any]:
        items = [(i.pool_id, PoolSpec(**{f: getattr(i, f) for f in PoolSpec.__struct_fields__})) for i in data]
        results = await registry_of(request).register_many(request.user, items)
        return {"created": sum(c for _, c in results), "updated": sum(not c for _, c in results)}

    @patch("/{pool_id:str}", summary="Change capacity or prices")
    async def patch_pool(self, request: AuthedRequest, pool_id: PoolId,
                         data: PoolPatch) -> PoolView:
        return await registry_of(request).patch(request.user, pool_id, data)

    @post("/{pool_id:str}/heartbeat", summary="Keep a pool online (may report healthy units)", status_code=200)
    async def heartbeat(self, request: AuthedRequest, pool_id: PoolId,
                        data: Heartbeat | None = None) -> dict[str, Any]:
        t = await registry_of(request).heartbeat(request.user, pool_id, data.healthy_units if data else None)
        return {"pool_id": pool_id, "status": t.status, "free": t.free}

    @post("/{pool_id:str}/drain", summary="Take no new leases on this pool", status_code=200)
    async def drain(self, request: AuthedRequest, pool_id: PoolId) -> PoolView:
        return await registry_of(request).drain(request.user, pool_id, True)

    @delete("/{pool_id:str}/drain", summary="Undo a drain", status_code=200)
    async def undrain(self, request: AuthedRequest, pool_id: PoolId) -> PoolView:
        return await registry_of(request).drain(request.user, pool_id, False)

    @delete("/{pool_id:str}", summary="Remove a pool", status_code=200)
    async def remove(self, request: AuthedRequest, pool_id: PoolId) -> dict[str, Any]:
        t = await registry_of(request).remove(request.user, pool_id)
        return {"pool_id": pool_id, "removed": True, "leased_at_removal": t.leased}


class HeartbeatController(Controller):
    path = "/v1/heartbeats"
    tags = ["pools"]

    @post("/", summary="Heartbeat many pools at once (a provider agent's report)", status_code=200)
    async def many(self, request: AuthedRequest, data: BatchHeartbeat) -> dict[str, Any]:
        return {"pools": await registry_of(request).heartbeat_many(request.user, data)}
