"""``GET /v1/reliability``: the pools with a delivery record, least reliable first (the
ops console's reliability panel; any authenticated role, like pool search). The record
is the broker's (docs/reliability.md), read through common's key builders."""

from __future__ import annotations

import time
from typing import Annotated

from litestar import get
from litestar.params import Parameter

from services.common.delivery import Reliability
from services.common.http import AuthedRequest
from services.common.reliability import POOL, read_reliability, read_scores

from . import registry_of


@get("/v1/reliability", tags=["pools"], summary="Pools with a delivery record, least reliable first")
async def reliability(request: AuthedRequest, limit: Annotated[int, Parameter(ge=1, le=1000)] = 20) -> list[Reliability]:
    registry = registry_of(request)
    scores = await read_scores(registry.redis, registry.keys)
    worst = sorted(scores, key=lambda pool_id: (scores[pool_id], pool_id))[:limit]
    return await read_reliability(registry.redis, registry.keys, POOL, worst, int(time.time() * 1000))
