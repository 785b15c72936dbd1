"""A small typed client for apps (httpx), sync and async.

    from services.broker.client import BrokerClient
    with BrokerClient("http://127.0.0.1:8082", key) as broker:
        placed = broker.request({"units": 8, "accelerators": {"vendors": ["huawei"]}})
        for lease in placed.leases:
            broker.renew(lease.lease_id)
"""

from __future__ import annotations

from typing import Any

import httpx
import msgspec

from services.common.client_errors import ApiError, raise_for_problem

from .domain.requests import ComputeRequest
from .records import LeaseView, QuoteView, RequestView


class BrokerApiError(ApiError):
    """A 4xx/5xx from the broker, with its problem details and reasons."""


def _body(request: ComputeRequest | dict[str, Any]) -> bytes:
    if isinstance(request, dict):
        request = msgspec.convert(request, ComputeRequest)
    return msgspec.json.encode(request)


def _check(r: httpx.Response) -> httpx.Response:
    return raise_for_problem(r, BrokerApiError)


def _decode(r: httpx.Response, type_: Any) -> Any:
    return msgspec.json.decode(_check(r).content, type=type_)


class BrokerClient:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {api_key}", "content-type": "application/json"})

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, request: ComputeRequest | dict[str, Any], idempotency_key: str | None = None) -> RequestView:
        """201 placed or 202 queued → the request; 4xx → ``BrokerApiError`` with reasons."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return _decode(self.http.post("/v1/requests", content=_body(request), headers=headers), RequestView)

    def quote(self, request: ComputeRequest | dict[str, Any]) -> QuoteView:
        return _decode(self.http.post("/v1/quotes", content=_body(request)), QuoteView)

    def get_request(self, request_id: str) -> RequestView:
        return _decode(self.http.get(f"/v1/requests/{request_id}"), RequestView)

    def cancel(self, request_id: str) -> RequestView:
        return _decode(self.http.delete(f"/v1/requests/{request_id}"), RequestView)

    def leases(self, tenant: str | None = None) -> list[LeaseView]:
        params = {"tenant": tenant} if tenant else None
        return _decode(self.http.get("/v1/leases", params=params), list[LeaseView])

    def lease(self, lease_id: str) -> LeaseView:
        return _decode(self.http.get(f"/v1/leases/{lease_id}"), LeaseView)

    def renew(self, lease_id: str) -> LeaseView:
        return _decode(self.http.post(f"/v1/leases/{lease_id}/renew"), LeaseView)

    def release(self, lease_id: str) -> None:
        _check(self.http.post(f"/v1/leases/{lease_id}/release"))
