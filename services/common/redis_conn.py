"""Redis connection pool and Lua script loading."""

from __future__ import annotations

from importlib import resources

from redis.asyncio import BlockingConnectionPool, Redis

CLUSTER_MIN_CONNECTIONS = 512  # per node: a full cluster pool raises instead of waiting


def connect(url: str, max_connections: int = 64, cluster: bool = False) -> Redis:
    """A pool that waits for a free connection instead of failing under a burst.

    ``cluster``: ``url`` is one seed node of a Redis Cluster; the cluster client finds the
    others and routes each command (and each Lua script, by its keys' ``{region}`` hash
    tag) to the node owning the slot. Its pools are per node and fail fast when full
    instead of waiting, so each node gets a generous pool."""
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url, max_connections=max(max_connections, CLUSTER_MIN_CONNECTIONS))  # type: ignore[return-value]
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=10)
    return Redis(connection_pool=pool)


def read_lua(package: str, name: str) -> str:
    """A service's script with the shared pool-state functions prepended, so that
    every script computes a pool's free units the same way."""
    shared = resources.files("services.common.lua").joinpath("pool_state.lua").read_text()
    return shared + "\n" + resources.files(package).joinpath(name).read_text()
