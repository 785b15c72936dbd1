"""Per-key rate limits shared by every replica through Redis, and request body limits."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
from litestar.testing import AsyncTestClient

from services.common.settings import Settings
from services.registry.app import create_app as create_registry

from ..helpers import eventually
from ..procs import service_process
from .conftest import pool_body, with_settings


async def issue(client: AsyncTestClient, admin: dict[str, str], role: str, subject: str = "") -> dict[str, str]:
    r = await client.post("/v1/keys", json={"role": role, "subject": subject}, headers=admin)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


async def test_limit_is_per_key_and_shared_across_replicas(settings: Settings, nc) -> None:
    limited = with_settings(settings, rate_limit_requests=5, rate_limit_window_s=30.0)
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    async with AsyncTestClient(app=create_registry(limited)) as a, AsyncTestClient(app=create_registry(limited)) as b:
        tenant = await issue(a, admin, "tenant", "t1")
        other = await issue(a, admin, "tenant", "t2")
        for client in (a, b, a, b, a):  # five requests, spread over two replicas
            assert (await client.get("/v1/pools", headers=tenant)).status_code == 200
        r = await b.get("/v1/pools", headers=tenant)
        assert r.status_code == 429, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        body = r.json()
        assert body["status"] == 429 and body["title"] == "too many requests" and "retry" in body["detail"]
        assert 1 <= int(r.headers["retry-after"]) <= 30 and body["retry_after"] == int(r.headers["retry-after"])
        assert (await a.get("/v1/pools", headers=tenant)).status_code == 429  # the other replica agrees
        assert (await a.get("/v1/pools", headers=other)).status_code == 200  # another key has its own budget
        assert (await a.get("/v1/regions")).status_code == 200  # public routes are not counted per key
        bad = await a.get("/v1/pools", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401  # authentication comes first: a bad key never costs a counter


async def test_concurrent_requests_are_counted_exactly(settings: Settings, nc) -> None:
    """Concurrent requests are counted in batches; every one of them is still counted once."""
    limited = with_settings(settings, rate_limit_requests=20, rate_limit_window_s=60.0)
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    async with AsyncTestClient(app=create_registry(limited)) as a, AsyncTestClient(app=create_registry(limited)) as b:
        keys = [await issue(a, admin, "tenant", f"t{i}") for i in range(2)]
        for key in keys:
            statuses = await asyncio.gather(*(client.get("/v1/pools", headers=key) for client in (a, b) * 15))
            assert sorted(r.status_code for r in statuses) == [200] * 20 + [429] * 10


async def test_window_ends_and_requests_pass_again(settings: Settings, nc) -> None:
    limited = with_settings(settings, rate_limit_requests=2, rate_limit_window_s=1.0)
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    async with AsyncTestClient(app=create_registry(limited)) as client:
        ops = await issue(client, admin, "ops")
        statuses = [(await client.get("/v1/pools", headers=ops)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]

        async def passes() -> bool:
            return (await client.get("/v1/pools", headers=ops)).status_code == 200

        await eventually(passes, timeout=5)


async def test_default_limits_leave_room_for_benchmarks() -> None:
    defaults = Settings()
    assert defaults.rate_limit_requests / defaults.rate_limit_window_s >= 10_000  # req/s per key


async def test_body_over_the_limit_is_413_and_changes_nothing(settings: Settings, nc, tmp_path: Path) -> None:
    small = with_settings(settings, max_body_bytes=512)
    admin = {"Authorization": f"Bearer {settings.admin_key}"}
    with service_process("registry", small, tmp_path) as svc, httpx.Client(base_url=svc.url, timeout=10) as client:
        big = pool_body(provider="acme", zone="z" * 600)
        r = client.put("/v1/pools/p1", json=big, headers=admin)
        assert r.status_code == 413, r.text
        assert r.headers["content-type"].startswith("application/problem+json") and r.json()["status"] == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length (chunked): the limit holds for a streamed body too
            yield from (b" " * 100 for _ in range(8))

        r = client.put("/v1/pools/p1", content=chunks(), headers={**admin, "Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert client.get("/v1/pools/p1", headers=admin).status_code == 404  # nothing was written
        ok = client.put("/v1/pools/p1", json=pool_body(provider="acme"), headers=admin)
        assert ok.status_code == 201, ok.text  # a body under the limit is served


async def test_one_batch_counts_each_key_and_sees_which_keys_are_gone(settings: Settings, rds, srds) -> None:
    """The hits of a batch (several keys, some more than once, one key whose live record
    is gone, the bootstrap admin without a key id) counted in one call: each hit gets its
    own number in its key's window, and only the gone key is reported gone."""
    from services.common.auth import Principal
    from services.common.keys import Keys
    from services.common.ratelimit import RateLimiter

    keys = Keys(settings.prefix)
    limiter = RateLimiter(rds, keys, limit=3, window_s=30.0)
    alive = [Principal(role="tenant", subject=f"t{i}", key_id=f"k{i}live{settings.prefix}") for i in range(2)]
    gone = Principal(role="tenant", subject="t9", key_id=f"k9gone{settings.prefix}")
    admin = Principal(role="admin", subject="", key_id="")
    for p in alive:
        srds.hset(keys.api_key(p.key_id), "role", "tenant")
    hits = [alive[0], alive[1], alive[0], gone, admin, alive[0], alive[0]]
    seen = await limiter._flush(hits)  # one batch, as the coalescer hands it over
    assert [s.count for s in seen] == [1, 1, 2, 1, 1, 3, 4]
    assert [s.key_exists for s in seen] == [True, True, True, False, True, True, True]
    assert all(0 < s.ttl_ms <= 30_000 for s in seen)
    again = await limiter._flush([alive[0], alive[1]])  # the next batch goes on from there
    assert [s.count for s in again] == [5, 2]
    assert srds.pttl(keys.rate_limit(RateLimiter.bucket(alive[0]))) > 0
