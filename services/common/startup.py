"""What every service's lifespan does first and last: open its NATS and Redis
connections with the event streams in place, put the connections and the request
guards (API keys, rate limit) on the app's state, and close the connections without
hanging a shutdown. One way for all three services (issue 16): a knob one of them
needs (the broker's ``no_echo``, its Redis timeout) is added here, not written again."""

from __future__ import annotations

from litestar.datastructures import State
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from redis.asyncio import Redis

from .auth import KeyLookup
from .keys import Keys
from .nats_conn import close_quietly, connect, ensure_streams
from .ratelimit import RateLimiter
from .redis_conn import connect as redis_connect
from .settings import Settings
from .subjects import Subjects


async def open_connections(settings: Settings, subjects: Subjects, name: str, *, no_echo: bool = False,
                           redis_timeout_s: float | None = None) -> tuple[NATS, Redis, JetStreamContext]:
    """NATS (named ``name``), Redis and JetStream, with the event streams and record
    buckets created or brought to this config. ``no_echo`` and ``redis_timeout_s`` as
    ``nats_conn.connect`` and ``redis_conn.connect`` take them (the broker's hot path
    uses both: ``settings.redis_timeout_s``)."""
    nc = await connect(settings.nats_url, name, no_echo=no_echo)
    redis = redis_connect(settings.redis_url, settings.redis_max_connections, settings.redis_cluster,
                          timeout=redis_timeout_s)
    js = nc.jetstream()
    await ensure_streams(js, subjects, settings.stream_replicas)
    return nc, redis, js


async def guard_requests(state: State, nc: NATS, redis: Redis, settings: Settings, subjects: Subjects,
                         keys: Keys) -> None:
    """What serving requests reads from the app's state: the connections (``/ready``
    checks them), the key lookup the auth middleware reads and the per-key rate limiter."""
    state.update(nc=nc, redis=redis, subjects=subjects)
    state.key_lookup = await KeyLookup.open(nc, redis, keys, subjects.bucket("keys"), settings.admin_key,
                                            subjects.key_revoked())
    state.rate_limiter = RateLimiter(redis, keys, settings.rate_limit_requests, settings.rate_limit_window_s)


async def close_connections(nc: NATS, redis: Redis) -> None:
    await close_quietly(nc)
    await redis.aclose()
