from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from services.common.nats_conn import connect, ensure_streams
from services.common.settings import Settings
from services.common.subjects import Subjects

from .servers import nats_server, redis_server
from .slurm_cluster import SlurmCluster


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nats_server(tmp_path_factory.mktemp("nats")) as (url, _):
        yield url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as (url, _):
        yield url


@pytest.fixture
def prefix() -> str:
    """A fresh subject/key/stream prefix per test: tests never see each other."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def admin_key() -> str:
    return "admin-" + uuid.uuid4().hex


@pytest.fixture
def settings(nats_url: str, redis_url: str, prefix: str, admin_key: str) -> Settings:
    return Settings(nats_url=nats_url, redis_url=redis_url, prefix=prefix, admin_key=admin_key,
                    heartbeat_ttl_s=30.0, sweep_interval_s=0.2)


@pytest.fixture
def subjects(prefix: str) -> Subjects:
    return Subjects(prefix)


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[NATS]:
    """The test's own NATS client (never shared with an app under test)."""
    client = await connect(settings.nats_url, "test")
    await ensure_streams(client.jetstream(), Subjects(settings.prefix))
    yield client
    # remove this test's streams/buckets so the session server stays small
    js = client.jetstream()
    for info in await js.streams_info():
        name = info.config.name or ""
        if name.startswith(settings.prefix.upper() + "_") or name.startswith(f"KV_{settings.prefix}_"):
            await js.delete_stream(name)
    await client.drain()


@pytest.fixture
async def rds(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def srds(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A real slurmctld + slurmd (tests/slurm_cluster.py) for every test that needs Slurm;
    fails with the install command when Slurm is missing."""
    cluster = SlurmCluster()
    cluster.start()
    yield cluster
    cluster.stop()
