"""Load shedding (docs/overload.md): the in-flight limit answers excess requests at
once with a 503 and Retry-After, every 503 says when to retry, a tenant's queue is
capped with a 429, and slow clients are cut off by the header and body timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.exceptions
import uvicorn
from litestar import get, post
from litestar.exceptions import HTTPException
from nats.errors import TimeoutError as NatsTimeout

from services.cli.servers import free_port
from services.common.errors import Busy, Unavailable
from services.common.http import PUBLIC, prometheus, service_app
from services.common.http_protocol import TimedHttpToolsProtocol
from services.common.overload import slots_of
from services.common.redis_conn import connect as redis_connect
from services.common.settings import Settings

from ..helpers import eventually
from ..procs import service_process
from .broker_world import broker_world
from .conftest import MODEL, REGION, with_settings


@contextlib.asynccontextmanager
async def served(app, **protocol: float) -> AsyncIterator[str]:  # noqa: ANN001
    """``app`` under a real uvicorn on this loop (the protocol the services run with)."""
    http = type("Timed", (TimedHttpToolsProtocol,), {"header_timeout_s": 10.0, "body_timeout_s": 30.0, **protocol})
    server = uvicorn.Server(uvicorn.Config(app, port=free_port(), http=http, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started, timeout=10, every=0.01, what="the server started")
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def nothing(_app):  # noqa: ANN001, ANN202
    yield


def shedding_app(max_in_flight: int, gate: asyncio.Event):  # noqa: ANN201
    @get("/slow", opt=PUBLIC)
    async def slow() -> dict[str, str]:
        await gate.wait()
        return {"ok": "yes"}

    @get("/slow/other", opt=PUBLIC)  # another route: the limit is the service's, not a route's
    async def slow_other() -> dict[str, str]:
        await gate.wait()
        return {"ok": "yes"}

    @get("/health", opt=PUBLIC)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @post("/echo", opt=PUBLIC)
    async def echo(data: dict[str, int]) -> dict[str, int]:
        return data

    failures = {"unavailable": Unavailable("leases in region x are being restored; retry shortly"),
                "busy": Busy("all connections in use", retry_after=2),
                "redis": redis.exceptions.ConnectionError("gone"), "nats": NatsTimeout(),
                "litestar": HTTPException(status_code=503, detail="litestar's own")}

    @get("/fail/{what:str}", opt=PUBLIC)
    async def fail(what: str) -> None:
        raise failures[what]

    metrics, _ = prometheus(f"test{max_in_flight}")
    app = service_app("test", "a test", settings=Settings(max_body_bytes=1000, max_in_flight=max_in_flight),
                      metrics=metrics, lifespan=nothing, route_handlers=[slow, slow_other, health, echo, fail])
    return app, list(failures)


async def test_past_the_in_flight_limit_requests_are_refused_at_once() -> None:
    gate = asyncio.Event()
    app, _ = shedding_app(2, gate)
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http, \
            httpx.AsyncClient(base_url=url, timeout=10) as probe:
        held = [asyncio.create_task(http.get(path)) for path in ("/slow", "/slow/other")]
        await eventually(lambda: slots_of(app).in_flight >= 2, timeout=10, every=0.01, what="two requests in flight")
        started = time.monotonic()
        refused = await http.get("/slow")
        assert time.monotonic() - started < 1.0
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "limit of 2 requests" in refused.json()["detail"]
        # each refusal is its own answer (its own request id); a client that asks again at
        # once on the same connection waits out the Retry-After: it is not read before
        started = time.monotonic()
        again = await http.get("/slow")
        assert again.status_code == 503 and len(again.headers.get_list("x-request-id")) == 1, again.headers
        assert time.monotonic() - started >= 0.9
        assert (await probe.get("/health")).status_code == 200  # probes are never shed
        gate.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        assert (await http.get("/slow")).status_code == 200  # the slots came back


async def test_every_503_says_when_to_retry() -> None:
    app, failures = shedding_app(0, asyncio.Event())
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        for what in failures:
            r = await http.get(f"/fail/{what}")
            assert r.status_code == 503, (what, r.text)
            assert r.headers.get("retry-after", "").isdigit(), (what, dict(r.headers))
            assert r.json()["retry_after"] == int(r.headers["retry-after"]), r.text
        assert (await http.get("/fail/busy")).headers["retry-after"] == "2"


async def test_the_header_and_body_timeouts_close_slow_clients() -> None:
    app, _ = shedding_app(0, asyncio.Event())
    async with served(app, header_timeout_s=0.3, body_timeout_s=0.3) as url:
        port = int(url.rsplit(":", 1)[1])
        slow_headers = b"GET /health HTTP/1.1\r\nHost: x\r\n"  # never the blank line that ends them
        slow_body = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":"
        for request, reason in ((slow_headers, b"headers"), (slow_body, b"body")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            started = time.monotonic()
            answer = await asyncio.wait_for(reader.read(), 5)  # until the server closes
            assert answer.startswith(b"HTTP/1.1 408") and reason in answer, answer
            assert time.monotonic() - started < 3
            writer.close()
        # a client that is merely slow between requests is not cut off by them: on a kept
        # connection, the server does not close it within longer than the header timeout
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await asyncio.wait_for(reader.readexactly(length), 5)
            with pytest.raises(TimeoutError):  # a close (EOF) would end this wait at once
                await asyncio.wait_for(reader.read(1), 0.5)
        writer.close()


def test_services_run_with_the_header_timeout(settings: Settings, tmp_path: Path) -> None:
    with service_process("registry", with_settings(settings, header_timeout_s=0.5), tmp_path) as registry:
        port = int(registry.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer


async def test_a_tenant_may_queue_only_up_to_its_cap(settings: Settings, nc) -> None:
    pool = {"p1": {"units": 8}}
    async with broker_world(with_settings(settings, max_queued_per_tenant=3), pool) as w:
        ask = {"units": 8, "accelerators": {"models": [MODEL]}, "placement": {"regions": [REGION]}}
        assert (await w.request("t1", ask)).status_code == 201  # the pool is now full
        queued = []
        for _ in range(3):
            r = await w.request("t1", ask)
            assert r.status_code == 202, r.text
            queued.append(r.json()["request_id"])
        r = await w.request("t1", ask)
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"].isdigit() and "limit of 3" in r.json()["detail"]
        assert r.json()["request_id"]
        assert (await w.request("t2", ask)).status_code == 202  # another tenant's queue is its own
        # one leaves the queue: there is room again
        r = await w.broker.delete(f"/v1/requests/{queued[0]}", headers=w.tenants["t1"])
        assert r.status_code == 200, r.text
        assert (await w.request("t1", ask)).status_code == 202
        assert (await w.request("t1", ask)).status_code == 429


@pytest.mark.parametrize("service", ["registry", "broker", "meter"])
def test_the_in_flight_limit_is_a_setting_of_every_service(service: str) -> None:
    from importlib import import_module

    app = import_module(f"services.{service}.app").create_app(Settings(max_in_flight=7))
    slots = slots_of(app)
    assert slots is not None and slots.limit == 7


async def test_a_fresh_service_lists_the_documented_error_counter(registry_api) -> None:  # noqa: ANN001
    """docs/metrics.md names cb_requests_error_total; litestar made it only at the first 5xx."""
    r = await registry_api.client.get("/metrics")
    assert "# TYPE cb_requests_error_total counter" in r.text


async def _blocked_pop(watcher) -> bool:  # noqa: ANN001
    return any(c.get("cmd") == "blpop" for c in await watcher.client_list())


async def test_a_full_redis_pool_is_busy_after_a_second_not_a_store_failure(redis_url: str, prefix: str) -> None:
    """Every pooled connection held (a blocking pop stands for slow work): the next
    command waits about a second, then says the service is busy; Redis is fine."""
    client = redis_connect(redis_url, max_connections=1)
    try:
        holder = asyncio.create_task(client.blpop([f"{prefix}:nothing"], timeout=4))
        watcher = redis_connect(redis_url)
        try:  # the pool's one connection is taken once Redis shows the pop blocked
            await eventually(lambda: _blocked_pop(watcher), every=0.01, what="the blocking pop holds the connection")
        finally:
            await watcher.aclose()
        started = time.monotonic()
        with pytest.raises(Busy) as refused:
            await client.get(f"{prefix}:k")
        assert 0.8 <= time.monotonic() - started < 2.5
        assert refused.value.status == 503 and "in use" in refused.value.detail
        assert await holder is None  # the slow command itself was never disturbed
        assert await client.get(f"{prefix}:k") is None  # and the pool serves again
    finally:
        await client.aclose()
