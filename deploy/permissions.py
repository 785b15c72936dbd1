"""The service accounts of deploy/: NATS users with subject permissions and Redis ACL
users with key patterns, derived from the subject and key builders the services use.

Why a generator: the permissions must name exactly the subjects, streams, buckets and
keys that ``services/common/subjects.py``, ``services/common/keys.py`` and the meter's
``MeterNames`` build. Written from them, the files cannot drift from the code silently:
``tests/unit/test_k8s_manifests.py`` fails when the committed files differ from what this
renders, and ``tests/integration/test_service_permissions.py`` runs the services under them.

    python deploy/permissions.py nats  > deploy/nats/auth.conf
    python deploy/permissions.py redis > deploy/redis/users.acl
    python deploy/permissions.py nats --prefix acme   # a deployment with CB_PREFIX=acme
    python deploy/permissions.py secret | kubectl apply -f -   # deploy/k8s: fresh passwords
    python deploy/permissions.py configmaps > deploy/k8s/server-config.yaml

Passwords are never in these files. NATS reads them from the server's environment
(``$CB_NATS_<USER>_PASSWORD``; nats-server refuses to start when one is missing). Redis
ACL files cannot read the environment, so users.acl holds ``#${CB_REDIS_<USER>_SHA256}``
placeholders that the deployment fills with the SHA-256 of each password (the Kubernetes
init container does it with ``sha256sum``); an unfilled file does not load.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from services.common.keys import Keys  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from services.common.nats_conn import BUCKETS  # noqa: E402
from services.common.subjects import (  # noqa: E402
    ACCESS, ALLOC, BILLING, CAPACITY, EVENT_KINDS, FAILOVER, IDEMPOTENCY, REQUEST, MeterNames, Subjects)

SERVICES = ("registry", "broker", "meter")
JS = "$JS.API"
# Never granted to a service: removing or rewinding the durable record is an operator's act.
JS_DENY = [f"{JS}.STREAM.DELETE.>", f"{JS}.STREAM.PURGE.>", f"{JS}.STREAM.MSG.DELETE.>",
           f"{JS}.STREAM.SNAPSHOT.>", f"{JS}.STREAM.RESTORE.>"]


# ------------------------------------------------------------------------------ NATS


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def manage(stream: str) -> list[str]:
    """Create the stream or bring it to the service's config (``ensure_streams`` runs in
    every replica at every start)."""
    return [f"{JS}.STREAM.INFO.{stream}", f"{JS}.STREAM.CREATE.{stream}", f"{JS}.STREAM.UPDATE.{stream}"]


def read(stream: str) -> list[str]:
    """Read a stream: get a message, or consume it (ephemeral, ordered or durable)."""
    return [
        f"{JS}.STREAM.INFO.{stream}",
        f"{JS}.STREAM.MSG.GET.{stream}",
        f"{JS}.DIRECT.GET.{stream}",
        f"{JS}.DIRECT.GET.{stream}.>",
        f"{JS}.CONSUMER.CREATE.{stream}",
        f"{JS}.CONSUMER.CREATE.{stream}.>",
        f"{JS}.CONSUMER.DURABLE.CREATE.{stream}.*",
        f"{JS}.CONSUMER.INFO.{stream}.*",
        f"{JS}.CONSUMER.DELETE.{stream}.*",
        f"{JS}.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",  # acknowledgements of what was delivered
        f"$JS.FC.{stream}.>",  # flow control replies of push (ordered) consumers
    ]


@dataclass
class NatsUser:
    name: str
    why: str
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    deny_publish: list[str] = field(default_factory=list)
    allow_responses: bool = False  # may reply to the requests it receives (RPC servers)
    full: bool = False  # ">" both ways


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def nats_users(prefix: str = "cb") -> list[NatsUser]:
    s = Subjects(prefix)
    m = MeterNames.of(Settings(prefix=prefix))
    event_streams = [s.stream(k) for k in EVENT_KINDS]
    buckets = {b: kv_stream(s.bucket(b)) for b in BUCKETS}
    shared = event_streams + [s.stream(FAILOVER)] + list(buckets.values())  # every service's ensure_streams
    base_pub = [f"{JS}.INFO"] + [p for st in shared for p in manage(st)]
    inbox = ["_INBOX.>"]  # replies to the service's own requests (JetStream API, acks, RPC)

    registry = NatsUser(
        "registry", "capacity events, the pools/keys/regions records, the catalogue RPC, the event stream (SSE)",
        publish=base_pub
        + [s.events(CAPACITY), s.key_revoked()]
        + [f"$KV.{s.bucket(b)}.>" for b in BUCKETS]
        + [p for st in shared for p in read(st)],
        subscribe=inbox + [s.rpc("registry", ">"), s.key_revoked(), s.events()],
        allow_responses=True,
    )
    idempotency = kv_stream(s.bucket(IDEMPOTENCY))  # the broker's own buckets
    access = kv_stream(s.bucket(ACCESS))
    failover_work = s.stream(FAILOVER)  # the broker's own work queue (failed and lost leases)
    broker = NatsUser(
        "broker", "allocation and request events, idempotency keys, access details; reads capacity, billing, pools, "
        "keys and regions",
        publish=base_pub + manage(idempotency) + manage(access) + manage(failover_work)
        + [s.events(ALLOC), s.events(REQUEST), s.failover_work(), s.rpc("registry", "*"),
           f"$KV.{s.bucket(IDEMPOTENCY)}.>", f"$KV.{s.bucket(ACCESS)}.>"]
        + [p for st in (s.stream(ALLOC), s.stream(REQUEST), s.stream(CAPACITY), buckets["pools"], buckets["keys"],
                        buckets["regions"], idempotency, access, failover_work)
           for p in read(st)],  # capacity: its durable consumer of pool losses
        subscribe=inbox + [s.events(CAPACITY), s.events(ALLOC), s.events(BILLING), s.key_revoked()],
    )
    meter_buckets = [m.accounts, m.invoices, m.budgets]
    meter_streams = [m.ledger_stream, m.dlq_stream] + [kv_stream(b) for b in meter_buckets]
    meter = NatsUser(
        "meter", "billing events, its ledger, dead letters and accounts; consumes allocation events",
        publish=base_pub
        + [p for st in meter_streams for p in manage(st)]
        + [s.events(BILLING), m.ledger_subjects, m.dlq]
        + [f"$KV.{b}.>" for b in meter_buckets]
        + [p for st in [s.stream(ALLOC), buckets["keys"], *meter_streams] for p in read(st)],
        subscribe=inbox + [s.key_revoked(),
                           f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{s.stream(ALLOC)}.>"],
    )
    # not the access bucket: ops sees access details redacted, here as in the API
    all_streams = shared + [idempotency] + meter_streams
    ops = NatsUser(
        "ops", "operators and `cbroker` tools (events, audit): read every stream and event, change nothing",
        publish=[f"{JS}.INFO", f"{JS}.STREAM.NAMES", f"{JS}.STREAM.LIST"]
        + [p for st in all_streams for p in read(st)],
        subscribe=inbox + [s.events()],
    )
    admin = NatsUser("admin", "stream administration with the `nats` CLI (delete, purge, restore)", full=True)
    # Only the meter drives its durable consumer on the allocation stream: another user
    # pulling and acknowledging from it, or deleting it, would leave leases unbilled.
    alloc, durable = s.stream(ALLOC), m.durable
    meter_consumer = [f"{JS}.CONSUMER.DELETE.{alloc}.{durable}", f"{JS}.CONSUMER.CREATE.{alloc}.{durable}",
                      f"{JS}.CONSUMER.CREATE.{alloc}.{durable}.>", f"{JS}.CONSUMER.DURABLE.CREATE.{alloc}.{durable}",
                      f"{JS}.CONSUMER.MSG.NEXT.{alloc}.{durable}", f"$JS.ACK.{alloc}.{durable}.>"]
    # The same for the meter's reliability consumer: another user acknowledging from it
    # would leave facts out of the record that ranking reads.
    reliability = "meter-reliability"
    meter_consumer += [f"{JS}.CONSUMER.DELETE.{alloc}.{reliability}", f"{JS}.CONSUMER.CREATE.{alloc}.{reliability}",
                       f"{JS}.CONSUMER.CREATE.{alloc}.{reliability}.>",
                       f"{JS}.CONSUMER.DURABLE.CREATE.{alloc}.{reliability}",
                       f"{JS}.CONSUMER.MSG.NEXT.{alloc}.{reliability}", f"$JS.ACK.{alloc}.{reliability}.>"]
    # Only the broker reads or writes its failover work queue: another user taking a
    # lease.failed or lease.lost from it would leave that lease never replaced.
    failover_consumer = [f"{JS}.CONSUMER.DELETE.{failover_work}.*", f"{JS}.CONSUMER.CREATE.{failover_work}",
                         f"{JS}.CONSUMER.CREATE.{failover_work}.>", f"{JS}.CONSUMER.DURABLE.CREATE.{failover_work}.*",
                         f"{JS}.CONSUMER.MSG.NEXT.{failover_work}.*", f"$JS.ACK.{failover_work}.>",
                         s.failover_work()]
    for user in (registry, broker, meter):
        user.deny_publish = list(JS_DENY)
    for user in (registry, broker, ops):
        user.deny_publish += meter_consumer
    for user in (registry, meter, ops):
        user.deny_publish += failover_consumer
    for user in (registry, broker, meter, ops):
        user.publish, user.subscribe = _unique(user.publish), _unique(user.subscribe)
    return [registry, broker, meter, ops, admin]


def password_env(user: str, server: str = "NATS") -> str:
    return f"CB_{server}_{user.upper()}_PASSWORD"


def _list(items: list[str], indent: str) -> str:
    return "[\n" + "".join(f'{indent}  "{item}"\n' for item in items) + f"{indent}]"


def render_nats(prefix: str = "cb") -> str:
    out = [
        "# NATS service accounts of Compute Broker: one user per service, each allowed to",
        "# publish and subscribe only on the subjects its code uses (DESIGN.md, Security).",
        "# GENERATED by `python deploy/permissions.py nats` from services/common/subjects.py",
        "# and the meter's MeterNames; edit the generator, not this file.",
        "#",
        f"# Subjects, streams and buckets carry the deployment prefix `{prefix}` (CB_PREFIX).",
        "# Passwords come from nats-server's environment ($CB_NATS_<USER>_PASSWORD); the",
        "# server refuses to start when one is unset. A service puts its user in NATS_URL:",
        "#     NATS_URL=nats://broker:<password>@nats:4222",
        "# Include this file from a server config: `include \"auth.conf\"`.",
        "",
        "accounts {",
        "  # Every service and operator of one deployment, with JetStream.",
        "  CB {",
        "    jetstream: enabled",
        "    users: [",
    ]
    for user in nats_users(prefix):
        out.append(f"      # {user.name}: {user.why}")
        out.append(f"      {{ user: {user.name}, password: ${password_env(user.name)}, permissions: {{")
        if user.full:
            out.append('        publish: ">", subscribe: ">"')
        else:
            pub = f"        publish: {{\n          allow: {_list(user.publish, '          ')}"
            if user.deny_publish:
                pub += f"\n          deny: {_list(user.deny_publish, '          ')}"
            out.append(pub + "\n        }")
            out.append(f"        subscribe: {{ allow: {_list(user.subscribe, '        ')} }}")
            if user.allow_responses:
                out.append("        allow_responses: true")
        out.append("      } }")
    out += [
        "    ]",
        "  }",
        "  # The system account: server monitoring for operators (`nats server report ...`).",
        "  SYS {",
        f"    users: [ {{ user: sys, password: ${password_env('sys')} }} ]",
        "  }",
        "}",
        "system_account: SYS",
        "",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------------ Redis


@dataclass
class RedisUser:
    name: str
    why: str
    keys: list[str]
    commands: list[str]


# Every user: health (/ready pings) and the client library's handshakes; with
# CB_REDIS_CLUSTER, redis-py's cluster client also reads the slot map and the command
# table (to find each command's keys).
CONNECTION = ["ping", "client|setinfo", "client|setname", "select", "cluster|slots", "cluster|shards", "command"]
# Every service: the per-key rate limit and the key's live record (services/common/ratelimit.py:
# INCRBY/PEXPIRE/PTTL in a script, EXISTS).
BASE_COMMANDS = CONNECTION + ["incrby", "pexpire", "pttl", "exists"]
# Lua scripts: EVALSHA, and SCRIPT LOAD/EXISTS when the server does not know the script yet.
# Commands a script calls are checked against the caller's ACL too, so those are listed.
SCRIPT_COMMANDS = ["evalsha", "eval", "script|load", "script|exists"]


def redis_users(prefix: str = "cb") -> list[RedisUser]:
    k = Keys(prefix)
    anykey = k.api_key("*")
    every = [anykey, k.rate_limit("*")]  # API-key cache and rate-limit counters, in every service
    pool = [k.pool("*", "*"), k.region_pools("*"), k.heartbeats("*")]  # shared by registry and broker
    registry = RedisUser(
        "registry", "pools, heartbeats and the pool index; API-key cache",
        keys=pool + [k.pool_leases("*", "*"), k.removed_pools("*"), k.pool_index(), k.regions(),
                     k.rebuilt_marker("registry"), k.reliability_all(), *every],  # reliability: read (pool views)
        commands=BASE_COMMANDS + SCRIPT_COMMANDS + [
            "get", "set", "del", "exists", "hget", "hmget", "hgetall", "hset", "hsetnx", "hdel", "hincrby",
            "sadd", "srem", "smembers", "zadd", "zrem", "zrangebyscore", "lrange"],
    )
    broker = RedisUser(
        "broker", "reservations on the pools, leases, queue, requests, idempotency keys; API-key cache",
        keys=[k.pool("*", "*"), k.pool_leases("*", "*"), k.lease("*", "*"), k.lease_expiry("*"), k.lease_outbox("*"), k.interruptible_leases("*"), k.leases_ready("*"),
                     k.lease_provisioning("*"), k.lease_index(), k.tenant_leases("*"), k.tenant_requests("*"), k.request("*"),
                     k.idempotency("*", "*"), k.queue(), k.tenant_vtime(), k.budget_blocked(), k.lock("*"),
                     k.rebuilt_marker("*"), k.reliability_all(), *every],  # reliability: read (ranking, its endpoint)
        commands=BASE_COMMANDS + SCRIPT_COMMANDS + [
            "get", "set", "del", "exists", "hget", "hmget", "hgetall", "hset", "hsetnx", "hdel", "hincrby",
            "sadd", "srem", "smembers", "sismember", "zadd", "zrem", "zrange", "zrangebyscore", "zrank", "zcard",
            "zscore", "lrange", "mget", "hscan"],  # hscan: the sweep reads the lease outbox (docs/lifecycle.md)
    )
    meter = RedisUser(
        "meter", "API-key cache, rate limits and the reliability record: the meter's own state is in JetStream",
        keys=[k.reliability_all(), *every],
        commands=BASE_COMMANDS + SCRIPT_COMMANDS + [
            "get", "set",
            # the reliability record (services/meter/reliability): its script, and its rebuild
            "exists", "del", "scan", "expire", "hincrby", "hmget", "hset", "incr", "lpush", "ltrim", "sadd"],
    )
    # `cbroker audit` reads each region in one Lua script (a consistent snapshot); a script
    # runs with its caller's ACL, so with only @read it cannot write either.
    ops = RedisUser("ops", "operators and `cbroker audit`: read every key of the deployment",
                    keys=[f"{prefix}:*"], commands=CONNECTION + SCRIPT_COMMANDS + ["@read"])
    for user in (registry, broker, meter, ops):
        user.keys, user.commands = _unique(user.keys), _unique(user.commands)
    return [registry, broker, meter, ops]


def redis_hash_placeholder(user: str) -> str:
    return "${" + f"CB_REDIS_{user.upper()}_SHA256" + "}"


def render_redis(prefix: str = "cb") -> str:
    # No comments: Redis (6.2 at least) refuses any line of an ACL file that is not a
    # `user` line. What the users are for is in deploy/README.md and docs/deployment.md.
    out = [
        "user default off",
    ]
    for user in redis_users(prefix):
        patterns = " ".join(f"~{p}" for p in user.keys)
        commands = " ".join(f"+{c}" for c in user.commands)
        out.append(f"user {user.name} on #{redis_hash_placeholder(user.name)} resetkeys {patterns} "
                   f"resetchannels -@all {commands}")
    out.append(f"user admin on #{redis_hash_placeholder('admin')} ~* &* +@all")
    out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------ Kubernetes


NAMESPACE = "compute-broker"
SECRET = "cb-secrets"


def secret_data(passwords: dict[str, str], admin_key: str, nats_host: str = "nats", redis_host: str = "redis") -> dict[str, str]:
    """The keys of the Secret deploy/k8s reads: each service's NATS_URL and REDIS_URL with
    its own user, the servers' passwords, the bootstrap admin key."""
    data = {"admin-key": admin_key}
    for svc in SERVICES:
        data[f"{svc}-nats-url"] = f"nats://{svc}:{passwords['nats-' + svc]}@{nats_host}:4222"
        data[f"{svc}-redis-url"] = f"redis://{svc}:{passwords['redis-' + svc]}@{redis_host}:6379/0"
    for user in nats_users():
        data[f"nats-{user.name}-password"] = passwords[f"nats-{user.name}"]
    data["nats-sys-password"] = passwords["nats-sys"]
    for user in [*redis_users(), RedisUser("admin", "", [], [])]:
        data[f"redis-{user.name}-password"] = passwords[f"redis-{user.name}"]
    return data


