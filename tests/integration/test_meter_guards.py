"""Invariants 5 and 6 for the meter: bad input gets a 4xx with a reason and changes
nothing; nobody sees or changes what is outside their role."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from .test_meter_support import T0, ended, granted, lease, meter_world

BAD_QUERIES = [
    ("/v1/usage", {"period": "2026-13"}, 400, "YYYY-MM"),
    ("/v1/usage", {"period": "last month"}, 400, "YYYY-MM"),
    ("/v1/usage", {"period": "2026-3"}, 400, "YYYY-MM"),
    ("/v1/usage", {"group_by": "colour"}, 400, "group by"),
    ("/v1/usage", {"group_by": "region,region"}, 400, "twice"),
    ("/v1/usage", {"format": "xml"}, 400, "format"),
    ("/v1/usage", {"billing": "free"}, 400, "billing"),
    ("/v1/usage", {"tenant": "T1!"}, 400, "not an id"),
    ("/v1/usage", {"region": "cn.yrd"}, 400, "not an id"),
    ("/v1/invoices/2026-00", {"tenant": "t1"}, 400, "YYYY-MM"),
    ("/v1/invoices/march", {"tenant": "t1"}, 400, "YYYY-MM"),
    ("/v1/invoices/2026-03", {}, 400, "tenant"),
    ("/v1/invoices", {}, 400, "tenant"),
    ("/v1/invoices/2026-03", {"tenant": "nobody"}, 404, "nobody"),
    ("/v1/statements", {}, 400, "provider"),
    ("/v1/statements", {"provider": "acme", "period": "2026-1"}, 400, "YYYY-MM"),
    ("/v1/deadletters", {"limit": "0"}, 400, "limit"),
    ("/v1/budgets/nobody", {}, 404, "no budget"),
]


@pytest.mark.parametrize(("path", "params", "status", "words"), BAD_QUERIES,
                         ids=[f"{p} {q}" for p, q, _, _ in BAD_QUERIES])
async def test_bad_queries_get_a_reason(settings, nc, path, params, status, words) -> None:
    async with meter_world(settings, nc) as w:
        r = await w.get(path, "ops", **params)
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert words.lower() in r.text.lower(), r.text


BAD_BUDGETS = {
    "unknown tenant": ("ghost", {"kind": "prepaid", "amount": "10.00", "currency": "USD"}, 404, "no tenant"),
    "negative": ("t1", {"kind": "prepaid", "amount": "-5", "currency": "USD"}, 422, ">= 0"),
    "wrong currency for the tenant": ("t1", {"kind": "limit", "amount": "10", "currency": "EUR"}, 422, "billed in USD"),
    "not a currency": ("t1", {"kind": "limit", "amount": "10", "currency": "usd"}, 400, "ISO 4217"),
    "too many places": ("t1", {"kind": "limit", "amount": "10.001", "currency": "USD"}, 422, "decimal places"),
    "places for JPY": ("t2", {"kind": "limit", "amount": "10.5", "currency": "JPY"}, 422, "decimal places"),
    "not a number": ("t1", {"kind": "limit", "amount": "lots", "currency": "USD"}, 400, "amount"),
    "infinite": ("t1", {"kind": "limit", "amount": "Infinity", "currency": "USD"}, 422, "finite"),
    "unknown kind": ("t1", {"kind": "gift", "amount": "10", "currency": "USD"}, 400, "kind"),
    "unknown field": ("t1", {"kind": "limit", "amount": "10", "currency": "USD", "colour": "red"}, 400, "colour"),
    "missing amount": ("t1", {"kind": "limit", "currency": "USD"}, 400, "amount"),
    "bad tenant id": ("T 1", {"kind": "limit", "amount": "10", "currency": "USD"}, 400, "not an id"),
    "not an object": ("t1", [1, 2], 400, ""),
}


async def test_bad_budgets_change_nothing(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        a = lease(unit_price=Decimal("36"))
        await w.publish(granted(a), ended(a, "released", T0 + timedelta(seconds=100)))
        await w.settled()
        r = await w.client.put("/v1/budgets/t1", json={"kind": "prepaid", "amount": "50.00", "currency": "USD"},
                               headers=w.admin)
        assert r.status_code == 200, r.text
        before = r.json()
        assert before["spent"] == "1.00" and before["remaining"] == "49.00" and before["exhausted"] is False
        for name, (tenant, body, status, words) in BAD_BUDGETS.items():
            r = await w.client.put(f"/v1/budgets/{tenant}", json=body, headers=w.admin)
            assert r.status_code == status, (name, r.text)
            assert words.lower() in r.text.lower(), (name, r.text)
        after = (await w.get("/v1/budgets/t1", "admin")).json()
        assert after == before
        assert (await w.get("/v1/budgets/t2", "admin")).status_code == 404  # the JPY attempt left nothing
        assert (await w.get("/v1/budgets/ghost", "admin")).status_code == 404


async def test_roles(settings, nc) -> None:
    async with meter_world(settings, nc) as w:
        a = lease(unit_price=Decimal("36"))
        b = lease(unit_price=Decimal("36"), tenant="t2", pool_id="p2")
        await w.publish(granted(a), granted(b), ended(a, "released", T0 + timedelta(seconds=100)),
                        ended(b, "released", T0 + timedelta(seconds=200)))
        await w.settled()

        async def status(method: str, path: str, who: str | None, **kw) -> int:
            headers = w.h(who) if who else {}
            return (await w.client.request(method, path, headers=headers, **kw)).status_code

        budget = {"json": {"kind": "prepaid", "amount": "10.00", "currency": "USD"}}
        matrix = [
            # usage: a tenant its own (another tenant's is 404); ops/admin anyone; providers none
            ("GET", "/v1/usage", "t1", {}, 200), ("GET", "/v1/usage?tenant=t1", "t1", {}, 200),
            ("GET", "/v1/usage?tenant=t2", "t1", {}, 404), ("GET", "/v1/usage?tenant=t2", "ops", {}, 200),
            ("GET", "/v1/usage", "acme", {}, 403), ("GET", "/v1/usage", None, {}, 401),
            # invoices
            ("GET", "/v1/invoices/2026-03", "t1", {}, 200), ("GET", "/v1/invoices/2026-03?tenant=t2", "t1", {}, 404),
            ("GET", "/v1/invoices?tenant=t2", "t1", {}, 404), ("GET", "/v1/invoices/2026-03?tenant=t2", "ops", {}, 200),
            ("GET", "/v1/invoices/2026-03?tenant=t2", "acme", {}, 403), ("GET", "/v1/invoices", None, {}, 401),
            # statements: providers their own; ops/admin any; tenants none
            ("GET", "/v1/statements", "acme", {}, 200), ("GET", "/v1/statements?provider=other", "acme", {}, 404),
            ("GET", "/v1/statements?provider=acme", "ops", {}, 200), ("GET", "/v1/statements", "t1", {}, 403),
            # budgets: admin sets; the tenant, ops and admin read; another tenant's is 404
            ("PUT", "/v1/budgets/t1", "ops", budget, 403), ("PUT", "/v1/budgets/t1", "t1", budget, 403),
            ("PUT", "/v1/budgets/t1", "acme", budget, 403), ("PUT", "/v1/budgets/t1", "admin", budget, 200),
            ("GET", "/v1/budgets/t1", "t1", {}, 200), ("GET", "/v1/budgets/t1", "t2", {}, 404),
            ("GET", "/v1/budgets/t1", "ops", {}, 200), ("GET", "/v1/budgets/t1", "acme", {}, 403),  # wrong role
            # dead letters and status: ops and admin; a retry only admin
            ("GET", "/v1/deadletters", "ops", {}, 200), ("GET", "/v1/deadletters", "t1", {}, 403),
            ("GET", "/v1/deadletters", "acme", {}, 403), ("GET", "/v1/meter/status", "t1", {}, 403),
            ("POST", "/v1/deadletters/1/retry", "ops", {}, 403), ("POST", "/v1/deadletters/1/retry", "t1", {}, 403),
            # open
            ("GET", "/health", None, {}, 200), ("GET", "/metrics", None, {}, 200),
        ]
        for method, path, who, kw, expected in matrix:
            assert await status(method, path, who, **kw) == expected, (method, path, who)
        # what a tenant sees is only its own
        mine = await w.usage("t1", group_by="tenant")
        assert [r["tenant"] for r in mine["rows"]] == ["t1"] and mine["totals"] == {"USD": "1.00"}
        everyone = await w.usage("ops", group_by="tenant")
        assert [r["tenant"] for r in everyone["rows"]] == ["t1", "t2"]
