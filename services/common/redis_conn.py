"""Redis connection pool and Lua script loading."""

from __future__ import annotations

import asyncio
from importlib import resources

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError

from .errors import Busy

try:
    import hiredis
except ImportError:  # pragma: no cover - a dependency (redis[hiredis]); plain redis-py still works
    hiredis = None

CLUSTER_MIN_CONNECTIONS = 512  # per node: a full cluster pool raises instead of waiting
POOL_WAIT_S = 1.0  # longest wait for a free pooled connection (docs/overload.md)


class ShortWaitPool(BlockingConnectionPool):
    """Waits at most ``timeout`` for a connection, and then says the service is busy:
    every connection in use means too much work in flight, not a Redis that does not
    answer (redis-py raises the same ``ConnectionError`` for both)."""

    async def get_connection(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - redis-py's signature
        try:
            return await super().get_connection(*args, **kwargs)
        except RedisConnectionError as exc:
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise Busy(f"all {self.max_connections} connections to the live state store are in use; "
                           "retry shortly") from None
            raise


class HiredisPackingConnection(Connection):
    """redis-py's asyncio connection packs every command in pure Python, argument by
    argument (its synchronous one packs with hiredis when that is installed): at a few
    thousand placements per second that was a tenth of the broker's CPU. This packs
    the way the synchronous client does (same bytes, same ``DataError`` for values
    Redis cannot take)."""

    def pack_command(self, *args):  # noqa: ANN002, ANN201 - redis-py's signature
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            pass  # a bytearray, which hiredis refuses: converted (not checked up front on every call)
        try:
            return [hiredis.pack_command(tuple(bytes(a) if isinstance(a, (bytearray, memoryview)) else a
                                               for a in args))]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


def connect(url: str, max_connections: int = 64, cluster: bool = False, timeout: float | None = None) -> Redis:
    """A pool that waits briefly (``POOL_WAIT_S``) for a free connection instead of
    failing under a burst.

    ``cluster``: ``url`` is one seed node of a Redis Cluster; the cluster client finds the
    others and routes each command (and each Lua script, by its keys' ``{region}`` hash
    tag) to the node owning the slot. Its pools are per node and fail fast when full
    instead of waiting, so each node gets a generous pool.

    ``timeout``: a command (or a connection attempt) not answered within it raises
    instead of waiting on a Redis that stalls (a partition, a stopped process)."""
    limits = {"socket_timeout": timeout, "socket_connect_timeout": timeout} if timeout else {}
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url, max_connections=max(max_connections, CLUSTER_MIN_CONNECTIONS),  # type: ignore[return-value]
                                     **limits)
    extra = {"connection_class": HiredisPackingConnection} if hiredis and url.startswith("redis://") else {}
    pool = ShortWaitPool.from_url(url, max_connections=max_connections, timeout=POOL_WAIT_S, **limits, **extra)
    return Redis(connection_pool=pool)


def is_cluster(client: object) -> bool:
    """Whether multi-key commands must keep to one hash slot (Redis Cluster)."""
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def read_lua(package: str, name: str) -> str:
    """A service's script with the shared pool-state functions prepended, so that
    every script computes a pool's free units the same way."""
    shared = resources.files("services.common.lua").joinpath("pool_state.lua").read_text()
    return shared + "\n" + resources.files(package).joinpath(name).read_text()
