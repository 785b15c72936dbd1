"""The meter's HTTP endpoints; thin over ``Meter``, which each takes from the app's state
(``meter_of``), as every service's handlers do (docs/decisions.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, Response, get, post, put
from litestar.params import Parameter

from services.common.errors import BadRequest
from services.common.http import AuthedRequest
from services.common.problem_docs import also_served_as

from .invoices import to_csv
from .model import BudgetBody, BudgetView, Invoice
from .service import Meter

Q = Annotated[str | None, Parameter(max_length=200)]


def meter_of(request: AuthedRequest) -> Meter:
    return request.app.state.meter


def _group_by(raw: str | None) -> list[str]:
    if raw is None or raw.strip() == "":
        return []
    return [g.strip() for g in raw.split(",")]


class UsageController(Controller):
    path = "/v1/usage"
    tags = ["usage"]

    @get("/", summary="Posted usage, filtered and grouped; JSON or CSV",
         operation_class=also_served_as("text/csv", "format=csv: one row per group, with a header row"))
    async def usage(self, request: AuthedRequest, tenant: Q = None, period: Q = None,
                    region: Q = None, model: Q = None, provider: Q = None, pool: Q = None,
                    billing: Annotated[Literal["on_demand", "reserved_month", "reserved_year", "interruptible"] | None,
                                       Parameter()] = None,
                    group_by: Q = None,
                    format: Annotated[Literal["json", "csv"], Parameter()] = "json") -> Response:  # noqa: A002
        groups = _group_by(group_by)
        body = meter_of(request).usage(request.user, tenant=tenant, period=period, region=region, model=model,
                                       provider=provider, pool=pool, billing=billing, group_by=groups)
        if format == "csv":
            columns = [*groups, "currency", "amount", "unit_hours", "unit_months", "entries"]
            return Response(to_csv(body["rows"], columns), media_type="text/csv",  # litestar adds the charset
                            headers={"Content-Disposition": 'inline; filename="usage.csv"'})
        return Response(body, media_type="application/json")


class InvoiceController(Controller):
    path = "/v1/invoices"
    tags = ["invoices"]

    @get("/", summary="A tenant's invoices, newest first (ops/admin: ?tenant=)")
    async def list_invoices(self, request: AuthedRequest, tenant: Q = None) -> dict[str, Any]:
        return await meter_of(request).invoices(request.user, tenant)

    @get("/{period:str}", summary="One invoice: a draft while the period is open, final after its grace")
    async def get_invoice(self, request: AuthedRequest,
                          period: Annotated[str, Parameter(max_length=32)], tenant: Q = None) -> Invoice:
        return await meter_of(request).invoice(request.user, period, tenant)


class StatementController(Controller):
    path = "/v1/statements"
    tags = ["statements"]

    @get("/", summary="What each of a provider's pools earned, per period")
    async def statements(self, request: AuthedRequest, provider: Q = None,
                         period: Q = None) -> dict[str, Any]:
        return meter_of(request).statements(request.user, provider, period)


class BudgetController(Controller):
    path = "/v1/budgets"
    tags = ["budgets"]

    @put("/{tenant:str}", summary="Set a tenant's prepaid credit or monthly spend limit (admin)")
    async def put_budget(self, request: AuthedRequest, tenant: Annotated[str, Parameter(max_length=64)],
                         data: BudgetBody) -> BudgetView:
        return await meter_of(request).put_budget(request.user, tenant, data)

    @get("/{tenant:str}", summary="A tenant's budget and spend (the tenant, ops, admin)")
    async def get_budget(self, request: AuthedRequest,
                         tenant: Annotated[str, Parameter(max_length=64)]) -> BudgetView:
        return await meter_of(request).get_budget(request.user, tenant)


class OpsController(Controller):
    path = "/v1"
    tags = ["ops"]

    @get("/deadletters", summary="Events the meter could not apply (ops, admin)")
    async def dead_letters(self, request: AuthedRequest,
                           limit: Annotated[int, Parameter(ge=1, le=1000)] = 100) -> dict[str, Any]:
        return await meter_of(request).dead_letters(request.user, limit)

    @post("/deadletters/{stream_seq:int}/retry", status_code=200,
          summary="Apply a dead-lettered event again from the allocation stream (admin)")
    async def retry(self, request: AuthedRequest,
                    stream_seq: Annotated[int, Parameter(le=2**63 - 1)]) -> dict[str, Any]:
        if stream_seq < 1:  # (and at most int64: larger ones were a 500 from the NATS API)
            raise BadRequest("stream sequence must be >= 1")
        return await meter_of(request).retry_dead_letter(request.user, stream_seq)

    @get("/meter/status", summary="Consumer backlog, ledger position (ops, admin)")
    async def status(self, request: AuthedRequest) -> dict[str, Any]:
        return await meter_of(request).status(request.user)
