"""A Redis Cluster master dies (no replica): the requests that need its slots are told
to retry (503 with Retry-After), not that the service is broken (500); nothing is
granted meanwhile; the service process stays up."""

from __future__ import annotations

import pytest

from services.common.keys import Keys

from ..cluster import NatsCluster, RedisCluster
from ..helpers import eventually
from .conftest import clustered_settings
from .stack import REGIONS, granted_ids, slot_owner, stack

pytestmark = pytest.mark.timeout(120)


async def test_a_dead_redis_master_is_a_503_not_a_500(cluster_nats: NatsCluster, own_redis_cluster: RedisCluster,
                                                       prefix: str, admin_key: str, tmp_path) -> None:
    settings = clustered_settings(cluster_nats, own_redis_cluster, prefix, admin_key)
    region = REGIONS[1]
    async with stack(settings, tmp_path) as s:
        await s.pool("p-1", region, 8)
        await eventually(lambda: _quoted(s, region), timeout=30)
        r = await s.request("t1", {"units": 1, "placement": {"regions": [region]}})
        assert r.status_code == 201, r.text
        before = granted_ids(await s.alloc_events())

        owner = slot_owner(settings, Keys(settings.prefix).pool(region, "p-1"))
        victim = next(n for n in own_redis_cluster.nodes if owner.endswith(f":{n.port}"))
        victim.kill()
        for _ in range(3):
            r = await s.request("t1", {"units": 1, "placement": {"regions": [region]}})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1" and r.json()["title"] == "unavailable", r.text
        assert (await s.broker.get("/health")).status_code == 200
        assert s.procs["broker"].proc is not None and s.procs["broker"].proc.poll() is None
        assert granted_ids(await s.alloc_events()) == before  # nothing granted while it was down


async def _quoted(s, region: str) -> bool:  # noqa: ANN001
    r = await s.broker.post("/v1/quotes", json={"units": 1, "placement": {"regions": [region]}}, headers=s.admin)
    return r.status_code == 200 and bool(r.json()["options"])
