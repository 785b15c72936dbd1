"""Redis connection pool and Lua script loading."""

from __future__ import annotations

from importlib import resources

from redis.asyncio import BlockingConnectionPool, Redis


def connect(url: str, max_connections: int = 64) -> Redis:
    """A pool that waits for a free connection instead of failing under a burst."""
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=10)
    return Redis(connection_pool=pool)


def read_lua(package: str, name: str) -> str:
    """A service's script with the shared pool-state functions prepended, so that
    every script computes a pool's free units the same way."""
    shared = resources.files("services.common.lua").joinpath("pool_state.lua").read_text()
    return shared + "\n" + resources.files(package).joinpath(name).read_text()
