"""Issue 11, reproductions 6 and 7 through the HTTP API on real servers:

* a retry of an ``Idempotency-Key`` after a Redis loss answers the lease placed the
  first time, never a second one;
* a broker that dies mid-request leaves its key pending: a retry on another broker gets
  a definitive answer within the placement's deadline plus a margin (not a 409 for 24 h),
  and nothing of the dead broker's attempt stays live or is billed;
* a NATS outage, or a Redis that stalls: placements answer 503 with ``Retry-After``
  within 5 s, and a grant whose client heard 503 is ended in the durable record at its
  grant time (billed nothing), never confirmed after the fact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import msgspec
from redis.asyncio import Redis

from services.cli.audit import read_alloc
from services.cli.servers import ServerProcess, start_nats, start_redis
from services.broker.domain.requests import ComputeRequest
from services.common.keys import Keys
from services.common.messages import LeaseGranted, LeaseLost
from services.common.nats_conn import connect, ensure_streams
from services.common.settings import Settings
from services.common.subjects import Subjects

from ..helpers import eventually
from ..procs import service_processes
from .broker_world import broker_world
from .conftest import pool_body

PENDING_TEST_S = 6.0  # the provisional expiry here: well above a grant's confirmation, far below 30 s

POOLS = {"gz-910b": {"region": "cn-gz", "model": "huawei-ascend-910b", "units": 32, "prices": {"on_demand": "1.20"}}}


async def _alloc_events(nats_url: str, prefix: str) -> list:
    nc = await connect(nats_url, "test-read")
    try:
        events, _ = await read_alloc(nc.jetstream(), Subjects(prefix))
    finally:
        await nc.drain()
    return [event for _, event in events]


def _unbilled(events: list, lease_ids: set[str]) -> None:
    """Each of ``lease_ids`` granted in the record is ended there at its grant time."""
    lost = {e.lease.lease_id: e for e in events if isinstance(e, LeaseLost)}
    for e in events:
        if isinstance(e, LeaseGranted) and e.lease.lease_id in lease_ids:
            assert e.lease.lease_id in lost, f"grant {e.lease.lease_id} (client answered 503) was never ended"
            assert lost[e.lease.lease_id].at == e.lease.granted_at, "ended after its grant time: it is billed"


async def test_retry_after_redis_loss_answers_the_first_lease(settings, nc, rds) -> None:
    async with broker_world(settings, POOLS) as w:
        h = {"Idempotency-Key": "order-redis-loss"}
        first = await w.request("t1", {"units": 4, "queue": False}, headers=h)
        assert first.status_code == 201, first.text
        lease_id = first.json()["leases"][0]["lease_id"]
        keys = [k async for k in rds.scan_iter(match=f"{settings.prefix}:*", count=10_000)]
        await rds.delete(*keys)  # Redis lost everything of this deployment

        async def rebuilt() -> bool:  # the lease is back from the durable record
            r = await w.broker.get(f"/v1/leases/{lease_id}", headers=w.tenants["t1"])
            return r.status_code == 200

        await eventually(rebuilt, timeout=20)
        again = await w.request("t1", {"units": 4, "queue": False}, headers=h)
        assert again.status_code == 201, again.text
        assert again.json()["request_id"] == first.json()["request_id"]
        assert [lease["lease_id"] for lease in again.json()["leases"]] == [lease_id]
        leases = (await w.broker.get("/v1/leases", headers=w.tenants["t1"])).json()
        assert [lease["lease_id"] for lease in leases] == [lease_id], "a second lease for one key"
        assert await w.free("gz-910b") == 28
        # and the key remembers its body across the loss
        r = await w.request("t1", {"units": 5, "queue": False}, headers=h)
        assert r.status_code == 422


@contextlib.contextmanager
def own_nats(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_nats(tmp_path / "own-nats")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


@contextlib.contextmanager
def stalled(server: ServerProcess) -> Iterator[None]:
    """NATS stops answering (its process stopped): connections stay open, nothing is
    acknowledged, as in a network partition."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def streams(url: str, prefix: str) -> AsyncIterator[None]:
    client = await connect(url, "test-setup")
    await ensure_streams(client.jetstream(), Subjects(prefix))
    await client.drain()
    yield


async def _timed(coro) -> tuple[float, httpx.Response | None]:  # noqa: ANN001
    started = time.monotonic()
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=6.0)
    return time.monotonic() - started, (task.result() if done else None)


