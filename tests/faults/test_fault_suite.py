"""The fault suite: under a steady, bounded load, one fault at a time — SIGKILL each
service and restart it, restart nats-server on the same store, flush Redis, restart
redis-server empty, stop a provider's heartbeats, SIGSTOP a broker mid-reservation —
and after each the auditor (invariants 1-4) passes, every lease a client was told about
has its durable grant, and placing works again. The time each recovery took is recorded
(``recovery`` below) and written, with the numbers, to ``$CB_FAULT_REPORT`` (default
``.cbroker/fault-recovery.json`` and ``.md``); ``python -m bench.fault_report`` prints
it. docs/faults.md explains the faults and gives the measured times.

The tests share one deployment and run in file order (each leaves it healthy)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from services.cli.audit_checks import Report
from services.common.keys import Keys
from services.common.nats_conn import connect
from services.common.subjects import ALLOC, MeterNames, Subjects

from ..helpers import eventually
from .stack import HEARTBEAT_TTL_S, PROVIDERS, Stack, running_stack

pytestmark = pytest.mark.timeout(120)

RESULTS: dict[str, dict[str, float | int | str]] = {}
SERVICE_TARGET_S = 5.0  # docs/benchmarks.md: a service restart recovers within 5 s
BOUND_S = 30.0  # the test fails beyond this; the target is checked in the report


def report_path() -> Path:
    default = Path(__file__).resolve().parents[2] / ".cbroker" / "fault-recovery.json"
    return Path(os.environ.get("CB_FAULT_REPORT") or default)


def write_report() -> None:
    path = report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(RESULTS, indent=2) + "\n")
    cols = ["fault", "back_s", "placing_s", "audit_s", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for fault, r in RESULTS.items():
        lines.append("| " + " | ".join([fault] + [_fmt(r.get(c, "")) for c in cols[1:]]) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _fmt(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


async def until(check: Callable[[], Awaitable[bool] | bool], t0: float, timeout: float = BOUND_S,
                what: str = "") -> float:
    """Seconds from ``t0`` until ``check`` holds."""
    await eventually(check, timeout=timeout, what=f"recovery ({what})")
    return time.monotonic() - t0


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root = Path(os.environ["CB_FAULT_DIR"]) if os.environ.get("CB_FAULT_DIR") else tmp_path_factory.mktemp("faults")
    async with running_stack(root) as s:
        assert s.load is not None
        t0 = time.monotonic()
        await until(lambda: len(s.load.placed_since(t0)) >= 5, t0, 60, "the load places leases")
        yield s
        await s.load.stop()
        print(f"\nload: {s.load.statuses}, {len(s.load.placed)} leases placed, {s.load.errors} transport errors")
    write_report()


async def settle(stack: Stack, name: str, t0: float, *, back_s: float | None = None, note: str = "") -> dict:
    """After a fault at ``t0``: placing works again, the auditor passes, and every lease a
    client was told about is durable. Records the times."""
    assert stack.load is not None
    placing = await until(lambda: bool(stack.load.placed_since(t0)), t0, BOUND_S, f"{name}: a placement")
    audit_s, report = await stack.audit_passes(t0)
    told = await stack.told_leases_are_durable()
    checked = {c.name: c.checked for c in report.checks}
    assert checked["pool leased <= capacity"] == sum(len(p) for p in PROVIDERS.values())
    RESULTS[name] = {"back_s": back_s if back_s is not None else placing, "placing_s": placing, "audit_s": audit_s,
                     "leases_told": told, "note": note}
    return RESULTS[name]


async def test_steady_load_passes_the_audit(stack: Stack) -> None:
    report = await stack.audit()
    assert report.ok, report.to_dict()
    assert stack.load is not None and stack.load.statuses.get(201, 0) > 0


async def _cli_audit(stack: Stack) -> tuple[int, dict]:
    env = {**os.environ, "NATS_URL": stack.settings.nats_url, "REDIS_URL": stack.settings.redis_url,
           "CB_PREFIX": stack.settings.prefix, "CB_METER_URL": stack.services["meter"].url,
           "CB_KEY": stack.settings.admin_key or ""}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.cli", "audit", "--json", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert out, err
    return proc.returncode or 0, json.loads(out)


def _failing(report: dict) -> dict[str, set[str]]:
    return {c["check"]: {e["subject"] for e in c["examples"]} for c in report["checks"] if c["violations"]}


async def test_auditor_catches_an_injected_overbooking(stack: Stack) -> None:
    """Written into Redis behind the broker's back: a pool's leased counter pushed past
    its capacity, then a forged lease taking units nobody granted. The auditor (in
    process and ``cbroker audit``) fails and names the pool and the lease; undone, it
    passes again."""
    code, clean = await _cli_audit(stack)
    assert code == 0 and clean["ok"], clean
    keys = Keys(stack.settings.prefix)
    pool, region = "acme-3", PROVIDERS["acme"][3][0]  # capacity 8
    client = aioredis.Redis.from_url(stack.settings.redis_url, decode_responses=True)
    try:
        await client.hincrby(keys.pool(region, pool), "leased", 20)
        try:
            report = (await stack.audit()).to_dict()
            assert not report["ok"]
            assert _failing(report) == {"pool leased <= capacity": {pool},
                                        "pool leased = units of its live leases": {pool}}, report
            code, out = await _cli_audit(stack)
            assert code == 1 and pool in _failing(out)["pool leased <= capacity"]
        finally:
            await client.hincrby(keys.pool(region, pool), "leased", -20)

        forged = "lease_forged0000000000000"
        far = time.time() + 3600
        await client.hset(keys.lease(region, forged), mapping={"units": 10, "expires": far, "seq": 1, "info": "{}",
                                                               "interruptible": 0, "pool": keys.pool(region, pool)})
        await client.sadd(keys.pool_leases(region, pool), forged)
        await client.zadd(keys.lease_expiry(region), {forged: far})
        await client.hincrby(keys.pool(region, pool), "leased", 10)
        try:
            report = (await stack.audit()).to_dict()
            failing = _failing(report)
            assert failing["pool leased <= capacity"] == {pool}, report
            assert failing["live lease has its grant in the stream"] == {forged}, report
        finally:
            await client.zrem(keys.lease_expiry(region), forged)
            await client.srem(keys.pool_leases(region, pool), forged)
            await client.delete(keys.lease(region, forged))
            await client.hincrby(keys.pool(region, pool), "leased", -10)
    finally:
        await client.aclose()
    _, report = await stack.audit_passes(time.monotonic(), timeout=20)
    assert report.ok


@pytest.mark.parametrize("name", ["registry", "broker1", "meter"])
async def test_sigkill_a_service_and_restart_it(stack: Stack, name: str) -> None:
    assert stack.load is not None
    svc = stack.services[name]
    marker = 0
    if name == "meter":  # the meter's work: every allocation event up to the kill gets billed
        nc = await connect(stack.settings.nats_url, "fault-test")
        js = nc.jetstream()
        marker = (await js.stream_info(Subjects("cb").stream(ALLOC))).state.last_seq
    t0 = time.monotonic()
    stack.kill(name)
    svc.start()  # what `cbroker up`'s supervisor (or Kubernetes) does
    await asyncio.to_thread(svc.wait_healthy, BOUND_S)
    healthy = time.monotonic() - t0
    if name == "registry":  # a provider's heartbeat goes through again
        back = await until(lambda: any(at >= t0 + healthy - 0.01 for at, _ in stack.load.heartbeats), t0,
                           what="a heartbeat on the restarted registry")
    elif name.startswith("broker"):  # a placement through the restarted broker
        back = await until(lambda: bool(stack.load.placed_since(t0, svc.url)), t0, what="a placement on it")
    else:
        durable = MeterNames.of(stack.settings).durable

        async def billed() -> bool:
            info = await js.consumer_info(Subjects("cb").stream(ALLOC), durable)
            return info.ack_floor.stream_seq >= marker

        try:
            back = await until(billed, t0, what="the meter billed every event up to the kill")
        finally:
            await nc.drain()
    r = await settle(stack, f"SIGKILL {name}", t0, back_s=back, note=f"healthy after {healthy:.2f}s")
    assert r["back_s"] <= BOUND_S


async def test_restart_nats_on_the_same_store(stack: Stack) -> None:
    before = await stack.told_leases_are_durable()
    t0 = time.monotonic()
    stack.nats.kill()  # SIGKILL; the store directory stays
    await asyncio.to_thread(stack.nats.restart)
    r = await settle(stack, "restart nats-server (SIGKILL, same store)", t0)
    assert r["leases_told"] >= before


async def _redis_lost(stack: Stack, name: str, lose: Callable[[], Awaitable[None]]) -> None:
    keys = Keys(stack.settings.prefix)
    client = aioredis.Redis.from_url(stack.settings.redis_url, decode_responses=True)
    try:
        live = await client.hlen(keys.lease_index())
        t0 = time.monotonic()
        await lose()
        r = await settle(stack, name, t0, note=f"{live} live leases restored")
        assert r["placing_s"] <= BOUND_S
    finally:
        await client.aclose()


async def test_flush_redis(stack: Stack) -> None:
    async def flush() -> None:
        client = aioredis.Redis.from_url(stack.settings.redis_url)
        await client.flushall()
        await client.aclose()

    await _redis_lost(stack, "FLUSHALL Redis", flush)


async def test_restart_redis_empty(stack: Stack) -> None:
    async def restart() -> None:
        stack.redis.kill()
        await asyncio.to_thread(stack.redis.restart)  # no RDB/AOF: it comes back empty

    await _redis_lost(stack, "restart redis-server empty", restart)


async def test_provider_stops_heartbeating(stack: Stack) -> None:
    """Its pools go offline after the TTL, their leases are lost (units back, events
    published), and placing goes on on the other provider's pools."""
    assert stack.load is not None
    keys = Keys(stack.settings.prefix)
    zeta = stack.load.pools["zeta"]
    regions = {f"zeta-{i}": spec[0] for i, spec in enumerate(PROVIDERS["zeta"])}
    client = aioredis.Redis.from_url(stack.settings.redis_url, decode_responses=True)

    async def gone() -> bool:
        for pool_id in zeta:
            h = await client.hmget(keys.pool(regions[pool_id], pool_id), "status", "leased")
            if h[0] != "offline" or int(h[1] or 0) != 0:
                return False
            if await client.scard(keys.pool_leases(regions[pool_id], pool_id)):
                return False
        return True

    try:
        t0 = time.monotonic()
        stack.load.silent.add("zeta")
        offline = await until(gone, t0, HEARTBEAT_TTL_S + BOUND_S, "zeta's pools offline and their leases lost")
        assert offline >= HEARTBEAT_TTL_S - 1  # not before the TTL
        t1 = time.monotonic()
        await until(lambda: bool(stack.load.placed_since(t1)), t1, what="placing on acme's pools")
        audit_s, _ = await stack.audit_passes(t0)
        RESULTS["provider stops heartbeating"] = {
            "back_s": offline, "placing_s": 0.0, "audit_s": audit_s, "leases_told": len(stack.load.placed),
            "note": f"pools offline and their leases lost {offline:.2f}s after the heartbeats stopped "
                    f"(TTL {HEARTBEAT_TTL_S:.0f}s); placing went on"}
        stack.load.silent.discard("zeta")

        async def online() -> bool:
            statuses = [await client.hget(keys.pool(regions[p], p), "status") for p in zeta]
            return statuses == ["online"] * len(zeta)

        await until(online, time.monotonic(), what="zeta's pools back online")
    finally:
        stack.load.silent.discard("zeta")
        await client.aclose()