def render_secret(namespace: str = NAMESPACE) -> str:
    """A Secret with fresh random passwords (hex: safe in URLs and in sed)."""
    import json
    import secrets

    names = [f"nats-{u.name}" for u in nats_users()] + ["nats-sys"]
    names += [f"redis-{u.name}" for u in redis_users()] + ["redis-admin"]
    data = secret_data({n: secrets.token_hex(24) for n in names}, secrets.token_hex(32))
    lines = ["apiVersion: v1", "kind: Secret", "metadata:", f"  name: {SECRET}", f"  namespace: {namespace}",
             "type: Opaque", "stringData:"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in data.items()]
    return "\n".join(lines) + "\n"


SERVER_FILES = {  # ConfigMap -> file name in it -> the file in deploy/
    "nats-config": {"nats.conf": "nats/cluster.conf", "auth.conf": "nats/auth.conf"},
    "redis-config": {"redis.conf": "redis/redis.conf", "users.acl": "redis/users.acl"},
}


def render_configmaps(namespace: str = NAMESPACE) -> str:
    """The servers' ConfigMaps, carrying deploy/nats and deploy/redis files unchanged."""
    docs = []
    for name, files in SERVER_FILES.items():
        lines = ["# GENERATED by `python deploy/permissions.py configmaps` from the files in deploy/nats",
                 "# and deploy/redis; edit those, then render again.",
                 "apiVersion: v1", "kind: ConfigMap", "metadata:", f"  name: {name}", f"  namespace: {namespace}",
                 "  labels: {app.kubernetes.io/part-of: compute-broker}", "data:"]
        for key, path in files.items():
            text = (ROOT / "deploy" / path).read_text(encoding="utf-8")
            lines.append(f"  {key}: |")
            lines += [f"    {line}" if line else "" for line in text.splitlines()]
        docs.append("\n".join(lines) + "\n")
    return "---\n".join(docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["nats", "redis", "secret", "configmaps"])
    parser.add_argument("--prefix", default="cb", help="the deployment's CB_PREFIX")
    parser.add_argument("--namespace", default=NAMESPACE, help="the Kubernetes namespace (secret)")
    args = parser.parse_args(argv)
    render = {"nats": lambda: render_nats(args.prefix), "redis": lambda: render_redis(args.prefix),
              "secret": lambda: render_secret(args.namespace),
              "configmaps": lambda: render_configmaps(args.namespace)}[args.what]
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
