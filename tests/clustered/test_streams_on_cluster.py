"""Streams and buckets on a NATS cluster: replicas of every service create them at the
same time on first start (one per node here), and a deployment that grows from one
replica to three gets its existing streams scaled up."""

from __future__ import annotations

import asyncio

import pytest

from services.common.nats_conn import BUCKETS, connect, ensure_streams
from services.common.subjects import EVENT_KINDS, Subjects

from ..cluster import NatsCluster
from .conftest import REPLICAS

pytestmark = pytest.mark.timeout(120)


async def test_replicas_creating_the_streams_at_once_all_start(cluster_nats: NatsCluster, prefix: str) -> None:
    subjects = Subjects(prefix)
    clients = [await connect(url, f"replica-{i}") for i, url in enumerate(cluster_nats.url.split(","))]
    try:
        results = await asyncio.gather(*(ensure_streams(nc.jetstream(), subjects, REPLICAS) for nc in clients),
                                       return_exceptions=True)
        assert results == [None] * len(clients), results
        js = clients[0].jetstream()
        for name in [subjects.stream(kind) for kind in EVENT_KINDS] + [f"KV_{subjects.bucket(b)}" for b in BUCKETS]:
            info = await js.stream_info(name)
            assert info.config.num_replicas == REPLICAS, name
    finally:
        for nc in clients:
            await nc.close()


async def test_streams_of_a_single_replica_deployment_are_scaled_up(cluster_nats: NatsCluster, prefix: str) -> None:
    subjects = Subjects(prefix)
    nc = await connect(cluster_nats.url, "test")
    try:
        js = nc.jetstream()
        await ensure_streams(js, subjects, 1)
        assert (await js.stream_info(subjects.stream("alloc"))).config.num_replicas == 1
        await ensure_streams(js, subjects, REPLICAS)
        info = await js.stream_info(subjects.stream("alloc"))
        assert info.config.num_replicas == REPLICAS
    finally:
        await nc.close()
