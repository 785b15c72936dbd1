"""``GET /v1/capacity``: units by region × model and the queue depth, in one call (the
ops console polls it; open to every authenticated role, like pool search)."""

from __future__ import annotations

from litestar import get

from services.common.http import AuthedRequest

from ..capacity import CapacitySummary


@get("/v1/capacity", tags=["pools"], summary="Capacity by region and model (free, leased), queue depth")
async def capacity(request: AuthedRequest) -> CapacitySummary:
    return await request.app.state.capacity.get()