async def test_sigstop_a_broker_mid_reservation(stack: Stack) -> None:
    """Paused with a request in flight: the other broker keeps placing; resumed, the
    paused one finishes (201 with a durable grant, or gives the units back) and the
    auditor passes."""
    assert stack.load is not None
    b1, b2 = stack.brokers
    tenant = stack.load.tenants["t1"]
    sent = asyncio.Event()

    async def on_request(_: httpx.Request) -> None:
        sent.set()

    async with httpx.AsyncClient(headers=tenant, timeout=30) as http, \
            httpx.AsyncClient(headers=tenant, timeout=30, event_hooks={"request": [on_request]}) as paused:
        inflight = asyncio.create_task(paused.post(f"{b1.url}/v1/requests",
                                                   json={"units": 2, "queue": False, "lease_ttl_s": 6}))
        await sent.wait()  # the request is on its way to the broker about to be paused
        t0 = time.monotonic()
        stack.kill("broker1", signal.SIGSTOP)
        try:
            # availability: for the 3 s of the pause the other broker keeps placing (and
            # giving back, so the pause's length does not fill the pools)
            during = 0.0
            while time.monotonic() - t0 < 3.0:
                other = await http.post(f"{b2.url}/v1/requests", json={"units": 1, "queue": False, "lease_ttl_s": 6})
                during = during or time.monotonic() - t0
                assert other.status_code == 201, other.text
                for lease in other.json()["leases"]:
                    stack.load.placed.append((time.monotonic(), b2.url, lease["lease_id"]))
                    assert (await http.post(f"{b2.url}/v1/leases/{lease['lease_id']}/release")).status_code == 200
        finally:
            stack.kill("broker1", signal.SIGCONT)
        t1 = time.monotonic()
        r = await inflight
        assert r.status_code in (201, 409, 503), r.text
        if r.status_code == 201:
            for lease in r.json()["leases"]:
                stack.load.placed.append((time.monotonic(), b1.url, lease["lease_id"]))
        back = await until(lambda: bool(stack.load.placed_since(t1, b1.url)), t1, what="the paused broker places")
    res = await settle(stack, "SIGSTOP broker 3 s, SIGCONT", t1, back_s=back,
                       note=f"in-flight request: {r.status_code}; the other broker placed in {during:.2f}s "
                            "during the pause")
    assert res["audit_s"] <= BOUND_S


