"""The services run under the service accounts of deploy/, and nothing more is allowed.

nats-server and redis-server start from the files in deploy/ themselves: nats.conf with
its ``include "auth.conf"`` turned on (and its port and store directory templated), the
generated auth.conf unchanged; redis.conf unchanged with users.acl (its password hash
placeholders filled) passed as ``--aclfile`` and the port and directory as flags. The
three services run as processes, each with its own user in NATS_URL and REDIS_URL. A real
flow works end to end, a Redis rebuild from JetStream included, without one permission
refusal on either server; and the accounts stop what they should: the meter cannot
publish capacity events, a service cannot delete a stream or drain the meter's consumer,
a Redis user cannot touch keys or commands outside its ACL. Two more tests run the
cluster config as a two-region super-cluster and the ACL users on a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import msgspec
import nats
import pytest
import redis.asyncio as aioredis
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, NoStreamResponseError
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from services.cli.servers import find_binary, free_port, stop_process, wait_port
from services.common.settings import Settings
from services.common.subjects import Subjects

from ..helpers import eventually
from ..procs import service_process

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
USERS = ("registry", "broker", "meter", "ops", "admin", "sys")
PREFIX = "cb"  # the prefix the committed files are rendered for
SUBJECTS = Subjects(PREFIX)
POOL = {"region": "cn-gz", "zone": "cn-gz-a", "model": "huawei-ascend-910b", "units": 16, "units_per_node": 8,
        "prices": {"currency": "USD", "on_demand": "1.20", "reserved_month": "700"}}


@dataclass
class Secured:
    nats_port: int
    redis_port: int
    passwords: dict[str, str]
    nats_log: Path
    urls: dict[str, str]  # service -> HTTP base URL
    logs: dict[str, Path]
    admin_key: str

    def nats_url(self, user: str) -> str:
        return f"nats://{user}:{self.passwords[user]}@127.0.0.1:{self.nats_port}"

    def redis_url(self, user: str) -> str:
        return f"redis://{user}:{self.passwords[user]}@127.0.0.1:{self.redis_port}/0"


def _substitute(text: str, old: str, new: str) -> str:
    """Replace a line the test relies on; fail loudly if deploy/ no longer has it."""
    assert re.search(old, text, re.M), f"deploy file has no line matching {old!r}"
    return re.sub(old, new, text, count=1, flags=re.M)


def nats_config(tmp: Path, port: int, http_port: int) -> Path:
    """deploy/nats/nats.conf with the service accounts switched on, on free ports."""
    conf = (DEPLOY / "nats" / "nats.conf").read_text(encoding="utf-8")
    conf = _substitute(conf, r"^listen:.*$", f"listen: 127.0.0.1:{port}")
    conf = _substitute(conf, r"^http_port:.*$", f"http_port: {http_port}")
    conf = _substitute(conf, r"^(\s*)store_dir:.*$", rf'\1store_dir: "{tmp / "jetstream"}"')
    conf = _substitute(conf, r'^# include "auth.conf"$', 'include "auth.conf"')
    (tmp / "auth.conf").write_bytes((DEPLOY / "nats" / "auth.conf").read_bytes())
    (tmp / "nats.conf").write_text(conf, encoding="utf-8")
    return tmp / "nats.conf"


def redis_acl(tmp: Path, passwords: dict[str, str]) -> Path:
    """deploy/redis/users.acl with each placeholder replaced by its password's SHA-256."""
    def fill(m: re.Match[str]) -> str:
        return hashlib.sha256(passwords[m.group(1).lower()].encode()).hexdigest()

    acl = re.sub(r"\$\{CB_REDIS_(\w+)_SHA256\}", fill, (DEPLOY / "redis" / "users.acl").read_text(encoding="utf-8"))
    (tmp / "users.acl").write_text(acl, encoding="utf-8")
    return tmp / "users.acl"


