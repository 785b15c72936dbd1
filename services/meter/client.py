"""A small typed client for the meter's API (httpx, sync).

    from services.meter.client import MeterClient
    with MeterClient("http://127.0.0.1:8083", key) as meter:
        draft = meter.invoice("2026-03")
        rows = meter.usage(group_by=["region", "model"])["rows"]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from services.common.client_errors import ApiError, raise_for_problem
import msgspec

from .model import BudgetView, Invoice


class MeterApiError(ApiError):
    """A 4xx/5xx from the meter, with its problem details."""


def _check(r: httpx.Response) -> httpx.Response:
    return raise_for_problem(r, MeterApiError)


def _params(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v not in (None, "", [], ())}


class MeterClient:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def __enter__(self) -> MeterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def usage(self, *, tenant: str | None = None, period: str | None = None, region: str | None = None,
              model: str | None = None, provider: str | None = None, pool: str | None = None,
              billing: str | None = None, group_by: Sequence[str] = ()) -> dict[str, Any]:
        params = _params(tenant=tenant, period=period, region=region, model=model, provider=provider, pool=pool,
                         billing=billing, group_by=",".join(group_by))
        return _check(self.http.get("/v1/usage", params=params)).json()

    def usage_csv(self, **kw: Any) -> str:
        group_by = kw.pop("group_by", ())
        params = _params(**kw, group_by=",".join(group_by), format="csv")
        return _check(self.http.get("/v1/usage", params=params)).text

    def invoices(self, tenant: str | None = None) -> dict[str, Any]:
        return _check(self.http.get("/v1/invoices", params=_params(tenant=tenant))).json()

    def invoice(self, period: str, tenant: str | None = None) -> Invoice:
        r = _check(self.http.get(f"/v1/invoices/{period}", params=_params(tenant=tenant)))
        return msgspec.json.decode(r.content, type=Invoice)

    def statements(self, provider: str | None = None, period: str | None = None) -> dict[str, Any]:
        return _check(self.http.get("/v1/statements", params=_params(provider=provider, period=period))).json()

    def budget(self, tenant: str) -> BudgetView:
        return msgspec.json.decode(_check(self.http.get(f"/v1/budgets/{tenant}")).content, type=BudgetView)

    def set_budget(self, tenant: str, kind: str, amount: str, currency: str) -> BudgetView:
        r = _check(self.http.put(f"/v1/budgets/{tenant}", json={"kind": kind, "amount": amount, "currency": currency}))
        return msgspec.json.decode(r.content, type=BudgetView)