async def test_broker_dies_between_reservation_and_grant(stack: Stack) -> None:
    """What a broker that dies after its reservation script and before its grant is
    durable leaves behind, written with the broker's own lease store: units held by a
    lease with no grant, marked pending, with the short provisional expiry the broker
    gives it. The auditor names the lease; the other brokers' sweepers give the units
    back and end it in the record (nothing billed), and the auditor passes."""
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from services.broker.leases import LeaseStore
    from services.common.messages import LeaseInfo, LeaseLost

    keys = Keys(stack.settings.prefix)
    pool, region = "acme-0", PROVIDERS["acme"][0][0]
    client = aioredis.Redis.from_url(stack.settings.redis_url)
    now = datetime.now(UTC)
    lease = LeaseInfo(lease_id="lease_orphan000000000000", request_id="req_orphan", tenant="t1", pool_id=pool,
                      provider="acme", region=region, model=PROVIDERS["acme"][0][1], units=3, billing="on_demand",
                      unit_price=Decimal("1.20"), granted_at=now, expires_at=now + timedelta(seconds=300), ttl_s=300)
    try:
        async def reserved() -> bool:  # the background load may hold the pool's units a moment
            ok, _ = await LeaseStore(client, keys).reserve(region, [lease], time.time() + 2.0)  # provisional: 2 s
            return ok

        await eventually(reserved, timeout=15, what=f"3 units free on {pool} to reserve")
        t0 = time.monotonic()
        report = (await stack.audit(confirm_s=0)).to_dict()
        assert _failing(report).get("live lease has its grant in the stream") == {lease.lease_id}, report

        async def given_back() -> bool:
            return not await client.exists(keys.lease(region, lease.lease_id))

        gone = await until(given_back, t0, what="the orphaned reservation given back")
        audit_s, _ = await stack.audit_passes(t0)
    finally:
        await client.aclose()
    nc = await connect(stack.settings.nats_url, "fault-test")
    try:
        from services.cli.audit import read_alloc

        events, _ = await read_alloc(nc.jetstream(), Subjects(stack.settings.prefix))
    finally:
        await nc.drain()
    mine = [e for _, e in events if e.lease.lease_id == lease.lease_id]
    assert [type(e) for e in mine] == [LeaseLost] and mine[0].at == lease.granted_at  # ended at grant: billed 0
    RESULTS["broker dies between reservation and grant (simulated)"] = {
        "back_s": gone, "placing_s": 0.0, "audit_s": audit_s, "leases_told": len(stack.load.placed),
        "note": "units held by an unconfirmed lease given back after its 2 s provisional expiry (30 s in the broker)"}


