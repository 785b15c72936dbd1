"""Redis Cluster lost and rebuilt: every master flushed under the services, the registry
refills the pools and the broker restores the leases (scripts per region, on the master
of that region's slot), placing works again and the auditor — reading the cluster —
passes, with every pool holding exactly what it held before."""

from __future__ import annotations

import contextlib
from pathlib import Path

import msgspec
import pytest
import redis

from services.cli.audit import AuditConfig, run_audit
from services.common.keys import Keys
from services.common.settings import Settings

from ..cluster import redis_cluster
from ..clustered.stack import REGIONS, slot_owner, stack
from ..helpers import eventually

pytestmark = pytest.mark.timeout(150)

POOLS = {f"{region}-{i}": region for region in REGIONS for i in range(2)}


async def test_redis_cluster_flushed_is_rebuilt_and_audited(settings: Settings, nc, tmp_path: Path) -> None:
    with redis_cluster(tmp_path / "redis-cluster") as cluster:
        s_ = msgspec.structs.replace(settings, redis_url=cluster.url, redis_cluster=True, sweep_interval_s=0.2,
                                     heartbeat_ttl_s=120.0)
        keys = Keys(s_.prefix)
        assert len({slot_owner(s_, keys.pool(region, "x")) for region in REGIONS}) == 3
        audit = AuditConfig(nats_url=s_.nats_url, redis_url=s_.redis_url, prefix=s_.prefix, redis_cluster=True,
                            confirm_s=0.5)
        async with stack(s_, tmp_path) as s:
            for pool_id, region in POOLS.items():
                await s.pool(pool_id, region, 8)
            await eventually(s.quotes_everywhere, timeout=30)
            leases = []
            for region in REGIONS:
                for units in (3, 2):
                    r = await s.request("t1", {"units": units, "placement": {"regions": [region]},
                                               "lease_ttl_s": 600})
                    assert r.status_code == 201, r.text
                    leases += r.json()["leases"]
            before = s.pool_states(POOLS)
            assert sum(p["leased"] for p in before.values()) == 15
            report = await run_audit(audit)
            assert report.ok, report.to_dict()

            with contextlib.closing(redis.RedisCluster.from_url(s_.redis_url)) as rc:
                rc.flushall(target_nodes=redis.RedisCluster.PRIMARIES)  # the whole cluster lost

            async def rebuilt() -> bool:
                try:
                    return s.pool_states(POOLS) == before
                except Exception:  # noqa: BLE001 - pools not back yet
                    return False

            await eventually(rebuilt, timeout=30, every=0.2)

            async def places() -> bool:
                r = await s.request("t2", {"units": 1, "lease_ttl_s": 600})
                return r.status_code == 201

            await eventually(places, timeout=30, every=0.2)
            for lease in leases:  # every lease a client was told about is back
                r = await s.broker.get(f"/v1/leases/{lease['lease_id']}", headers=s.tenants["t1"])
                assert r.status_code == 200 and r.json()["units"] == lease["units"], r.text
            report = await run_audit(audit)
            assert report.ok, report.to_dict()
            assert next(c for c in report.checks if c.name == "pool leased <= capacity").checked == len(POOLS)
