"""Read-only catalogue and topology endpoints, plus region additions (admin)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, put
from litestar.params import Parameter

from services.common.http import PUBLIC, AuthedRequest
from services.common.errors import BadRequest, NotFound
from services.common.messages import Accelerator, Link, Region

from ..service import Registry


class CatalogueController(Controller):
    path = "/v1"
    tags = ["catalogue"]

    @get("/accelerators", summary="The accelerator catalogue", opt=PUBLIC)
    async def accelerators(self, registry: Registry, vendor: str | None = None,
                           stack: str | None = None) -> list[Accelerator]:
        return [a for a in registry.catalogue.values()
                if (vendor is None or a.vendor == vendor) and (stack is None or a.stack == stack)]

    @get("/accelerators/{model:str}", summary="One accelerator model", opt=PUBLIC)
    async def accelerator(self, registry: Registry, model: str) -> Accelerator:
        if model not in registry.catalogue:
            raise NotFound(f"unknown accelerator model {model!r}")
        return registry.catalogue[model]

    @get("/regions", summary="Regions of the topology", opt=PUBLIC)
    async def regions(self, registry: Registry) -> list[Region]:
        await registry.regions.refresh()
        return list(registry.regions.topology.regions)

    @get("/network", summary="Pairwise latency (RTT ms), bandwidth (Gbit/s) and egress price per GB",
         opt=PUBLIC)
    async def network(self, registry: Registry,
                      src: Annotated[str | None, Parameter(max_length=64)] = None,
                      dst: Annotated[str | None, Parameter(max_length=64)] = None) -> list[Link]:
        await registry.regions.refresh()
        for r in (src, dst):
            if r is not None and r not in registry.regions:
                raise BadRequest(f"unknown region {r!r}")
        return [link for link in registry.regions.topology.links
                if (src is None or link.src == src) and (dst is None or link.dst == dst)]

    @put("/regions/{region_id:str}", summary="Add a region (admin); links are derived from its location",
         status_code=200)
    async def add_region(self, request: AuthedRequest, registry: Registry, region_id: str, data: Region) -> Region:
        request.user.require("admin")
        if data.id != region_id:
            raise BadRequest(f"body id {data.id!r} does not match path {region_id!r}")
        await registry.regions.add(data)
        return data
