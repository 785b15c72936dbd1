"""Real NATS and Redis for the test suite.

Order of preference: ``NATS_URL``/``REDIS_URL`` when set (already-running servers);
testcontainers when a Docker engine answers; otherwise the nats-server and
redis-server binaries that the project's install brings, on free loopback ports.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from services.cli.servers import ServerProcess, start_nats, start_redis


def docker_available() -> bool:
    if os.environ.get("CB_TEST_NO_DOCKER"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def nats_server(tmp: Path) -> Iterator[tuple[str, ServerProcess | None]]:
    if os.environ.get("NATS_URL"):
        yield os.environ["NATS_URL"], None
    elif docker_available():
        from testcontainers.community.nats import NatsContainer

        with NatsContainer(jetstream=True) as c:
            yield f"nats://{c.nats_host_and_port()[0]}:{c.nats_host_and_port()[1]}", None
    else:
        proc = start_nats(tmp / "nats")
        try:
            yield proc.url, proc
        finally:
            proc.stop()


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[tuple[str, ServerProcess | None]]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"], None
    elif docker_available():
        from testcontainers.community.redis import RedisContainer

        with RedisContainer() as c:
            yield f"redis://{c.get_container_host_ip()}:{c.get_exposed_port(6379)}/0", None
    else:
        proc = start_redis(tmp / "redis")
        try:
            yield proc.url, proc
        finally:
            proc.stop()
