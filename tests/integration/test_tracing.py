"""One request followed through registry, broker and meter by its request id: in the
HTTP response, in the NATS message headers and in the JSON logs of every service."""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

import httpx
from litestar.testing import AsyncTestClient
from nats.aio.msg import Msg

from services.common.settings import Settings
from services.common.subjects import ALLOC, CAPACITY
from services.registry.app import create_app as create_registry

from ..helpers import eventually
from ..procs import service_processes
from .conftest import MODEL, pool_body, with_settings

HEADER = "X-Request-ID"


def log_lines(path: Path) -> list[dict]:
    """Every line of a service log, each of which must be one JSON object."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)  # a line that is not JSON fails here
            assert {"ts", "level", "service", "msg", "request_id"} <= record.keys(), record
            out.append(record)
    return out


def logged(path: Path, request_id: str) -> list[dict]:
    return [r for r in log_lines(path) if r["request_id"] == request_id]


async def test_one_request_is_followed_through_http_nats_and_logs(settings: Settings, nc, subjects,
                                                                   tmp_path: Path) -> None:
    settings = with_settings(settings, log_level="debug")
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    seen: list[Msg] = []

    async def on_msg(msg: Msg) -> None:
        seen.append(msg)

    await nc.subscribe(subjects.events(CAPACITY), cb=on_msg)
    await nc.subscribe(subjects.events(ALLOC), cb=on_msg)
    await nc.flush()  # subscribed at the server before anything is published

    def carried(request_id: str) -> list[Msg]:
        return [m for m in seen if (m.headers or {}).get(HEADER) == request_id]

    with contextlib.ExitStack() as stack:
        procs = {svc.name: svc for svc in stack.enter_context(
            service_processes([(name, settings) for name in ("registry", "broker", "meter")], tmp_path))}
        registry = stack.enter_context(httpx.Client(base_url=procs["registry"].url, timeout=10))
        broker = stack.enter_context(httpx.Client(base_url=procs["broker"].url, timeout=10))
        provider = {"Authorization": "Bearer " + registry.post(
            "/v1/keys", json={"role": "provider", "subject": "acme"}, headers=admin).json()["key"]}
        tenant = {"Authorization": "Bearer " + registry.post(
            "/v1/keys", json={"role": "tenant", "subject": "t1"}, headers=admin).json()["key"]}

        # registry -> broker: a pool registration
        pool_rid = f"trace-pool-{uuid.uuid4().hex[:8]}"
        r = registry.put("/v1/pools/p1", json=pool_body(), headers={**provider, HEADER: pool_rid})
        assert r.status_code == 201 and r.headers[HEADER] == pool_rid, r.text

        async def quoted() -> bool:
            q = broker.post("/v1/quotes", json={"units": 1}, headers=tenant)
            return q.status_code == 200 and bool(q.json()["options"])

        await eventually(quoted, timeout=15)  # the broker has the pool

        # broker -> meter: a placement
        place_rid = f"trace-place-{uuid.uuid4().hex[:8]}"
        r = broker.post("/v1/requests", json={"units": 1, "accelerators": {"models": [MODEL]}},
                        headers={**tenant, HEADER: place_rid})
        assert r.status_code == 201 and r.headers[HEADER] == place_rid, r.text

        async def everywhere() -> bool:
            return bool(carried(pool_rid) and carried(place_rid)
                        and logged(procs["broker"].log_path, pool_rid)
                        and logged(procs["meter"].log_path, place_rid))

        await eventually(everywhere, timeout=20)

        # registry -> broker -> meter: removing the pool loses the lease, which is billed up to then
        remove_rid = f"trace-remove-{uuid.uuid4().hex[:8]}"
        r = registry.delete("/v1/pools/p1", headers={**provider, HEADER: remove_rid})
        assert r.status_code == 200 and r.headers[HEADER] == remove_rid, r.text

        async def through_all_three() -> bool:
            return any(b'"lease.lost"' in m.data for m in carried(remove_rid)) and any(
                "applied lease.lost" in line["msg"] for line in logged(procs["meter"].log_path, remove_rid))

        await eventually(through_all_three, timeout=20)
        registry_lines = logged(procs["registry"].log_path, pool_rid)
        broker_lines = logged(procs["broker"].log_path, pool_rid) + logged(procs["broker"].log_path, place_rid)
        meter_lines = logged(procs["meter"].log_path, place_rid)
        chain = {line["service"] for name in procs for line in logged(procs[name].log_path, remove_rid)}
        assert chain == {"registry", "broker", "meter"}, chain

    assert any(line["msg"].startswith("PUT /v1/pools/p1 201") for line in registry_lines), registry_lines
    assert any("capacity event PoolRegistered" in line["msg"] for line in broker_lines), broker_lines
    assert any(line["msg"].startswith("POST /v1/requests 201") for line in broker_lines), broker_lines
    assert any("applied lease.granted" in line["msg"] for line in meter_lines), meter_lines
    assert {line["service"] for line in registry_lines + broker_lines + meter_lines} == {"registry", "broker",
                                                                                         "meter"}
    [granted] = [m for m in carried(place_rid) if b'"lease.granted"' in m.data]
    assert granted.subject.startswith(f"{settings.prefix}.events.{ALLOC}.")


async def test_request_ids_on_every_response(settings: Settings, nc) -> None:
    async with AsyncTestClient(app=create_registry(settings)) as client:
        made = (await client.get("/health")).headers[HEADER]
        assert len(made) == 32 and made != (await client.get("/health")).headers[HEADER]  # one per request
        assert (await client.get("/health", headers={HEADER: "abc-123"})).headers[HEADER] == "abc-123"
        unsafe = (await client.get("/health", headers={HEADER: "x" * 200})).headers[HEADER]
        assert unsafe != "x" * 200 and len(unsafe) == 32  # not a token: replaced, never echoed
        for r in (await client.get("/v1/pools", headers={HEADER: "on-401"}),  # refused by the auth middleware
                  await client.get("/nowhere", headers={HEADER: "on-404"})):  # no route at all
            assert r.status_code in (401, 404) and r.headers[HEADER] == f"on-{r.status_code}"