@contextlib.contextmanager
def server(args: list[str], port: int, log: Path, env: dict[str, str], what: str) -> Iterator[subprocess.Popen]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        wait_port(port, proc, what=what)
        yield proc
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("secured")
    passwords = {u: secrets.token_hex(16) for u in USERS}
    nats_port, redis_port = free_port(), free_port()
    env = {**os.environ, **{f"CB_NATS_{u.upper()}_PASSWORD": pw for u, pw in passwords.items()}}
    nats_args = [find_binary("nats-server"), "-c", str(nats_config(tmp, nats_port, free_port()))]
    redis_args = [find_binary("redis-server"), str(DEPLOY / "redis" / "redis.conf"), "--port", str(redis_port),
                  "--bind", "127.0.0.1", "--dir", str(tmp), "--aclfile", str(redis_acl(tmp, passwords))]
    admin_key = secrets.token_hex(16)
    with contextlib.ExitStack() as stack:
        stack.enter_context(server(nats_args, nats_port, tmp / "nats.log", env, "nats-server"))
        stack.enter_context(server(redis_args, redis_port, tmp / "redis.log", dict(os.environ), "redis-server"))
        s = Secured(nats_port, redis_port, passwords, tmp / "nats.log", {}, {}, admin_key)
        for name in ("registry", "broker", "meter"):  # the registry first: it serves the catalogue RPC
            settings = Settings(nats_url=s.nats_url(name), redis_url=s.redis_url(name), prefix=PREFIX,
                                admin_key=admin_key, sweep_interval_s=0.5)
            svc = stack.enter_context(service_process(name, settings, tmp))
            s.urls[name], s.logs[name] = svc.url, svc.log_path
        yield s


async def reset_acl_log(s: Secured) -> None:
    admin = aioredis.Redis.from_url(s.redis_url("admin"))
    try:
        await admin.acl_log_reset()
    finally:
        await admin.aclose()


async def acl_refusals(s: Secured) -> list[dict]:
    """Redis's ACL LOG, less redis-py's CLIENT SETINFO handshake (Redis 6.2 does not know
    the subcommand, so it counts as a refused command; the client ignores the refusal)."""
    admin = aioredis.Redis.from_url(s.redis_url("admin"))
    try:
        return [e for e in await admin.acl_log(count=1000) if e.get("object") != "client"]
    finally:
        await admin.aclose()


def log_sizes(s: Secured) -> dict[str, int]:
    return {name: path.stat().st_size for name, path in {**s.logs, "nats-server": s.nats_log}.items()}


def refusals_in_logs(s: Secured, since: dict[str, int]) -> dict[str, list[str]]:
    """Lines that say NATS or Redis refused something, written after ``since``."""
    found = {}
    for name, path in {**s.logs, "nats-server": s.nats_log}.items():
        with open(path, "rb") as f:
            f.seek(since[name])
            text = f.read().decode(errors="replace")
        lines = [ln for ln in text.splitlines() if re.search(r"violation|NOPERM|no permissions", ln, re.I)]
        if lines:
            found[name] = lines[:5]
    return found