async def test_afterwards_every_lease_ends_and_is_billed(stack: Stack) -> None:
    """Faults can leave damage that shows only later (a lease that never ends is never
    billed): with the load stopped, once every lease has expired and the meter has
    caught up, the auditor passes with nothing pending — every charge in the ledger."""
    assert stack.load is not None
    await stack.load.stop_clients()  # the providers keep heartbeating: leases end by release or expiry
    t0 = time.monotonic()
    nc = await connect(stack.settings.nats_url, "fault-test")
    js = nc.jetstream()
    durable = MeterNames.of(stack.settings).durable
    client = aioredis.Redis.from_url(stack.settings.redis_url)

    async def quiet() -> bool:
        info = await js.consumer_info(Subjects("cb").stream(ALLOC), durable)
        return await client.hlen(Keys("cb").lease_index()) == 0 and info.num_pending == 0 and \
            info.num_ack_pending == 0

    try:
        await until(quiet, t0, 30, "every lease ended and billed")
    finally:
        await nc.drain()
        await client.aclose()

    async def every_end_recorded() -> Report | None:  # an end event may trail its lease leaving Redis
        report = await stack.audit()
        ended = next(c for c in report.checks if c.name == "expired lease has an ending event")
        return report if ended.checked == 0 else None

    report = await eventually(every_end_recorded, timeout=30, every=0.5, what="every lease's end in the stream")
    assert report.ok, report.to_dict()
    ledger = next(c for c in report.checks if c.name.startswith("ledger"))
    assert ledger.checked >= len(stack.load.placed) and not ledger.notes, ledger.to_dict()  # >= 1 charge each
    ended = next(c for c in report.checks if c.name == "expired lease has an ending event")
    assert ended.checked == 0  # every lease in the record has its end

