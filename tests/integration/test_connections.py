"""Connection helpers of services/common against real servers."""

from __future__ import annotations

import asyncio

from nats.js.api import StorageType

from services.common.nats_conn import connect, ensure_streams, stream_configs
from services.common.redis_conn import connect as redis_connect
from services.common.subjects import EVENT_KINDS, Subjects


async def test_redis_pool_waits_instead_of_failing(redis_url: str, prefix: str) -> None:
    client = redis_connect(redis_url, max_connections=2)
    try:
        # 50 slow commands on 2 connections: all succeed, none raises "too many connections"
        results = await asyncio.gather(*(client.eval("redis.call('SET', KEYS[1], ARGV[1]); return ARGV[1]", 1,
                                                     f"{prefix}:k{i}", i) for i in range(50)))
        assert [int(r) for r in results] == list(range(50))
        assert client.connection_pool.max_connections == 2
    finally:
        await client.delete(*(f"{prefix}:k{i}" for i in range(50)))
        await client.aclose()


async def test_ensure_streams_is_idempotent(nats_url: str, prefix: str) -> None:
    subjects = Subjects(prefix)
    nc = await connect(nats_url, "test")
    js = nc.jetstream()
    try:
        await ensure_streams(js, subjects)
        await ensure_streams(js, subjects)  # a second replica starting: no error, same config
        for config in stream_configs(subjects):
            info = await js.stream_info(config.name)
            assert info.config.subjects == config.subjects
            assert info.config.storage == StorageType.FILE
            assert info.config.duplicate_window == 120.0
        assert len(EVENT_KINDS) == 4
    finally:
        for config in stream_configs(subjects):
            await js.delete_stream(config.name)
        for bucket in ("pools", "keys", "regions"):
            await js.delete_key_value(subjects.bucket(bucket))
        await nc.drain()
