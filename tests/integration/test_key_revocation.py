"""Revocation and rotation take effect at once in every replica.

Two processes of the registry share NATS and Redis. Replica B has just accepted a key
(so it sits in B's 5 s cache); replica A revokes or rotates it, and the very next request
to B, with no waiting and no retry, is refused. Two things make that so: the revocation
broadcast empties every replica's cache, and every request checks, in the round trip
that counts it against the rate limit, that the key's live record still exists (the
revocation deletes it before it answers). Without both, B would keep accepting the key
from its cache for up to 5 s.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from litestar.testing import AsyncTestClient

from services.common.keys import Keys
from services.common.settings import Settings
from services.registry.app import create_app as create_registry

from ..procs import service_processes


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def warm(client: httpx.Client, key: str) -> None:
    """The key works on this replica, and is now in its cache."""
    for _ in range(2):
        r = client.get("/v1/pools", headers=bearer(key))
        assert r.status_code == 200, r.text


def test_revoke_and_rotate_reach_every_replica_at_once(settings: Settings, tmp_path: Path) -> None:
    admin = bearer(settings.admin_key or "")
    with service_processes([("registry", settings), ("registry", settings)], tmp_path) as (a, b), \
            httpx.Client(base_url=a.url, timeout=10) as on_a, httpx.Client(base_url=b.url, timeout=10) as on_b:
        for round_ in range(20):  # a race would show up in some round
            issued = on_a.post("/v1/keys", json={"role": "provider", "subject": f"p{round_}"}, headers=admin).json()
            warm(on_b, issued["key"])
            assert on_a.delete(f"/v1/keys/{issued['key_id']}", headers=admin).status_code == 200
            r = on_b.get("/v1/pools", headers=bearer(issued["key"]))
            assert r.status_code == 401, f"round {round_}: replica B still accepted a revoked key: {r.text}"
            assert on_a.get("/v1/pools", headers=bearer(issued["key"])).status_code == 401

        # rotation by the key's holder: the new key works everywhere, the old one nowhere, at once
        issued = on_a.post("/v1/keys", json={"role": "tenant", "subject": "t1", "name": "ci"}, headers=admin).json()
        old = issued["key"]
        warm(on_b, old)
        rotated = on_a.post(f"/v1/keys/{issued['key_id']}/rotate", headers=bearer(old))
        assert rotated.status_code == 201, rotated.text
        new = rotated.json()
        assert (new["role"], new["subject"], new["name"]) == ("tenant", "t1", "ci") and new["key"] != old
        assert on_b.get("/v1/pools", headers=bearer(old)).status_code == 401
        assert on_b.get("/v1/pools", headers=bearer(new["key"])).status_code == 200
        # the old key can no longer rotate (or do) anything; a revoked id is unknown
        assert on_b.post(f"/v1/keys/{issued['key_id']}/rotate", headers=bearer(old)).status_code == 401
        assert on_b.post(f"/v1/keys/{issued['key_id']}/rotate", headers=admin).status_code == 404


async def test_a_key_whose_live_record_redis_lost_still_works(settings: Settings, nc, rds) -> None:
    """Only a revocation refuses a cached key: a live record lost with Redis is refilled
    from the durable bucket."""
    async with AsyncTestClient(app=create_registry(settings)) as client:
        issued = (await client.post("/v1/keys", json={"role": "ops"}, headers=bearer(settings.admin_key or ""))).json()
        assert (await client.get("/v1/pools", headers=bearer(issued["key"]))).status_code == 200  # cached now
        keys = Keys(settings.prefix)
        assert await rds.delete(keys.api_key(issued["key_id"])) == 1  # as if Redis lost it
        assert (await client.get("/v1/pools", headers=bearer(issued["key"]))).status_code == 200
        assert await rds.exists(keys.api_key(issued["key_id"])) == 1  # refilled from the bucket
