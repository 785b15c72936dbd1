"""App-facing HTTP endpoints; thin over ``Broker``.

The broker is taken from the app's state (``broker_of``), not injected: litestar's
dependency resolution costs a request ~19 us, about 5% of a placement's CPU
(docs/benchmarks.md, session 4)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Controller, delete, get, post
from litestar.openapi import ResponseSpec
from litestar.params import Parameter, QueryParameter

from services.common.deadlines import Deadlines
from services.common.http import AuthedRequest, JsonAnswer, raw_header

from services.common.delivery import CompleteBody, FailedBody, HealthBody, LeaseState, ReadyBody
from services.common.errors import BrokerError, Unavailable

from .domain.requests import ComputeRequest
from .idempotency import Keyring
from .key_grants import adopt
from .metrics import PLACEMENT_SECONDS, PLACEMENTS
from .records import Assignment, LeaseView, QuoteView, RequestState, RequestView
from .service import Broker

Id = Annotated[str, Parameter(max_length=200)]
# the counters' children, bound once: a labels() lookup per placement is a lock and a dict
OUTCOMES = {outcome: PLACEMENTS.labels(outcome) for outcome in ("placed", "queued", "rejected", "no_capacity", "error")}

def broker_of(request: AuthedRequest) -> Broker:
    return request.app.state.broker


class RequestController(Controller):
    path = "/v1/requests"
    tags = ["requests"]

    @post("/", summary="Ask for compute: 201 placed, 202 queued, 422 never placeable",
          responses={201: ResponseSpec(RequestView, description="Placed: the request with its leases"),
                     202: ResponseSpec(RequestView, description="Queued: its position and estimated wait")})
    async def create(self, request: AuthedRequest, data: ComputeRequest) -> JsonAnswer:
        broker = broker_of(request)
        tenant = broker.tenant_of(request.user)

        async def run(request_id: str | None = None) -> tuple[int, bytes]:
            started = time.perf_counter()
            try:
                status, view = await broker.place(request.user, data, request_id)
            except BrokerError as exc:
                OUTCOMES[{422: "rejected", 409: "no_capacity"}.get(exc.status, "error")].inc()
                raise
            PLACEMENT_SECONDS.observe(time.perf_counter() - started)
            OUTCOMES["placed" if status == 201 else "queued"].inc()
            return status, msgspec.json.encode(view)

        key = raw_header(request.scope, b"idempotency-key")
        deadlines: Deadlines = request.app.state.placement_deadlines
        try:
            async with deadlines.bound() as bound:  # never answered late, never granted late
                if key is None:  # the common case, called directly: two coroutine layers fewer to resume
                    status, content = await run()
                else:
                    body = msgspec.json.encode(data)  # canonical: same meaning, same bytes
                    keyring: Keyring = request.app.state.keyring
                    status, content = await keyring.run(
                        tenant, key, body, run,
                        lambda request_id, leases: adopt(broker, tenant, data, request_id, leases))
        except TimeoutError:
            took = f"within {deadlines.seconds:g} s" if bound.fired else "in time"
            raise Unavailable(f"the placement did not finish {took} (the event store or the live state store is "
                              "slow or unreachable); nothing was granted: retry", retry_after=1) from None
        return JsonAnswer(content, status)

    @get("/", summary="Your requests, newest first (admin/ops: ?tenant=), with their leases and attempts")
    async def list_requests(self, request: AuthedRequest,
                            tenant: Annotated[str | None, Parameter(max_length=64)] = None,
                            in_state: Annotated[RequestState | None, QueryParameter(name="state")] = None,
                            limit: Annotated[int, Parameter(ge=1, le=500)] = 50) -> list[RequestView]:
        return await broker_of(request).list_requests(request.user, tenant, in_state, limit)

    @get("/{request_id:str}", summary="State, queue position, estimated wait, reasons")
    async def get_request(self, request: AuthedRequest, request_id: Id) -> RequestView:
        return await broker_of(request).get_request(request.user, request_id)

    @delete("/{request_id:str}", summary="Cancel a queued request", status_code=200)
    async def cancel(self, request: AuthedRequest, request_id: Id) -> RequestView:
        return await broker_of(request).cancel(request.user, request_id)

class QuoteController(Controller):
    path = "/v1/quotes"
    tags = ["requests"]

    @post("/", summary="Ranked placement options with prices; reserves nothing", status_code=200)
    async def quote(self, request: AuthedRequest, data: ComputeRequest) -> QuoteView:
        return await broker_of(request).quote(request.user, data)

class LeaseController(Controller):
    path = "/v1/leases"
    tags = ["leases"]

    @get("/", summary="Active leases (a tenant's own; admin/ops: ?tenant=)")
    async def list_leases(self, request: AuthedRequest,
                          tenant: Annotated[str | None, Parameter(max_length=64)] = None) -> list[LeaseView]:
        broker = broker_of(request)
        return await broker.lease_views(request.user, await broker.list_leases(request.user, tenant))

    @get("/{lease_id:str}", summary="One active lease: its state, and how to reach it once ready (its tenant)")
    async def get_lease(self, request: AuthedRequest, lease_id: Id) -> LeaseView:
        broker = broker_of(request)
        [view] = await broker.lease_views(request.user, [await broker.own_lease(request.user, lease_id)])
        return view

    @post("/{lease_id:str}/renew", summary="Keep an open lease alive for another TTL", status_code=200)
    async def renew(self, request: AuthedRequest, lease_id: Id) -> LeaseView:
        broker = broker_of(request)
        [view] = await broker.lease_views(request.user, [await broker.renew(request.user, lease_id)])
        return view

    @post("/{lease_id:str}/ready", summary="Provider: delivered; how the tenant reaches it (provisioning → ready)",
          status_code=200, tags=["provider"])
    async def ready(self, request: AuthedRequest, lease_id: Id, data: ReadyBody) -> LeaseView:
        return await broker_of(request).deliveries.ready(request.user, lease_id, data)

    @post("/{lease_id:str}/failed", summary="Provider: cannot deliver (provisioning → failed, units back)",
          status_code=200, tags=["provider"])
    async def failed(self, request: AuthedRequest, lease_id: Id, data: FailedBody) -> dict[str, Any]:
        return await broker_of(request).deliveries.failed(request.user, lease_id, data)

    @post("/{lease_id:str}/health", summary="Provider: health of a delivered lease (unhealthy: ready → lost)",
          status_code=200, tags=["provider"])
    async def health(self, request: AuthedRequest, lease_id: Id, data: HealthBody) -> dict[str, Any]:
        return await broker_of(request).deliveries.health(request.user, lease_id, data)

    @post("/{lease_id:str}/complete", summary="Provider: the delivered workload ended by itself (ready → released)",
          status_code=200, tags=["provider"])
    async def complete(self, request: AuthedRequest, lease_id: Id, data: CompleteBody) -> dict[str, Any]:
        return await broker_of(request).deliveries.complete(request.user, lease_id, data)

    @post("/{lease_id:str}/release", summary="Give the units back", status_code=200)
    async def release(self, request: AuthedRequest, lease_id: Id) -> dict[str, Any]:
        lease = await broker_of(request).release(request.user, lease_id)
        return {"lease_id": lease.lease_id, "released": True}


class AssignmentController(Controller):
    path = "/v1/assignments"
    tags = ["provider"]

    @get("/", summary="Provider: the leases on its pools, with what to deliver and by when (admin: ?provider=)")
    async def list_assignments(self, request: AuthedRequest,
                               lease_state: Annotated[LeaseState | None, QueryParameter(name="state")] = None,
                               provider: Annotated[str | None, Parameter(max_length=64)] = None,
                               limit: Annotated[int, Parameter(ge=1, le=1000)] = 1000) -> list[Assignment]:
        return await broker_of(request).deliveries.assignments(request.user, lease_state, provider, limit)
