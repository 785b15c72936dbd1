"""Read-only catalogue and topology endpoints, plus region additions (admin)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post, put
from litestar.params import Parameter

from services.common.http import PUBLIC, AuthedRequest
from services.common.errors import BadRequest, NotFound
from services.common.messages import Accelerator, Link, Region

from ..service import Registry

ALL_LINKS_MAX_REGIONS = 100  # GET /v1/network without src or dst: at most 10,000 links
BULK_MAX = 5000


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
        return list(registry.regions.network.regions.values())

    @get("/network", summary="Pairwise latency (RTT ms), bandwidth (Gbit/s) and egress price per GB",
         description=f"Every link from `src` and/or to `dst`. Without either, the whole mesh (n² links), "
                     f"refused with 400 above {ALL_LINKS_MAX_REGIONS} regions.", opt=PUBLIC)
    async def network(self, registry: Registry,
                      src: Annotated[str | None, Parameter(max_length=64)] = None,
                      dst: Annotated[str | None, Parameter(max_length=64)] = None) -> list[Link]:
        book = registry.regions
        for r in (src, dst):
            if r is not None and not await book.known(r):
                raise BadRequest(f"unknown region {r!r}")
        if src is None and dst is None and len(book.network) > ALL_LINKS_MAX_REGIONS:
            raise BadRequest(f"the topology has {len(book.network)} regions ({len(book.network) ** 2} links): "
                             "ask for the links from one region (?src=) or to one (?dst=)")
        return list(book.network.links(src, dst))

    @put("/regions/{region_id:str}", summary="Add or change a region (admin); links are derived from its location",
         status_code=200)
    async def add_region(self, request: AuthedRequest, registry: Registry, region_id: str, data: Region) -> Region:
        request.user.require("admin")
        if data.id != region_id:
            raise BadRequest(f"body id {data.id!r} does not match path {region_id!r}")
        await registry.regions.add(data)
        return data

    @post("/regions/bulk", summary="Add or change many regions (admin; all validated before any is written)",
          status_code=200)
    async def add_regions(self, request: AuthedRequest, registry: Registry,
                          data: Annotated[list[Region], Parameter(max_length=BULK_MAX)]) -> dict[str, int]:
        request.user.require("admin")
        written = await registry.regions.add_many(data)
        return {"written": written, "unchanged": len(data) - written}
