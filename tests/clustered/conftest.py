"""Clustered engines for the services: a 3-node NATS cluster (JetStream, R3 streams) and a
Redis Cluster of 3 masters, started once per session on loopback from the same binaries
as the single-node fixtures (``tests/cluster.py``). A test that kills a NATS node gets a
NATS cluster of its own (``own_nats_cluster``), so the others never see a damaged one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.settings import Settings

from ..cluster import NatsCluster, RedisCluster, nats_cluster, redis_cluster

REPLICAS = 3


@pytest.fixture(scope="session")
def cluster_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with nats_cluster(tmp_path_factory.mktemp("nats-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def cluster_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def own_nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with nats_cluster(tmp_path / "nats-cluster") as cluster:
        yield cluster


def clustered_settings(nats: NatsCluster, redis: RedisCluster, prefix: str, admin_key: str) -> Settings:
    return Settings(nats_url=nats.url, redis_url=redis.url, redis_cluster=True, stream_replicas=REPLICAS,
                    prefix=prefix, admin_key=admin_key, heartbeat_ttl_s=120.0, sweep_interval_s=0.5,
                    log_level="warning")


@pytest.fixture
def cluster_settings(cluster_nats: NatsCluster, cluster_redis: RedisCluster, prefix: str,
                     admin_key: str) -> Settings:
    return clustered_settings(cluster_nats, cluster_redis, prefix, admin_key)


@pytest.fixture
def own_redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    with redis_cluster(tmp_path / "redis-cluster") as cluster:
        yield cluster