async def test_nats_outage_answers_503_fast_and_grants_nothing_late(settings: Settings, tmp_path: Path) -> None:
    with own_nats(tmp_path) as server:
        s = msgspec.structs.replace(settings, nats_url=server.url)
        async with streams(server.url, s.prefix), broker_world(s, POOLS) as w:
            assert (await w.request("t1", {"units": 1})).status_code == 201  # warm: keys cached
            before = {lease["lease_id"] for lease in (await w.broker.get("/v1/leases", headers=w.tenants["t1"])).json()}
            with stalled(server):
                took, plain = await _timed(w.request("t1", {"units": 2, "queue": False}))
                took_keyed, keyed = await _timed(w.request("t1", {"units": 3, "queue": False},
                                                           headers={"Idempotency-Key": "nats-outage"}))
            # answered within 5 s, with a 503 the client may retry
            for name, response, seconds in (("plain", plain, took), ("keyed", keyed, took_keyed)):
                assert response is not None, f"{name} placement still hanging after 6 s of NATS outage"
                assert response.status_code == 503, (name, response.status_code, response.text)
                assert seconds <= 5.0, (name, seconds)
            # NATS is back: whatever the answered-503 placements reached is ended at its
            # grant time, nothing of theirs is live (and then a retry of the key places once)

            async def nothing_late() -> bool:
                leases = (await w.broker.get("/v1/leases", headers=w.tenants["t1"])).json()
                return {lease["lease_id"] for lease in leases} == before

            await eventually(nothing_late, timeout=15)
            events = await _alloc_events(server.url, s.prefix)
            late = {e.lease.lease_id for e in events if isinstance(e, LeaseGranted)} - before
            _unbilled(events, late)
            assert await w.free("gz-910b") == 31
            assert plain.headers.get("retry-after") and keyed.headers.get("retry-after")

            async def retried() -> httpx.Response | None:
                r = await w.request("t1", {"units": 3, "queue": False}, headers={"Idempotency-Key": "nats-outage"})
                return r if r.status_code == 201 else None

            r = await eventually(retried, timeout=15, every=0.5)
            again = await w.request("t1", {"units": 3, "queue": False}, headers={"Idempotency-Key": "nats-outage"})
            assert again.json()["request_id"] == r.json()["request_id"]
            assert await w.free("gz-910b") == 28


async def test_redis_stall_answers_503_fast_and_grants_nothing_late(settings: Settings, nc, tmp_path: Path) -> None:
    server = start_redis(tmp_path / "own-redis")
    try:
        # no heartbeats here: the pool must outlive the wait for the sweep below; a short
        # provisional expiry (the default is 30 s) so that the sweep's give-back comes soon
        s = msgspec.structs.replace(settings, redis_url=server.url, heartbeat_ttl_s=300.0, pending_s=PENDING_TEST_S)
        async with broker_world(s, POOLS) as w:
            assert (await w.request("t1", {"units": 1})).status_code == 201
            os.kill(server.proc.pid, signal.SIGSTOP)  # Redis stops answering; its connections stay open
            wake = threading.Timer(8.0, os.kill, (server.proc.pid, signal.SIGCONT))  # however the broker behaves
            wake.start()
            try:
                took, plain = await _timed(w.request("t1", {"units": 2, "queue": False}))
                took_keyed, keyed = await _timed(w.request("t1", {"units": 3, "queue": False},
                                                           headers={"Idempotency-Key": "redis-stall"}))
            finally:
                wake.cancel()
                os.kill(server.proc.pid, signal.SIGCONT)
            for name, response, seconds in (("plain", plain, took), ("keyed", keyed, took_keyed)):
                assert response is not None and response.status_code == 503, (name, response)
                assert seconds <= 5.0, (name, seconds)
                assert response.headers.get("retry-after"), name

            async def nothing_late() -> bool:  # Redis is back: the 503s left no lease and no units taken
                leases = (await w.broker.get("/v1/leases", headers=w.tenants["t1"])).json()
                assert len(leases) == 1, "a placement answered 503 holds a lease"
                return await w.free("gz-910b") == 31

            # a reservation the stalled Redis ran only when it woke up (after the broker's undo)
            # is never confirmed: the sweep gives it back at its provisional expiry (pending_s)
            await eventually(nothing_late, timeout=PENDING_TEST_S + 10, every=0.2)
    finally:
        if server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


async def _setup_world(registry_url: str, admin_key: str) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {admin_key}"}
    async with httpx.AsyncClient(base_url=registry_url, headers=admin, timeout=30) as c:
        prov = (await c.post("/v1/keys", json={"role": "provider", "subject": "acme"})).json()["key"]
        tenant = (await c.post("/v1/keys", json={"role": "tenant", "subject": "t1"})).json()["key"]
        r = await c.put("/v1/pools/gz-910b", json=pool_body(**POOLS["gz-910b"]),
                        headers={"Authorization": f"Bearer {prov}"})
        assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {tenant}"}


