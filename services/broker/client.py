"""A small typed client for apps (httpx), sync and async.

    from services.broker.client import BrokerClient
    with BrokerClient("http://127.0.0.1:8082", key, events_url="http://127.0.0.1:8081") as broker:
        placed = broker.request({"units": 8, "accelerators": {"vendors": ["huawei"]},
                                 "workload": {"kind": "ssh", "public_keys": [my_key]}})
        ready = broker.wait_ready(placed.request_id, timeout=600)  # RequestEnded / WaitTimedOut
        notebook = broker.request({"workload": {"kind": "ssh", "public_keys": [my_key]}}, share=250)
        for lease in ready.leases:
            print(lease.access.host, lease.access.port)
            broker.renew(lease.lease_id)

``events_url`` is the registry (where ``GET /v1/events`` is): with it ``wait_ready`` hears
of a change as it happens; without it, it polls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import msgspec

from services.common.client_errors import ApiError, raise_for_problem

from .domain.requests import ComputeRequest, Share
from .ready_wait import RequestEnded, RequestNotReady, WaitTimedOut, wait_ready
from .records import LeaseView, QuoteView, RequestView

__all__ = ["BrokerApiError", "BrokerClient", "RequestEnded", "RequestNotReady", "Share", "WaitTimedOut"]


class BrokerApiError(ApiError):
    """A 4xx/5xx from the broker, with its problem details and reasons."""


def _body(request: ComputeRequest | dict[str, Any], share: int | Share | None = None) -> bytes:
    if isinstance(request, dict):
        request = msgspec.convert(request, ComputeRequest)
    if share is not None:
        if isinstance(share, bool) or not isinstance(share, int | Share):
            raise TypeError(f"share is milli (an int, 1-999) or a Share, not {type(share).__name__}")
        if isinstance(share, int):  # checked against the broker's own schema, as the whole body is
            share = msgspec.convert({"milli": share}, Share)
        if request.share is not None and request.share != share:
            raise ValueError("the request already asks for another share; give it once")
        request = msgspec.structs.replace(request, share=share)
    return msgspec.json.encode(request)


def _check(r: httpx.Response) -> httpx.Response:
    return raise_for_problem(r, BrokerApiError)


def _decode(r: httpx.Response, type_: Any) -> Any:
    return msgspec.json.decode(_check(r).content, type=type_)


class BrokerClient:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, events_url: str | None = None) -> None:
        self.api_key, self.events_url = api_key, events_url
        self.http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {api_key}", "content-type": "application/json"})

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, request: ComputeRequest | dict[str, Any], idempotency_key: str | None = None, *,
                share: int | Share | None = None) -> RequestView:
        """201 placed or 202 queued → the request; 4xx → ``BrokerApiError`` with reasons.
        ``share``: a slice of one device, in milli (250 = a quarter) or a ``Share`` with its
        memory need (docs/sharing.md); the same as ``"share"`` in the body."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return _decode(self.http.post("/v1/requests", content=_body(request, share), headers=headers), RequestView)

    def quote(self, request: ComputeRequest | dict[str, Any], *, share: int | Share | None = None) -> QuoteView:
        return _decode(self.http.post("/v1/quotes", content=_body(request, share)), QuoteView)

    def status(self, request_id: str) -> RequestView:
        """The request: its state, reasons, live leases (with access once ready) and every attempt."""
        return _decode(self.http.get(f"/v1/requests/{request_id}"), RequestView)

    get_request = status

    def requests(self, *, state: str | None = None, limit: int = 50) -> list[RequestView]:
        """Your requests, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        return _decode(self.http.get("/v1/requests", params=params), list[RequestView])

    def cancel(self, request_id: str) -> RequestView:
        """Cancel a queued request (a placed one is ended by releasing its leases)."""
        return _decode(self.http.delete(f"/v1/requests/{request_id}"), RequestView)

    def wait_ready(self, request_id: str, timeout: float = 600.0, *, poll_s: float = 1.0,
                   replacement_grace_s: float = 5.0,
                   on_change: Callable[[RequestView], None] | None = None) -> RequestView:
        """Block until every lease of the request is ready and return the request (access
        details in each lease). A failed attempt that failover replaces is waited through.
        Raises ``RequestEnded`` when it ends failed, rejected, cancelled or expired, and
        ``WaitTimedOut`` after ``timeout`` seconds; both carry the last view. ``on_change``
        is called with each view that differs from the one before (progress)."""
        return wait_ready(self.status, request_id, timeout=timeout, events_url=self.events_url,
                          api_key=self.api_key, poll_s=poll_s, grace_s=replacement_grace_s, on_change=on_change)

    def leases(self, tenant: str | None = None) -> list[LeaseView]:
        params = {"tenant": tenant} if tenant else None
        return _decode(self.http.get("/v1/leases", params=params), list[LeaseView])

    def lease(self, lease_id: str) -> LeaseView:
        return _decode(self.http.get(f"/v1/leases/{lease_id}"), LeaseView)

    def renew(self, lease_id: str) -> LeaseView:
        return _decode(self.http.post(f"/v1/leases/{lease_id}/renew"), LeaseView)

    def release(self, lease_id: str) -> None:
        _check(self.http.post(f"/v1/leases/{lease_id}/release"))