async def test_the_services_work_under_their_accounts(secured: Secured) -> None:
    s = secured
    logs_before = log_sizes(s)
    await reset_acl_log(s)
    async with httpx.AsyncClient(timeout=10) as http:
        for url in s.urls.values():  # /ready checks NATS, Redis and the streams as the service's user
            last: list[httpx.Response] = []

            async def ready(url: str = url) -> bool:
                last[:] = [await http.get(f"{url}/ready")]
                return last[0].status_code == 200

            with contextlib.suppress(AssertionError):
                await eventually(ready, timeout=20)
            assert last[0].status_code == 200, f"{url}/ready: {last[0].status_code} {last[0].text}"
        admin = {"Authorization": f"Bearer {s.admin_key}"}

        async def key(role: str, subject: str) -> dict[str, str]:
            r = await http.post(f"{s.urls['registry']}/v1/keys", json={"role": role, "subject": subject},
                                headers=admin)
            assert r.status_code == 201, r.text
            return {"Authorization": f"Bearer {r.json()['key']}"}

        provider, tenant, ops = await key("provider", "acme"), await key("tenant", "t1"), await key("ops", "")
        r = await http.put(f"{s.urls['registry']}/v1/pools/gz-1", json=POOL, headers=provider)
        assert r.status_code == 201, r.text

        placed: list[dict] = []

        keyed = {**tenant, "Idempotency-Key": ""}  # the key's durable copy: the broker's own KV bucket

        async def place() -> bool:  # the broker hears of the pool through the capacity events
            keyed["Idempotency-Key"] = secrets.token_hex(8)  # a 409 "no capacity yet" is remembered per key
            r = await http.post(f"{s.urls['broker']}/v1/requests", json={"units": 4, "queue": False},
                                headers=keyed)
            assert r.status_code in (201, 409, 422, 503), r.text  # 503: Redis being rebuilt
            if r.status_code == 201:
                placed.append(r.json())
            return bool(placed)

        await eventually(place, timeout=20, every=0.2)
        r = await http.post(f"{s.urls['broker']}/v1/requests", json={"units": 4, "queue": False}, headers=keyed)
        assert r.status_code == 201 and r.json()["request_id"] == placed[0]["request_id"], r.text
        lease = placed[0]["leases"][0]
        assert lease["pool_id"] == "gz-1" and lease["units"] == 4
        r = await http.get(f"{s.urls['registry']}/v1/pools/gz-1", headers=provider)
        assert r.json()["leased"] == 4, r.text
        r = await http.post(f"{s.urls['broker']}/v1/leases/{lease['lease_id']}/release", headers=tenant)
        assert r.status_code == 200, r.text
        usage: list[dict] = []

        async def billed() -> bool:  # the meter consumed the allocation events and posted usage
            r = await http.get(f"{s.urls['meter']}/v1/usage", headers=tenant)
            assert r.status_code == 200, r.text
            usage[:] = r.json()["rows"]
            return bool(usage)

        await eventually(billed, timeout=20, every=0.2)
        # released at once: the 60 s minimum of 4 units at 1.20 per unit-hour
        assert sum(Decimal(row["amount"]) for row in usage) == Decimal("0.08"), usage
        # a delivered lease: the provider's answer stored in the broker's access bucket, then deleted
        r = await http.put(f"{s.urls['registry']}/v1/pools/gz-ssh", json={**POOL, "delivery": ["ssh"]},
                           headers=provider)
        assert r.status_code == 201, r.text
        delivering = {"units": 1, "queue": False, "workload": {"kind": "ssh", "public_keys": [
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA t1@laptop"]}}

        async def place_delivering() -> dict | None:
            r = await http.post(f"{s.urls['broker']}/v1/requests", json=delivering, headers=tenant)
            assert r.status_code in (201, 409, 422, 503), r.text
            return r.json()["leases"][0] if r.status_code == 201 else None

        ssh = await eventually(place_delivering, timeout=20, every=0.2)
        assert ssh["pool_id"] == "gz-ssh" and ssh["state"] == "provisioning"
        r = await http.post(f"{s.urls['broker']}/v1/leases/{ssh['lease_id']}/ready", headers=provider,
                            json={"access": {"host": "gz-ssh.example", "port": 22}})
        assert r.status_code == 200, r.text
        r = await http.get(f"{s.urls['broker']}/v1/leases/{ssh['lease_id']}", headers=tenant)
        assert r.json()["access"] == {"host": "gz-ssh.example", "port": 22}, r.text
        r = await http.post(f"{s.urls['broker']}/v1/leases/{ssh['lease_id']}/release", headers=tenant)
        assert r.status_code == 200, r.text
        # a pool that shares its devices: its per-device hash written by the registry's
        # user, a share taken and given back by the broker's (issue 14)
        r = await http.put(f"{s.urls['registry']}/v1/pools/gz-share", headers=provider,
                           json={**POOL, "units": 8, "sharing": {"mode": "time_slice"}})
        assert r.status_code == 201, r.text

        async def place_share() -> dict | None:
            r = await http.post(f"{s.urls['broker']}/v1/requests", headers=tenant,
                                json={"units": 1, "share": {"milli": 250}, "queue": False})
            assert r.status_code in (201, 409, 422, 503), r.text
            return r.json()["leases"][0] if r.status_code == 201 else None

        share = await eventually(place_share, timeout=20, every=0.2)
        assert share["pool_id"] == "gz-share", share
        r = await http.post(f"{s.urls['broker']}/v1/leases/{share['lease_id']}/release", headers=tenant)
        assert r.status_code == 200, r.text
        # the registry's event stream (ordered consumers on every stream) replays all of it
        r = await http.get(f"{s.urls['registry']}/v1/events", params={"follow": "false", "since": "all"},
                           headers=ops)
        assert r.status_code == 200, r.text
        for kind in ("pool.registered", "lease.granted", "lease.released", "request.placed"):
            assert f'"{kind}"' in r.text, f"{kind} missing from the event stream: {r.text[:2000]}"
        # a budget (the meter's buckets and billing events) and a key revoked at once
        # everywhere (the registry's broadcast, heard by the broker and the meter)
        r = await http.put(f"{s.urls['meter']}/v1/budgets/t1", headers=admin,
                           json={"kind": "prepaid", "amount": "500.00", "currency": "USD"})
        assert r.status_code == 200, r.text
        spare = await http.post(f"{s.urls['registry']}/v1/keys", json={"role": "tenant", "subject": "t2"},
                                headers=admin)
        spare_key = {"Authorization": f"Bearer {spare.json()['key']}"}
        assert (await http.get(f"{s.urls['meter']}/v1/usage", headers=spare_key)).status_code == 200
        r = await http.delete(f"{s.urls['registry']}/v1/keys/{spare.json()['key_id']}", headers=admin)
        assert r.status_code == 200, r.text

        async def revoked() -> bool:
            return (await http.get(f"{s.urls['meter']}/v1/usage", headers=spare_key)).status_code == 401

        await eventually(revoked, timeout=10)
        # Redis lost: the registry refills it from its records and the broker replays the
        # allocation and request streams, each as its own user; then placing works again
        admin_redis = aioredis.Redis.from_url(s.redis_url("admin"))
        try:
            await admin_redis.flushall()
        finally:
            await admin_redis.aclose()
        placed.clear()
        await eventually(place, timeout=30, every=0.3)
    # the auditor runs as `ops`: it reads Redis and JetStream and changes nothing
    audit = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "services.cli", "audit", "--nats-url", s.nats_url("ops"), "--redis-url",
        s.redis_url("ops"), "--prefix", PREFIX, "--meter-url", s.urls["meter"], "--key", ops["Authorization"][7:]],
        capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert await acl_refusals(s) == [], "a service was refused by Redis"
    assert refusals_in_logs(s, logs_before) == {}, "a service was refused by NATS or Redis"
    for name, path in s.logs.items():  # the URLs carry passwords: never written to a log
        assert s.passwords[name] not in path.read_text(errors="replace"), f"{name} logged its password"


class Violations:
    """A NATS connection as one user, collecting the server's asynchronous errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def connect(self, url: str) -> nats.NATS:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        return await nats.connect(url, error_cb=on_error, max_reconnect_attempts=0)

    async def wait(self, subject: str) -> None:
        async def seen() -> bool:
            return any("permissions violation" in e.lower() and subject.lower() in e.lower() for e in self.errors)

        with contextlib.suppress(AssertionError):
            await eventually(seen, timeout=15)
        assert await seen(), f"no permissions violation for {subject}; the server said {self.errors}"


@pytest.mark.parametrize(("user", "subject"), [
    ("meter", SUBJECTS.capacity("cn-gz", "acme")),  # only the registry says what capacity exists
    ("broker", SUBJECTS.capacity("cn-gz", "acme")),
    ("meter", SUBJECTS.alloc("cn-gz", "t1")),  # only the broker grants leases
    ("registry", SUBJECTS.billing("t1")),  # only the meter bills
    ("broker", f"$KV.{SUBJECTS.bucket('pools')}.forged"),  # only the registry writes pool records
    ("meter", f"$KV.{SUBJECTS.bucket('keys')}.forged"),  # only the registry issues API keys
])
async def test_a_service_cannot_publish_outside_its_subjects(secured: Secured, user: str, subject: str) -> None:
    watch = await nats.connect(secured.nats_url("admin"))
    seen: list[bytes] = []

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.data)

    sub = await watch.subscribe(subject, cb=on_msg)
    await watch.flush()
    stream = "KV_" + subject.split(".")[1] if subject.startswith("$KV.") else SUBJECTS.stream(subject.split(".")[2])
    before = (await watch.jetstream().stream_info(stream)).state.last_seq
    v = Violations()
    nc = await v.connect(secured.nats_url(user))
    try:
        await nc.publish(subject, msgspec.json.encode({"type": "forged"}))
        await nc.flush()
        await v.wait(subject)  # the server refused it: 'Permissions Violation for Publish to "..."'
        with pytest.raises((NoRespondersError, NatsTimeout)):  # as a JetStream publish: no ack
            await nc.jetstream(timeout=1).publish(subject, b"{}")
        await watch.flush()
        assert seen == []  # nobody received it
        assert (await watch.jetstream().stream_info(stream)).state.last_seq == before  # nothing stored
    finally:
        await sub.unsubscribe()
        await nc.close()
        await watch.close()


async def test_a_service_cannot_delete_or_purge_a_stream(secured: Secured) -> None:
    async def refused(user: str, act: str) -> None:
        nc = await nats.connect(secured.nats_url(user))
        js = nc.jetstream(timeout=1)
        try:
            with pytest.raises((NoRespondersError, NatsTimeout, APIError)):
                await getattr(js, act)(SUBJECTS.stream("alloc"))
        finally:
            await nc.close()

    # all at once: a refused request is a 1 s timeout each (the server answers nothing)
    await asyncio.gather(*(refused(user, act) for user in ("registry", "broker", "meter", "ops")
                           for act in ("delete_stream", "purge_stream")))
    nc = await nats.connect(secured.nats_url("admin"))  # the operator's account still can act on it
    try:
        assert (await nc.jetstream().stream_info(SUBJECTS.stream("alloc"))).config.name == "CB_ALLOC"
    finally:
        await nc.close()


@pytest.mark.parametrize(("kind", "durable", "others", "ops_sees"), [
    ("alloc", "meter", ("registry", "broker"), True),
    ("alloc", "meter-reliability", ("registry", "broker"), True),
    ("failover", "broker-failover", ("registry", "meter", "ops"), True)])
async def test_only_its_service_drives_its_durable_consumers(secured: Secured, kind: str, durable: str,
                                                             others: tuple[str, ...], ops_sees: bool) -> None:
    """Another service pulling (and acknowledging) from the meter's durable consumers, or
    deleting them, would leave leases unbilled or facts out of the reliability record;
    from the broker's failover work queue, failed and lost leases never replaced: refused.
    Ops may still look at the allocation stream's consumers."""
    stream = SUBJECTS.stream(kind)
    admin = await nats.connect(secured.nats_url("admin"))
    try:
        await admin.jetstream().consumer_info(stream, durable)  # its service made it at start

        async def refused(user: str) -> None:
            v = Violations()
            nc = await v.connect(secured.nats_url(user))
            try:
                with pytest.raises((NoRespondersError, NatsTimeout, APIError)):
                    await nc.jetstream(timeout=1).delete_consumer(stream, durable)
                next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
                await nc.publish(next_subject, b'{"batch": 1}', reply=nc.new_inbox())
                await nc.flush()
                await v.wait(next_subject)
            finally:
                await nc.close()

        await asyncio.gather(*(refused(user) for user in others))  # at once: a refusal is a 1 s timeout each
        if ops_sees:
            ops = await nats.connect(secured.nats_url("ops"))
            try:
                assert (await ops.jetstream().consumer_info(stream, durable)).name == durable
            finally:
                await ops.close()
        assert (await admin.jetstream().consumer_info(stream, durable)).name == durable  # still there
    finally:
        await admin.close()


async def test_a_service_cannot_subscribe_to_what_it_does_not_read(secured: Secured) -> None:
    v = Violations()
    nc = await v.connect(secured.nats_url("meter"))
    try:
        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            raise AssertionError("the meter was delivered a request for the registry")

        await nc.subscribe(SUBJECTS.rpc("registry", "catalogue"), cb=on_msg)
        await nc.flush()
        await v.wait(SUBJECTS.rpc("registry", "catalogue"))
    finally:
        await nc.close()


async def test_unknown_users_and_wrong_passwords_are_refused(secured: Secured) -> None:
    for url in (f"nats://127.0.0.1:{secured.nats_port}",
                f"nats://meter:wrong@127.0.0.1:{secured.nats_port}"):
        with pytest.raises(Exception, match="(?i)authorization"):
            await nats.connect(url, max_reconnect_attempts=0, allow_reconnect=False)
    for url in (f"redis://127.0.0.1:{secured.redis_port}/0", f"redis://meter:wrong@127.0.0.1:{secured.redis_port}/0"):
        r = aioredis.Redis.from_url(url)
        try:
            with pytest.raises((AuthenticationError, ResponseError)):  # NOAUTH / WRONGPASS
                await r.get(f"{PREFIX}:queue")
        finally:
            await r.aclose()


async def test_a_redis_user_cannot_touch_keys_outside_its_patterns(secured: Secured) -> None:
    conns = {u: aioredis.Redis.from_url(secured.redis_url(u)) for u in ("registry", "broker", "meter", "ops")}
    try:
        pool_key = f"{PREFIX}:{{cn-gz}}:pool:gz-1"
        assert await conns["meter"].set(f"{PREFIX}:apikey:probe", "x")  # its own pattern works
        with pytest.raises(NoPermissionError):  # the meter has no business with pools
            await conns["meter"].hgetall(pool_key)
        with pytest.raises(NoPermissionError):  # the registry does not touch the broker's queue
            await conns["registry"].zadd(f"{PREFIX}:queue", {"forged": 1})
        with pytest.raises(NoPermissionError):  # ... nor leases
            await conns["registry"].hset(f"{PREFIX}:{{cn-gz}}:lease:forged", "units", 1)
        with pytest.raises(NoPermissionError):  # the broker does not register pools
            await conns["broker"].hset(f"{PREFIX}:poolidx", "forged", "cn-gz")
        with pytest.raises(NoPermissionError):  # no service reaches outside the deployment's prefix
            await conns["broker"].set("other:queue", "x")
        with pytest.raises(NoPermissionError):  # ops reads, never writes
            await conns["ops"].set(f"{PREFIX}:queue", "x")
        with pytest.raises(ResponseError, match="(?i)can't run this command"):  # ... not even in a script
            await conns["ops"].eval("return redis.call('SET', KEYS[1], 'x')", 1, f"{PREFIX}:queue")
        assert await conns["ops"].exists(pool_key) in (0, 1)  # ... and reads
        for user in ("registry", "broker", "meter"):  # nor the commands that wipe or reconfigure
            for command in (("FLUSHALL",), ("CONFIG", "SET", "save", "60 1"), ("KEYS", "*")):
                with pytest.raises(NoPermissionError):
                    await conns[user].execute_command(*command)
        # a Lua script runs with its caller's ACL: the registry's pool script cannot free leases
        with pytest.raises(ResponseError, match="(?i)can't access|no permissions"):
            await conns["registry"].eval("return redis.call('DEL', KEYS[1])", 1, f"{PREFIX}:{{cn-gz}}:lexp")
    finally:
        for c in conns.values():
            await c.aclose()


def cluster_config(tmp: Path, region: str, ports: dict[str, dict[str, int]]) -> Path:
    """deploy/nats/cluster.conf for one single-server region on loopback: its listen
    addresses, store, route and the gateway URLs templated, everything else as shipped."""
    p = ports[region]
    conf = (DEPLOY / "nats" / "cluster.conf").read_text(encoding="utf-8")
    conf = _substitute(conf, r"^listen: 0\.0\.0\.0:4222$", f"listen: 127.0.0.1:{p['client']}")
    conf = _substitute(conf, r"^http_port:.*$", f"http_port: {p['monitor']}")
    conf = _substitute(conf, r"^(\s*)store_dir:.*$", rf'\1store_dir: "{tmp / region}"')
    conf = _substitute(conf, r"^(\s*)listen: 0\.0\.0\.0:6222$", rf"\1listen: 127.0.0.1:{p['cluster']}")
    conf = _substitute(conf, r"^(\s*)routes: \[[^\]]*\]", rf"\1routes: [nats://127.0.0.1:{p['cluster']}]")
    conf = _substitute(conf, r"^(\s*)listen: 0\.0\.0\.0:7222$", rf"\1listen: 127.0.0.1:{p['gateway']}")
    for other, q in ports.items():
        conf = _substitute(conf, rf"nats://nats-gateway\.{other}\.[\w.-]+:7222", f"nats://127.0.0.1:{q['gateway']}")
    (tmp / "auth.conf").write_bytes((DEPLOY / "nats" / "auth.conf").read_bytes())
    (tmp / f"{region}.conf").write_text(conf, encoding="utf-8")
    return tmp / f"{region}.conf"


async def test_regions_join_a_super_cluster_under_the_same_accounts(tmp_path: Path) -> None:
    """Two regions from deploy/nats/cluster.conf, joined by their gateway blocks: a stream
    lives in the region whose server created it, services in the other region publish
    into it and hear its events through the gateway as the same users with the same
    permissions, and when its region is gone a grant cannot be recorded."""
    regions = ("cn-east", "eu-west")
    ports = {r: {k: free_port() for k in ("client", "cluster", "gateway", "monitor")} for r in regions}
    passwords = {u: secrets.token_hex(8) for u in USERS}
    env = {**os.environ, **{f"CB_NATS_{u.upper()}_PASSWORD": pw for u, pw in passwords.items()}}

    def url(user: str, region: str) -> str:
        return f"nats://{user}:{passwords[user]}@127.0.0.1:{ports[region]['client']}"

    with contextlib.ExitStack() as stack:
        servers = {r: stack.enter_context(server(
            [find_binary("nats-server"), "-c", str(cluster_config(tmp_path, r, ports))], ports[r]["client"],
            tmp_path / f"{r}.log", {**env, "CB_REGION": r, "SERVER_NAME": f"{r}-nats-0",
                                    "CB_NATS_GATEWAY_ADVERTISE": f"127.0.0.1:{ports[r]['gateway']}"},
            f"nats-server {r}"))
            for r in regions}
        broker_west = await nats.connect(url("broker", "eu-west"))
        registry_east = await nats.connect(url("registry", "cn-east"))
        meter_east = Violations()
        meter_nc = await meter_east.connect(url("meter", "cn-east"))
        try:
            from services.common.nats_conn import ensure_streams

            async def streams_made() -> bool:  # once the gateways are up and a meta leader is elected
                try:
                    await ensure_streams(broker_west.jetstream(timeout=2), SUBJECTS, 1)
                except Exception:  # noqa: BLE001 - not yet
                    return False
                return True

            await eventually(streams_made, timeout=30, every=0.5)
            info = await broker_west.jetstream().stream_info(SUBJECTS.stream("alloc"))
            assert info.cluster.name == "eu-west"  # placed where it was created
            heard: list[str] = []

            async def on_capacity(msg: nats.aio.msg.Msg) -> None:
                heard.append(msg.subject)

            await broker_west.subscribe(SUBJECTS.events("capacity"), cb=on_capacity)
            await broker_west.flush()
            subject = SUBJECTS.capacity("cn-east", "acme")

            async def crossed() -> bool:  # the broker's interest reaches cn-east through the gateway
                ack = await registry_east.jetstream().publish(subject, b"{}")
                assert ack.stream == SUBJECTS.stream("capacity")
                return subject in heard  # a miss: published again at the next poll

            await eventually(crossed, timeout=10, every=0.2)
            await meter_nc.publish(subject, b"{}")  # the accounts are the same in every region
            await meter_nc.flush()
            await meter_east.wait(subject)
            # the stream's region is gone: a grant from cn-east cannot be recorded
            servers["eu-west"].terminate()
            servers["eu-west"].wait(10)
            broker_east = await nats.connect(url("broker", "cn-east"))
            try:
                with pytest.raises((NoRespondersError, NoStreamResponseError, NatsTimeout)):
                    await broker_east.jetstream(timeout=2).publish(SUBJECTS.alloc("cn-east", "t1"), b"{}")
            finally:
                await broker_east.close()
        finally:
            for nc in (broker_west, registry_east, meter_nc):
                if not nc.is_closed:
                    await nc.close()


async def test_the_redis_users_work_on_a_redis_cluster(tmp_path: Path) -> None:
    """With CB_REDIS_CLUSTER the services use redis-py's cluster client, which also asks
    every node for its slots and the command table: users.acl allows that, and a
    service's scripts run on each region's slot. (tests/cluster.py starts the nodes
    without an ACL file, so the file's rules are given to each node with ACL SETUSER.)"""
    from redis.asyncio.cluster import RedisCluster

    from ..cluster import redis_cluster

    passwords = {u: secrets.token_hex(8) for u in USERS}
    rules = [line.split()[1:] for line in redis_acl(tmp_path, passwords).read_text().splitlines()
             if line.startswith("user ")]
    rules.sort(key=lambda rule: rule[0] == "default")  # `default off` last: it is the session's user
    with redis_cluster(tmp_path / "rc") as rc:
        for node in rc.nodes:
            admin = aioredis.Redis(host="127.0.0.1", port=node.port)
            try:
                for rule in rules:
                    await admin.execute_command("ACL", "SETUSER", *rule)
            finally:
                await admin.aclose()
        seed = rc.nodes[0].port

        def client(user: str) -> RedisCluster:
            return RedisCluster.from_url(f"redis://{user}:{passwords[user]}@127.0.0.1:{seed}/0")

        broker, meter = client("broker"), client("meter")
        try:
            script = broker.register_script("redis.call('HINCRBY', KEYS[1], 'leased', 2) "
                                            "return redis.call('HGET', KEYS[1], 'leased')")
            for region in ("ap-south", "eu-west", "cn-east"):  # slots 4578, 9524, 14136: one per node
                assert await script(keys=[f"{PREFIX}:{{{region}}}:pool:p1"]) == b"2"
            assert await broker.set(f"{PREFIX}:queue:vtime", "1")
            assert await meter.set(f"{PREFIX}:apikey:probe", "x")
            with pytest.raises(NoPermissionError):
                await meter.hget(f"{PREFIX}:{{cn-east}}:pool:p1", "leased")
            with pytest.raises(NoPermissionError):
                await broker.set(f"{PREFIX}:poolidx", "x")
        finally:
            await broker.aclose()
            await meter.aclose()
