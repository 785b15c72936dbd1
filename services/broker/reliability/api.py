"""``GET /v1/providers/{provider_id}/reliability`` (thin over ``view``)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get
from litestar.params import Parameter

from services.common.http import AuthedRequest

from .view import ProviderReliability, provider_reliability


class ProviderController(Controller):
    path = "/v1/providers"
    tags = ["reliability"]

    @get("/{provider_id:str}/reliability", summary="A provider's delivery record and its pools' (any role)")
    async def reliability(self, request: AuthedRequest,
                          provider_id: Annotated[str, Parameter(max_length=200)]) -> ProviderReliability:
        broker = request.app.state.broker
        return await provider_reliability(broker.redis, broker.keys, provider_id, broker.world.provider_pools(provider_id))