async def test_key_of_a_broker_killed_mid_request_gets_an_answer(settings: Settings, tmp_path: Path) -> None:
    """Broker 1 takes the request while NATS stalls, and is killed; broker 2 answers the
    retry within the placement deadline and a margin, with one lease."""
    with own_nats(tmp_path) as server:
        s = msgspec.structs.replace(settings, nats_url=server.url)
        async with streams(server.url, s.prefix):
            with service_processes([("registry", s), ("broker", s), ("broker", s)], tmp_path) as (registry, b1, b2):
                tenant = await _setup_world(registry.url, s.admin_key or "")
                body = {"units": 4, "queue": False}
                h = {**tenant, "Idempotency-Key": "killed-mid-request"}
                async with httpx.AsyncClient(timeout=30) as c:
                    assert (await c.post(f"{b1.url}/v1/requests", json={"units": 1}, headers=tenant)).status_code == 201
                    assert (await c.post(f"{b2.url}/v1/requests", json={"units": 1}, headers=tenant)).status_code == 201
                    with stalled(server):
                        inflight = asyncio.ensure_future(c.post(f"{b1.url}/v1/requests", json=body, headers=h))
                        # broker 1 is mid-request once it has claimed the key in Redis (its next
                        # step, the key's durable copy, waits on the stalled NATS)
                        slot = Keys(s.prefix).idempotency("t1", hashlib.sha256(b"killed-mid-request").hexdigest())
                        rds = Redis.from_url(s.redis_url)
                        try:
                            await eventually(lambda: rds.exists(slot), timeout=10, what="broker 1 claimed the key")
                        finally:
                            await rds.aclose()
                        os.kill(b1.proc.pid, signal.SIGKILL)
                        b1.proc.wait()
                        with contextlib.suppress(httpx.HTTPError):
                            await inflight
                    started = time.monotonic()
                    answers = []

                    async def definitive() -> httpx.Response | None:
                        r = await c.post(f"{b2.url}/v1/requests", json=body, headers=h)
                        answers.append(r.status_code)
                        return r if r.status_code in (201, 422) else None

                    r = await eventually(definitive, timeout=30, every=0.5)
                    assert r.status_code == 201, r.text
                    assert time.monotonic() - started < 15, answers
                    again = await c.post(f"{b2.url}/v1/requests", json=body, headers=h)
                    assert again.status_code == 201 and again.json()["request_id"] == r.json()["request_id"]
                    leases = (await c.get(f"{b2.url}/v1/leases", headers=tenant)).json()
                    keyed = [lease for lease in leases if lease["units"] == 4]
                    assert [lease["lease_id"] for lease in keyed] == [lease["lease_id"] for lease in r.json()["leases"]]
                    # the dead broker's attempt: gone from Redis and, if granted, ended at its grant time

                    async def settled() -> bool:
                        free = (await c.get(f"{registry.url}/v1/pools/gz-910b",
                                            headers={"Authorization": f"Bearer {s.admin_key}"})).json()["free"]
                        return free == 32 - 2 - 4

                    await eventually(settled, timeout=40)
                    answered = {lease["lease_id"] for lease in leases}
                    events = await _alloc_events(server.url, s.prefix)
                    _unbilled(events, {e.lease.lease_id for e in events if isinstance(e, LeaseGranted)} - answered)



async def test_key_of_a_queued_request_whose_broker_died_answers_202(settings: Settings, nc, rds) -> None:
    """The broker queued the request and died before recording the answer: the retry,
    once the key is stale, answers that 202 (one queued request), not a second one."""
    from services.broker.idempotency import Keyring  # here: the file's other tests run on older code too
    from services.common.subjects import IDEMPOTENCY

    s = msgspec.structs.replace(settings, placement_timeout_s=1.0)  # stale 3 s after the claim
    async with broker_world(s, POOLS) as w:
        assert (await w.request("t1", {"units": 30})).status_code == 201
        body = {"units": 8, "queue": True}
        queued = await w.request("t1", body)
        assert queued.status_code == 202, queued.text
        request_id = queued.json()["request_id"]
        # what the dead broker left: the key claimed, naming that request, never finished
        kv = await Keyring.open_bucket(nc, Subjects(s.prefix).bucket(IDEMPOTENCY))
        keyring = Keyring(rds, Keys(s.prefix), kv, grants=None, stale_s=3.0)  # type: ignore[arg-type]
        claim = keyring.new_claim("t1", "queued-then-died", msgspec.json.encode(msgspec.convert(body, ComputeRequest)))
        claim.request_id = request_id
        assert (await keyring.claim(claim.slot, claim.digest, request_id, claim.token))[0] == "claimed"
        await kv.create(claim.entry, claim.durable())
        h = {"Idempotency-Key": "queued-then-died"}
        assert (await w.request("t1", body, headers=h)).status_code == 409  # its owner may still be running

        async def answered() -> httpx.Response | None:
            r = await w.request("t1", body, headers=h)
            return r if r.status_code != 409 else None

        r = await eventually(answered, timeout=10, every=0.5)
        assert r.status_code == 202 and r.json()["request_id"] == request_id, r.text
        assert await rds.zcard(Keys(s.prefix).queue()) == 1
