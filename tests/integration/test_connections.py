"""Connection helpers of services/common against real servers."""

from __future__ import annotations

import asyncio

from nats.js.api import StorageType

from services.common.nats_conn import connect, ensure_streams, stream_configs
from services.common.redis_conn import connect as redis_connect
from services.common.settings import Settings
from services.common.startup import close_connections, open_connections
from services.common.subjects import EVENT_KINDS, Subjects

from .broker_world import broker_world
from .conftest import with_settings


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


async def test_open_connections_takes_a_services_knobs(settings: Settings, subjects: Subjects) -> None:
    """``no_echo``: this connection's own messages never come back to its subscriptions
    (another connection's do); ``redis_timeout_s``: every Redis connection gives up on an
    unanswered command. Without them, neither."""
    nc, redis, _ = await open_connections(settings, subjects, "knobs", no_echo=True, redis_timeout_s=0.5)
    plain_nc, plain_redis, _ = await open_connections(settings, subjects, "plain")
    try:
        subject = f"{settings.prefix}.echo"
        subs = {"knobs": await nc.subscribe(subject), "plain": await plain_nc.subscribe(subject)}
        for name, client in (("knobs", nc), ("plain", plain_nc)):
            await client.flush()  # both subscribed before anything is published
        # "plain" is published only once "knobs" has reached the other connection: by then the
        # server has queued "knobs" to every subscriber (to the knobs connection too, if it
        # echoed), and each connection's queue is first in, first out. (Published back to
        # back from two connections, the two could arrive in either order.)
        await nc.publish(subject, b"knobs")
        assert (await subs["plain"].next_msg(timeout=5)).data == b"knobs"
        await plain_nc.publish(subject, b"plain")
        assert (await subs["plain"].next_msg(timeout=5)).data == b"plain"
        assert (await subs["knobs"].next_msg(timeout=5)).data == b"plain"  # its own "knobs" never came back
        assert nc.options["no_echo"] is True and plain_nc.options["no_echo"] is False
        assert redis.connection_pool.connection_kwargs["socket_timeout"] == 0.5
        assert redis.connection_pool.connection_kwargs["socket_connect_timeout"] == 0.5
        assert plain_redis.connection_pool.connection_kwargs.get("socket_timeout") is None
        assert await redis.ping() and await plain_redis.ping()
    finally:
        await close_connections(nc, redis)
        await close_connections(plain_nc, plain_redis)
    assert nc.is_closed and plain_nc.is_closed


async def test_the_broker_opens_its_connections_with_its_knobs(settings: Settings, nc) -> None:
    settings = with_settings(settings, redis_timeout_s=1.5)
    async with broker_world(settings) as w:
        state = w.broker.app.state
        assert state.nc.options["no_echo"] is True  # it applies its own grants as it makes them
        assert state.redis.connection_pool.connection_kwargs["socket_timeout"] == 1.5
        assert state.key_lookup is not None and state.rate_limiter is not None
