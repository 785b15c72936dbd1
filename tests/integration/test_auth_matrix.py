"""Role × endpoint × owner: every route of every service, every cell asserted.

The routes come from the apps' own route tables, so an endpoint added without an entry
in ``MATRIX`` fails ``test_every_route_has_an_entry`` (and the matrix run itself). Each
cell is one real HTTP request through the real middleware with a fresh key of that
role, against a resource of the caller's own subject ("own", side A) and of another
provider or tenant ("other", side B). Outcomes: allowed (any 2xx), 401 (no, malformed
or revoked key), 403 (the role may not do this), 404 (another subject's resource).
Every 404 for another subject's resource is compared with the answer for an id that
does not exist at all: the same status and the same detail, so nothing leaks.

Pools are the one owned resource whose existence is public (search shows every pool to
every role), so a provider touching another provider's pool is a 403; see
docs/security.md.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient

from services.broker.app import create_app as create_broker
from services.common.settings import Settings
from services.meter.app import create_app as create_meter
from services.registry.app import create_app as create_registry

from ..helpers import eventually
from .conftest import MODEL, pool_body

OK, E401, E403, E404 = "2xx", 401, 403, 404
ROLES = ("admin", "ops", "provider", "tenant")
UNAUTHENTICATED = ("none", "bad", "revoked")
SIDES = {"A": ("pa", "ta"), "B": ("pb", "tb"), "ghost": ("pghost", "tghost")}
QUEUE_MODEL = "nvidia-h100-sxm-80gb"
DELIVERY_REGION = {"A": "cn-gz", "B": "us-east"}  # each side's delivering pool, so a request names its side
SERVICES: dict[str, Callable[..., Litestar]] = {"registry": create_registry, "broker": create_broker,
                                                 "meter": create_meter}


# --- the world the cells act on --------------------------------------------------------------
@dataclass
class Caller:
    role: str
    headers: dict[str, str]
    key_id: str = ""


@dataclass
class Req:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    ident: str = ""  # the owned id in it (normalised away when comparing a 404 with a ghost's)


@dataclass
class Stage:
    clients: dict[str, AsyncTestClient]
    admin: dict[str, str]
    revoked: dict[str, str] = field(default_factory=dict)
    main_pool: dict[str, str] = field(default_factory=dict)
    lease: dict[str, str] = field(default_factory=dict)
    request: dict[str, str] = field(default_factory=dict)
    region: dict[str, Any] = field(default_factory=dict)
    counter: int = 0

    def next(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}-{self.counter}"

    async def issue(self, role: str, subject: str = "") -> tuple[str, dict[str, str]]:
        r = await self.clients["registry"].post("/v1/keys", json={"role": role, "subject": subject},
                                                headers=self.admin)
        assert r.status_code == 201, r.text
        return r.json()["key_id"], {"Authorization": f"Bearer {r.json()['key']}"}

    async def caller(self, role: str) -> Caller:
        if role == "none":
            return Caller(role, {})
        if role == "bad":
            return Caller(role, {"Authorization": "Bearer cbk_0123456789abcdef_" + "0" * 48})
        if role == "revoked":
            return Caller(role, self.revoked)
        subject = {"provider": "pa", "tenant": "ta"}.get(role, "")
        key_id, headers = await self.issue(role, subject)
        return Caller(role, headers, key_id)

    @staticmethod
    def provider(side: str) -> str:
        return SIDES[side][0]

    @staticmethod
    def tenant(side: str) -> str:
        return SIDES[side][1]

    async def pool(self, side: str, pool_id: str | None = None, **over: Any) -> str:
        pool_id = pool_id or self.next(f"{self.provider(side)}-pool")
        if side != "ghost":
            r = await self.clients["registry"].put(f"/v1/pools/{pool_id}", headers=self.admin,
                                                   json=pool_body(provider=self.provider(side), **over))
            assert r.status_code in (200, 201), r.text
        return pool_id

    async def place(self, tenant: str, body: dict, expect: int = 201) -> dict:
        _, headers = await self.issue("tenant", tenant)
        r = await self.clients["broker"].post("/v1/requests", json=body, headers=headers)
        assert r.status_code == expect, r.text
        return r.json()

    async def fresh_lease(self, side: str) -> str:
        if side == "ghost":
            return self.next("l_ghost")
        return (await self.place(self.tenant(side), {"units": 1, "accelerators": {"models": [MODEL]}}))[
            "leases"][0]["lease_id"]

    async def fresh_delivery(self, side: str) -> str:
        """A lease being provisioned on the side's delivering pool (its own region)."""
        if side == "ghost":
            return self.next("l_ghost")
        body = {"units": 1, "accelerators": {"models": [MODEL]}, "placement": {"regions": [DELIVERY_REGION[side]]},
                "workload": {"kind": "ssh", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA t@x"]}}
        return (await self.place(self.tenant(side), body))["leases"][0]["lease_id"]

    async def fresh_queued(self, side: str) -> str:
        """A request that waits: the only pool of its model is fully leased by tenant tz."""
        if side == "ghost":
            return self.next("r_ghost")
        body = {"units": 8, "accelerators": {"models": [QUEUE_MODEL]}}
        return (await self.place(self.tenant(side), body, expect=202))["request_id"]

    async def fresh_key(self) -> str:
        return (await self.issue("tenant", "tb"))[0]


Build = Callable[[Stage, str, Caller], Awaitable[Req]]


@dataclass(frozen=True)
class Entry:
    build: Build
    expect: dict[str, tuple[Any, Any]]  # role -> (own, other); unowned endpoints repeat one outcome
    owned: bool = False
    public: bool = False


def anyone(build: Build) -> Entry:
    """Served without a key (probes, metrics, docs, the console's page)."""
    return Entry(build, {r: (OK, OK) for r in ROLES}, public=True)


def roles(build: Build, **outcomes: Any) -> Entry:
    return Entry(build, {r: (outcomes[r], outcomes[r]) for r in ROLES})


def owned(build: Build, **outcomes: tuple[Any, Any]) -> Entry:
    return Entry(build, {r: outcomes[r] for r in ROLES}, owned=True)


def get(path: str, **params: Any) -> Build:
    async def build(s: Stage, side: str, c: Caller) -> Req:
        return Req("GET", path, params or None)
    return build


# --- builders for owned resources ---------------------------------------------------------------
def on_pool(method: str, suffix: str = "", fresh: bool = False, body: Callable[[Stage, str], Any] | None = None
            ) -> Build:
    async def build(s: Stage, side: str, c: Caller) -> Req:
        pool_id = await s.pool(side) if fresh else s.main_pool[side]
        return Req(method, f"/v1/pools/{pool_id}{suffix}", json=body(s, side) if body else None, ident=pool_id)
    return build


def on_lease(method: str, suffix: str = "", fresh: bool = False) -> Build:
    async def build(s: Stage, side: str, c: Caller) -> Req:
        lease_id = await s.fresh_lease(side) if fresh else s.lease[side]
        return Req(method, f"/v1/leases/{lease_id}{suffix}", ident=lease_id)
    return build


def on_delivery(suffix: str, body: Any) -> Build:
    async def build(s: Stage, side: str, c: Caller) -> Req:
        lease_id = await s.fresh_delivery(side)
        return Req("POST", f"/v1/leases/{lease_id}{suffix}", json=body, ident=lease_id)
    return build


def on_ready_delivery(suffix: str, body: Any) -> Build:
    """A delivered lease its provider made ready (complete answers only those)."""
    async def build(s: Stage, side: str, c: Caller) -> Req:
        lease_id = await s.fresh_delivery(side)
        if side != "ghost":
            r = await s.clients["broker"].post(f"/v1/leases/{lease_id}/ready", json={"access": {}}, headers=s.admin)
            assert r.status_code == 200, r.text
        return Req("POST", f"/v1/leases/{lease_id}{suffix}", json=body, ident=lease_id)
    return build


async def assignments(s: Stage, side: str, c: Caller) -> Req:
    return Req("GET", "/v1/assignments", {"provider": s.provider(side)}, ident=s.provider(side))


def on_request(method: str, fresh: bool = False) -> Build:
    async def build(s: Stage, side: str, c: Caller) -> Req:
        request_id = await s.fresh_queued(side) if fresh else s.request[side]
        return Req(method, f"/v1/requests/{request_id}", ident=request_id)
    return build


def for_tenant(path: str, method: str = "GET", in_path: bool = False, body: Any = None) -> Build:
    async def build(s: Stage, side: str, c: Caller) -> Req:
        tenant = s.tenant(side)
        if in_path:
            return Req(method, path.format(tenant=tenant), json=body, ident=tenant)
        return Req(method, path, {"tenant": tenant}, json=body, ident=tenant)
    return build


async def provider_reliability(s: Stage, side: str, c: Caller) -> Req:
    return Req("GET", f"/v1/providers/{s.provider(side)}/reliability")


async def statements(s: Stage, side: str, c: Caller) -> Req:
    return Req("GET", "/v1/statements", {"provider": s.provider(side)}, ident=s.provider(side))


async def rotate(s: Stage, side: str, c: Caller) -> Req:
    key_id = (c.key_id or "00000000000000aa") if side == "A" else (
        await s.fresh_key() if side == "B" else "00000000000000ff")
    return Req("POST", f"/v1/keys/{key_id}/rotate", ident=key_id)


async def revoke(s: Stage, side: str, c: Caller) -> Req:
    return Req("DELETE", f"/v1/keys/{await s.fresh_key()}")


async def issue_key(s: Stage, side: str, c: Caller) -> Req:
    return Req("POST", "/v1/keys", json={"role": "tenant", "subject": "tc"})


async def put_region(s: Stage, side: str, c: Caller) -> Req:
    return Req("PUT", f"/v1/regions/{s.region['id']}", json=s.region)


async def put_regions(s: Stage, side: str, c: Caller) -> Req:
    return Req("POST", "/v1/regions/bulk", json=[s.region])


async def bulk(s: Stage, side: str, c: Caller) -> Req:
    pool_id = s.main_pool[side]
    return Req("POST", "/v1/pools/bulk", json=[{**pool_body(provider=s.provider(side)), "pool_id": pool_id}],
               ident=pool_id)


async def batch_heartbeat(s: Stage, side: str, c: Caller) -> Req:
    return Req("POST", "/v1/heartbeats", json={"pools": [s.main_pool[side]]})


async def place(s: Stage, side: str, c: Caller) -> Req:
    return Req("POST", "/v1/requests", json={"units": 1, "accelerators": {"models": [MODEL]}})


async def quote(s: Stage, side: str, c: Caller) -> Req:
    return Req("POST", "/v1/quotes", json={"units": 1})


async def put_budget(s: Stage, side: str, c: Caller) -> Req:
    tenant = s.tenant(side)
    return Req("PUT", f"/v1/budgets/{tenant}", json={"kind": "limit", "amount": "1000000", "currency": "USD"},
               ident=tenant)


async def retry_dead_letter(s: Stage, side: str, c: Caller) -> Req:
    return Req("POST", "/v1/deadletters/1/retry")


async def events(s: Stage, side: str, c: Caller) -> Req:
    params: dict[str, Any] = {"follow": "false", "since": "all"}
    if c.role == "provider":
        params["provider"] = s.provider(side)
    elif c.role == "tenant":
        params["tenant"] = s.tenant(side)
    return Req("GET", "/v1/events", params, ident=params.get("provider") or params.get("tenant") or "")


async def console_file(s: Stage, side: str, c: Caller) -> Req:
    static = resources.files("services.registry.console").joinpath("static")
    names = sorted(p.name for p in static.iterdir() if p.is_file())
    return Req("GET", f"/console/static/{names[0] if names else 'index.html'}")


def pool_patch(s: Stage, side: str) -> Any:
    return {"units": 64}


def pool_put(s: Stage, side: str) -> Any:
    return pool_body(provider=s.provider(side), units=64)


PUBLIC_SCHEMA = {p: anyone(get(p)) for p in ("/schema", "/schema/openapi.json", "/schema/openapi.yaml",
                                               "/schema/openapi.yml", "/schema/swagger", "/schema/redoc",
                                               "/schema/rapidoc", "/schema/oauth2-redirect.html")}
PUBLIC_SCHEMA["/schema/{path:str}"] = anyone(get("/schema/redoc"))
# the documentation pages' own files (services/common/api_docs.py)
PUBLIC_SCHEMA.update({f"/schema/assets/{ui}/{{file_path:path}}": anyone(get(f"/schema/assets/{ui}/{name}"))
                      for ui, name in (("swagger", "swagger-ui.css"), ("redoc", "redoc.standalone.js"),
                                       ("rapidoc", "rapidoc-min.js"))})


def schema_entries(service: str) -> dict[tuple[str, str, str], Entry]:
    return {(service, "GET", p): e for p, e in PUBLIC_SCHEMA.items()}


T = (OK, OK)
F = (E403, E403)
MINE = (OK, E404)  # own: allowed; another subject's: as if it did not exist
POOL_OWNER = (OK, E403)  # pools are public listings: another provider's is forbidden, not hidden

MATRIX: dict[tuple[str, str, str], Entry] = {
    # --- registry -------------------------------------------------------------------------------
    ("registry", "GET", "/health"): anyone(get("/health")),
    ("registry", "GET", "/ready"): anyone(get("/ready")),
    ("registry", "GET", "/metrics"): anyone(get("/metrics")),
    ("registry", "GET", "/console"): anyone(get("/console")),
    ("registry", "GET", "/console/config"): anyone(get("/console/config")),
    ("registry", "GET", "/console/static/{file_path:path}"): anyone(console_file),
    ("registry", "GET", "/v1/accelerators"): anyone(get("/v1/accelerators")),
    ("registry", "GET", "/v1/accelerators/{model:str}"): anyone(get(f"/v1/accelerators/{MODEL}")),
    ("registry", "GET", "/v1/regions"): anyone(get("/v1/regions")),
    ("registry", "GET", "/v1/network"): anyone(get("/v1/network")),
    ("registry", "PUT", "/v1/regions/{region_id:str}"): roles(put_region, admin=OK, ops=E403, provider=E403,
                                                               tenant=E403),
    ("registry", "POST", "/v1/regions/bulk"): roles(put_regions, admin=OK, ops=E403, provider=E403, tenant=E403),
    ("registry", "GET", "/v1/pools"): roles(get("/v1/pools"), admin=OK, ops=OK, provider=OK, tenant=OK),
    ("registry", "GET", "/v1/capacity"): roles(get("/v1/capacity"), admin=OK, ops=OK, provider=OK, tenant=OK),
    ("registry", "GET", "/v1/reliability"): roles(get("/v1/reliability"), admin=OK, ops=OK, provider=OK,
                                                  tenant=OK),
    ("registry", "GET", "/v1/pools/{pool_id:str}"): owned(on_pool("GET"), admin=T, ops=T, provider=T, tenant=T),
    ("registry", "PUT", "/v1/pools/{pool_id:str}"): owned(on_pool("PUT", body=pool_put), admin=T, ops=F,
                                                           provider=POOL_OWNER, tenant=F),
    ("registry", "PATCH", "/v1/pools/{pool_id:str}"): owned(on_pool("PATCH", body=pool_patch), admin=T, ops=F,
                                                             provider=POOL_OWNER, tenant=F),
    ("registry", "DELETE", "/v1/pools/{pool_id:str}"): owned(on_pool("DELETE", fresh=True), admin=T, ops=F,
                                                              provider=POOL_OWNER, tenant=F),
    ("registry", "POST", "/v1/pools/{pool_id:str}/heartbeat"): owned(on_pool("POST", "/heartbeat"), admin=T,
                                                                      ops=F, provider=POOL_OWNER, tenant=F),
    ("registry", "POST", "/v1/pools/{pool_id:str}/drain"): owned(on_pool("POST", "/drain", fresh=True), admin=T,
                                                                  ops=F, provider=POOL_OWNER, tenant=F),
    ("registry", "DELETE", "/v1/pools/{pool_id:str}/drain"): owned(on_pool("DELETE", "/drain", fresh=True),
                                                                    admin=T, ops=F, provider=POOL_OWNER, tenant=F),
    ("registry", "POST", "/v1/pools/bulk"): owned(bulk, admin=T, ops=F, provider=POOL_OWNER, tenant=F),
    # a batch reports another provider's pools per pool ("forbidden") instead of failing the batch
    ("registry", "POST", "/v1/heartbeats"): owned(batch_heartbeat, admin=T, ops=F, provider=T, tenant=F),
    ("registry", "GET", "/v1/keys/self"): roles(get("/v1/keys/self"), admin=OK, ops=OK, provider=OK, tenant=OK),
    ("registry", "POST", "/v1/keys"): roles(issue_key, admin=OK, ops=E403, provider=E403, tenant=E403),
    ("registry", "DELETE", "/v1/keys/{key_id:str}"): roles(revoke, admin=OK, ops=E403, provider=E403,
                                                            tenant=E403),
    ("registry", "POST", "/v1/keys/{key_id:str}/rotate"): owned(rotate, admin=T, ops=MINE, provider=MINE,
                                                                 tenant=MINE),
    # a filter naming another subject is refused (the answer does not depend on whether it exists)
    ("registry", "GET", "/v1/events"): owned(events, admin=T, ops=T, provider=POOL_OWNER, tenant=POOL_OWNER),
    # --- broker ---------------------------------------------------------------------------------
    ("broker", "GET", "/health"): anyone(get("/health")),
    ("broker", "GET", "/ready"): anyone(get("/ready")),
    ("broker", "GET", "/metrics"): anyone(get("/metrics")),
    ("broker", "POST", "/v1/requests"): roles(place, admin=E403, ops=E403, provider=E403, tenant=OK),
    ("broker", "GET", "/v1/requests"): owned(for_tenant("/v1/requests"), admin=T, ops=T, provider=F, tenant=MINE),
    ("broker", "GET", "/v1/requests/{request_id:str}"): owned(on_request("GET"), admin=T, ops=T, provider=F,
                                                               tenant=MINE),
    ("broker", "DELETE", "/v1/requests/{request_id:str}"): owned(on_request("DELETE", fresh=True), admin=T,
                                                                  ops=F, provider=F, tenant=MINE),
    ("broker", "POST", "/v1/quotes"): roles(quote, admin=OK, ops=OK, provider=E403, tenant=OK),
    ("broker", "GET", "/v1/leases"): owned(for_tenant("/v1/leases"), admin=T, ops=T, provider=F, tenant=MINE),
    ("broker", "GET", "/v1/leases/{lease_id:str}"): owned(on_lease("GET"), admin=T, ops=T, provider=F,
                                                           tenant=MINE),
    ("broker", "POST", "/v1/leases/{lease_id:str}/renew"): owned(on_lease("POST", "/renew"), admin=T, ops=F,
                                                                  provider=F, tenant=MINE),
    ("broker", "POST", "/v1/leases/{lease_id:str}/release"): owned(on_lease("POST", "/release", fresh=True),
                                                                    admin=T, ops=F, provider=F, tenant=MINE),
    # a provider's delivery record is public to every role (docs/reliability.md)
    ("broker", "GET", "/v1/providers/{provider_id:str}/reliability"): roles(provider_reliability, admin=OK, ops=OK,
                                                                             provider=OK, tenant=OK),
    # the provider's side: leases on its own pools (another provider's lease does not exist for it)
    ("broker", "GET", "/v1/assignments"): owned(assignments, admin=T, ops=F, provider=MINE, tenant=F),
    ("broker", "POST", "/v1/leases/{lease_id:str}/ready"): owned(
        on_delivery("/ready", {"access": {"host": "h.example"}}), admin=T, ops=F, provider=MINE, tenant=F),
    ("broker", "POST", "/v1/leases/{lease_id:str}/failed"): owned(
        on_delivery("/failed", {"reason": "cannot"}), admin=T, ops=F, provider=MINE, tenant=F),
    ("broker", "POST", "/v1/leases/{lease_id:str}/health"): owned(
        on_delivery("/health", {"healthy": True}), admin=T, ops=F, provider=MINE, tenant=F),
    ("broker", "POST", "/v1/leases/{lease_id:str}/complete"): owned(
        on_ready_delivery("/complete", {"exit_code": 0}), admin=T, ops=F, provider=MINE, tenant=F),
    # --- meter ----------------------------------------------------------------------------------
    ("meter", "GET", "/health"): anyone(get("/health")),
    ("meter", "GET", "/ready"): anyone(get("/ready")),
    ("meter", "GET", "/metrics"): anyone(get("/metrics")),
    ("meter", "GET", "/v1/usage"): owned(for_tenant("/v1/usage"), admin=T, ops=T, provider=F, tenant=MINE),
    ("meter", "GET", "/v1/invoices"): owned(for_tenant("/v1/invoices"), admin=T, ops=T, provider=F, tenant=MINE),
    ("meter", "GET", "/v1/invoices/{period:str}"): owned(for_tenant(f"/v1/invoices/{datetime.now(UTC):%Y-%m}"),
                                                          admin=T, ops=T, provider=F, tenant=MINE),
    ("meter", "GET", "/v1/statements"): owned(statements, admin=T, ops=T, provider=MINE, tenant=F),
    ("meter", "PUT", "/v1/budgets/{tenant:str}"): owned(put_budget, admin=T, ops=F, provider=F, tenant=F),
    ("meter", "GET", "/v1/budgets/{tenant:str}"): owned(for_tenant("/v1/budgets/{tenant}", in_path=True), admin=T,
                                                         ops=T, provider=F, tenant=MINE),
    ("meter", "GET", "/v1/deadletters"): roles(get("/v1/deadletters"), admin=OK, ops=OK, provider=E403,
                                               tenant=E403),
    ("meter", "POST", "/v1/deadletters/{stream_seq:int}/retry"): roles(retry_dead_letter, admin=OK, ops=E403,
                                                                        provider=E403, tenant=E403),
    ("meter", "GET", "/v1/meter/status"): roles(get("/v1/meter/status"), admin=OK, ops=OK, provider=E403,
                                                tenant=E403),
    **schema_entries("registry"), **schema_entries("broker"), **schema_entries("meter"),
}


def route_table(app: Litestar) -> set[tuple[str, str]]:
    return {(method, route.path) for route in app.routes if isinstance(route, HTTPRoute)
            for method in route.methods - {"OPTIONS", "HEAD"}}


def all_routes(settings: Settings) -> list[tuple[str, str, str]]:
    return sorted((service, method, path) for service, factory in SERVICES.items()
                  for method, path in route_table(factory(settings)))


# --- tests ------------------------------------------------------------------------------------------
def test_every_route_has_an_entry(settings: Settings) -> None:
    routes = set(all_routes(settings))
    missing = sorted(routes - set(MATRIX))
    stale = sorted(set(MATRIX) - routes)
    assert not missing, f"routes without an auth matrix entry (add one to MATRIX): {missing}"
    assert not stale, f"matrix entries for routes that no longer exist: {stale}"


@contextlib.asynccontextmanager
async def stage(settings: Settings) -> AsyncIterator[Stage]:
    async with AsyncTestClient(app=create_registry(settings)) as registry:
        s = Stage({"registry": registry}, {"Authorization": f"Bearer {settings.admin_key}"})
        for side in ("A", "B"):
            s.main_pool[side] = await s.pool(side, f"{s.provider(side)}-main", units=64)
        s.main_pool["ghost"], s.lease["ghost"], s.request["ghost"] = "pghost-main", "lease_ghost", "req_ghost"
        await s.pool("A", "pa-queue", model=QUEUE_MODEL, units=8)
        for side in ("A", "B"):
            await s.pool(side, f"{s.provider(side)}-deliver", region=DELIVERY_REGION[side], units=64,
                         delivery=["ssh"])
        s.region = (await registry.get("/v1/regions")).json()[0]
        key_id, s.revoked = await s.issue("tenant", "ta")
        assert (await registry.delete(f"/v1/keys/{key_id}", headers=s.admin)).status_code == 200
        async with AsyncTestClient(app=create_broker(settings)) as broker, \
                AsyncTestClient(app=create_meter(settings)) as meter:
            s.clients.update(broker=broker, meter=meter)
            await s.place("tz", {"units": 8, "accelerators": {"models": [QUEUE_MODEL]}})  # fills the queue pool
            for side in ("A", "B"):
                placed = await s.place(s.tenant(side), {"units": 1, "accelerators": {"models": [MODEL]}})
                s.request[side], s.lease[side] = placed["request_id"], placed["leases"][0]["lease_id"]

            async def meter_knows_tenants() -> bool:
                for t in ("ta", "tb"):
                    r = await meter.put(f"/v1/budgets/{t}", headers=s.admin,
                                        json={"kind": "limit", "amount": "1000000", "currency": "USD"})
                    if r.status_code != 200:
                        return False
                return True

            await eventually(meter_knows_tenants, timeout=30)
            yield s


def normalised(body: Any, *idents: str) -> Any:
    detail = body.get("detail", "") if isinstance(body, dict) else str(body)
    for ident in idents:
        if ident:
            detail = re.sub(re.escape(ident), "<id>", detail)
    return detail


def matches(status: int, expected: Any) -> bool:
    return 200 <= status < 300 if expected == OK else status == expected


async def test_role_endpoint_owner_matrix(settings: Settings) -> None:
    failures: list[str] = []
    cells = 0
    async with stage(settings) as s:
        for service, method, path in all_routes(settings):
            entry = MATRIX.get((service, method, path))
            if entry is None:
                failures.append(f"{service} {method} {path}: no matrix entry")
                continue
            client = s.clients[service]

            async def call(role: str, side: str) -> tuple[Req, Any]:
                caller = await s.caller(role)
                req = await entry.build(s, side, caller)
                assert req.method == method, (req, method)
                r = await client.request(req.method, req.path, params=req.params, json=req.json,
                                         headers=caller.headers)
                return req, r

            for role in UNAUTHENTICATED:
                req, r = await call(role, "A")
                cells += 1
                want = OK if entry.public else E401
                if not matches(r.status_code, want):
                    failures.append(f"{service} {method} {path} [{role}]: {r.status_code}, want {want}: "
                                    f"{r.text[:200]}")
            for role in ROLES:
                for side, want in zip(("A", "B") if entry.owned else ("A",), entry.expect[role], strict=False):
                    req, r = await call(role, side)
                    cells += 1
                    if not matches(r.status_code, want):
                        failures.append(f"{service} {method} {path} [{role}, {'own' if side == 'A' else 'other'}]:"
                                        f" {r.status_code}, want {want}: {r.text[:200]}")
                    elif want == E404 and side == "B":  # no existence leak: same answer as for a ghost
                        ghost_req, ghost = await call(role, "ghost")
                        if ghost.status_code != r.status_code or \
                                normalised(ghost.json(), ghost_req.ident) != normalised(r.json(), req.ident):
                            failures.append(f"{service} {method} {path} [{role}, other]: differs from a "
                                            f"non-existent id: {r.status_code} {r.text[:150]} vs "
                                            f"{ghost.status_code} {ghost.text[:150]}")
    assert not failures, f"{len(failures)} of {cells} cells wrong:\n" + "\n".join(failures)
    assert cells > 300



async def test_options_and_open_paths_need_no_key_the_rest_does(settings: Settings) -> None:
    """OPTIONS (what methods a route has) and the schema, health and metrics paths are
    answered without a key, as litestar's authentication middleware did; a key-guarded
    route still refuses a request without one."""
    async with AsyncTestClient(app=create_registry(settings)) as registry:
        options = await registry.options("/v1/keys")
        assert options.status_code == 204, options.text
        assert "POST" in options.headers["allow"]
        for path in ("/health", "/metrics", "/schema/openapi.json"):
            assert (await registry.get(path)).status_code == 200, path
        refused = await registry.post("/v1/keys", json={"role": "tenant", "subject": "t-options"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
