"""``cbroker audit``: read Redis, JetStream and the meter, check invariants 1-4.

This module only reads (Redis with one read-only script per region, so a region is
seen at one instant; JetStream streams and buckets; the meter's API) and prints; the
checks are pure (``audit_checks``). A violation must show in two looks ``--confirm-s``
apart, so that work in flight on a live system (a lease between its Redis write and its
event) is not reported; a real fault persists.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar

import click
import httpx
import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rich.console import Console

from services.common.keys import Keys
from services.common.messages import AllocEvent, Pool
from services.common.nats_conn import connect, read_stream
from services.common.redis_conn import connect as redis_connect
from services.common.settings import Settings, settings_from_env
from services.common.subjects import ALLOC, MeterNames, Subjects
from services.meter.model import LedgerEntry, LedgerRecord
from services.registry.records import PoolRecords

from .audit_checks import LeaseLive, MeterView, Observation, PoolLive, Report, audit, confirmed
from .term import Unreachable, handled, out, table, waiting

T = TypeVar("T")

# One region at one instant: its pools, their lease sets, its expiry index, the leases.
# KEYS[1] region pool set, KEYS[2] lease-expiry zset, KEYS[3] leases-ready marker;
# ARGV[1] the region's key base ("<prefix>:{<region>}").
_SNAPSHOT = """
local base = ARGV[1]
local pools, leases, seen = {}, {}, {}
local function lease(id)
  if seen[id] then return end
  seen[id] = true
  local f = redis.call('HMGET', base .. ':lease:' .. id, 'units', 'expires', 'seq', 'pool', 'generation', 'milli',
    'devices')
  if f[1] then
    leases[#leases + 1] = {id, f[1], f[2] or '0', f[3] or '0', f[4] or '', f[5] or '0', f[6] or '1000', f[7] or ''}
  end
end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = base .. ':pool:' .. id
  local f = redis.call('HMGET', key, 'capacity', 'healthy', 'leased', 'free', 'status', 'generation')
  -- a pool that shares its devices: its per-device hash (device, free milli, ...), else 0
  local dev = 0
  if redis.call('EXISTS', key .. ':dev') == 1 then dev = redis.call('HGETALL', key .. ':dev') end
  if f[1] then
    pools[#pools + 1] = {id, f[1], f[2] or '-1', f[3] or '0', f[4] or '0', f[5] or '', f[6] or '0', dev}
  end
  for _, l in ipairs(redis.call('SMEMBERS', base .. ':pool:' .. id .. ':leases')) do lease(l) end
end
for _, l in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do lease(l) end
return {pools, leases, redis.call('EXISTS', KEYS[3])}
"""

_event = msgspec.json.Decoder(AllocEvent)
_ledger = msgspec.json.Decoder(LedgerRecord)


@dataclass(frozen=True)
class AuditConfig:
    nats_url: str
    redis_url: str
    prefix: str = "cb"
    meter_url: str | None = None
    key: str | None = None  # an ops or admin key for the meter's API
    min_bill_s: int = 60
    meter_state: str = ""
    meter_durable: str = ""
    grace_s: float = 5.0
    confirm_s: float = 1.0
    redis_cluster: bool = False  # redis_url is a seed node of a Redis Cluster
    connect_timeout_s: float = 10.0  # the services' clients retry forever; an audit gives up


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _pool_id(pool_key: str) -> str:
    return pool_key.rsplit(":pool:", 1)[-1]


async def _regions(redis: Redis, keys: Keys, extra: set[str]) -> set[str]:
    found = {_s(r) for r in await redis.smembers(keys.regions())}
    found |= {_s(r) for r in await redis.hvals(keys.lease_index())}
    return found | extra


async def read_redis(redis: Redis, keys: Keys, regions: set[str]) -> tuple[dict, dict, set[str], dict[str, bool]]:
    script = redis.register_script(_SNAPSHOT)
    pools: dict[str, PoolLive] = {}
    leases: dict[str, LeaseLive] = {}
    ready: set[str] = set()
    for region in sorted(regions):
        raw_pools, raw_leases, is_ready = await script(
            keys=[keys.region_pools(region), keys.lease_expiry(region), keys.leases_ready(region)],
            args=[f"{keys.prefix}:{{{region}}}"])
        if int(is_ready):
            ready.add(region)
        for row in raw_pools:
            pool_id, cap, healthy, leased, free, status, gen = (_s(x) for x in row[:7])
            flat = row[7] if isinstance(row[7], list) else None
            devices = {int(_s(flat[i])): int(_s(flat[i + 1])) for i in range(0, len(flat), 2)} \
                if flat is not None else None
            pools[pool_id] = PoolLive(region, pool_id, int(cap), int(healthy), int(leased), int(free), status,
                                      int(gen), devices)
        for row in raw_leases:
            lease_id, units, expires, seq, pool, gen, milli, devs = (_s(x) for x in row)
            leases[lease_id] = LeaseLive(region, lease_id, _pool_id(pool), int(units), float(expires), int(seq),
                                         int(gen), int(milli), tuple(int(d) for d in devs.split(",") if d.strip()))
    rebuilt = {s: bool(await redis.exists(keys.rebuilt_marker(s))) for s in ("registry", "broker")}
    return pools, leases, ready, rebuilt


async def _last_seq(js: JetStreamContext, stream: str) -> int:
    try:
        return (await js.stream_info(stream)).state.last_seq
    except NotFoundError:
        return 0


async def read_alloc(js: JetStreamContext, subjects: Subjects) -> tuple[list[tuple[int, AllocEvent]], int]:
    events, bad = [], 0
    try:
        async for seq, data in read_stream(js, subjects.stream(ALLOC), subjects.events(ALLOC), batch=5000):
            try:
                events.append((seq, _event.decode(data)))
            except (msgspec.DecodeError, msgspec.ValidationError):
                bad += 1
    except NotFoundError:
        pass
    return events, bad


async def read_records(js: JetStreamContext, subjects: Subjects) -> dict[str, Pool] | None:
    try:
        kv = await js.key_value(subjects.bucket("pools"))
    except Exception:  # noqa: BLE001 - no bucket: the registry never ran
        return None
    return {pool.pool_id: pool async for pool in PoolRecords(kv).all()}


async def read_ledger(js: JetStreamContext, names: MeterNames) -> list[tuple[int, LedgerEntry]] | None:
    try:
        await js.stream_info(names.ledger_stream)
    except NotFoundError:
        return None
    out = []
    async for seq, data in read_stream(js, names.ledger_stream, names.ledger_subjects, batch=5000):
        record = _ledger.decode(data)
        if isinstance(record, LedgerEntry):
            out.append((seq, record))
    return out


async def billed_through(js: JetStreamContext, subjects: Subjects, names: MeterNames) -> int:
    """The meter's durable consumer has acknowledged every allocation event up to here
    (it appends an event's ledger entries before it acks)."""
    try:
        info = await js.consumer_info(subjects.stream(ALLOC), names.durable)
    except NotFoundError:
        return 0
    return info.ack_floor.stream_seq if info.ack_floor else 0


async def read_meter(url: str, key: str) -> MeterView | None:
    """Usage totals at a ledger position that did not move while they were read."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as http:
        for _ in range(10):
            before = (await http.get("/v1/meter/status")).raise_for_status().json()
            usage = (await http.get("/v1/usage", params={"group_by": "tenant"})).raise_for_status().json()
            after = (await http.get("/v1/meter/status")).raise_for_status().json()
            if before["ledger_seq"] == after["ledger_seq"]:
                totals = {(r["tenant"], r["currency"]): Decimal(str(r["amount"])) for r in usage["rows"]}
                return MeterView(int(after["ledger_seq"]), totals)
            await asyncio.sleep(0.2)
    return None


async def observe(cfg: AuditConfig, nc: NATS, redis: Redis) -> Observation:
    js = nc.jetstream()
    keys, subjects = Keys(cfg.prefix), Subjects(cfg.prefix)
    names = MeterNames.of(Settings(prefix=cfg.prefix, meter_state=cfg.meter_state, meter_durable=cfg.meter_durable))
    records = await read_records(js, subjects)
    floor = await billed_through(js, subjects, names)  # before the ledger is read: entries <= it are in
    meter = await read_meter(cfg.meter_url, cfg.key) if cfg.meter_url and cfg.key else None
    ledger = await read_ledger(js, names)
    before = await _last_seq(js, subjects.stream(ALLOC))
    regions = await _regions(redis, keys, {p.spec.region for p in (records or {}).values()})
    now = time.time()
    pools, leases, ready, rebuilt = await read_redis(redis, keys, regions)
    events, bad = await read_alloc(js, subjects)  # after Redis: every lease seen there has its grant here
    more = {e.lease.region for _, e in events} - regions
    if more:  # regions known only from the stream (Redis lost them): read those too
        p2, l2, r2, _ = await read_redis(redis, keys, more)
        pools.update(p2)
        leases.update(l2)
        ready |= r2
    return Observation(now=now, alloc_seq_before=before, pools=pools, leases=leases, regions=regions | more,
                       ready_regions=ready, rebuilt=rebuilt, events=events, records=records, ledger=ledger,
                       billed_through=floor, meter=meter, min_bill_s=cfg.min_bill_s, grace_s=cfg.grace_s,
                       undecodable=bad)


async def run_audit(cfg: AuditConfig, nc: NATS | None = None, redis: Redis | None = None) -> Report:
    """One audit: a look, and if it found anything, a second look ``confirm_s`` later;
    only what both show is reported."""
    own_nc = nc is None
    own_redis = redis is None
    nc = nc or await _bounded(connect(cfg.nats_url, "cbroker-audit"), cfg, f"NATS at {cfg.nats_url}")
    redis = redis or redis_connect(cfg.redis_url, 8, cluster=cfg.redis_cluster)
    try:
        if own_redis:
            await _bounded(redis.ping(), cfg, f"Redis at {cfg.redis_url}")
        first = audit(await observe(cfg, nc, redis))
        if first.ok or cfg.confirm_s <= 0:
            return first
        await asyncio.sleep(cfg.confirm_s)
        return confirmed(first, audit(await observe(cfg, nc, redis)))
    finally:
        if own_redis:
            await redis.aclose()
        if own_nc:
            await nc.drain()


async def _bounded(call: Awaitable[T], cfg: AuditConfig, what: str) -> T:
    """The first contact with a server, given up after ``connect_timeout_s``."""
    try:
        return await asyncio.wait_for(call, cfg.connect_timeout_s)
    except (TimeoutError, OSError, RedisConnectionError, nats.errors.NoServersError) as exc:
        raise Unreachable(f"cannot reach {what} within {cfg.connect_timeout_s:g}s"
                          + (f": {exc}" if str(exc) else "")) from None


def print_report(report: Report, console: Console) -> None:
    rows = [[str(c.invariant), c.name, f"{c.checked:,}",
             f"[red]{len(c.violations)}[/]" if c.violations else "[green]0[/]", "; ".join(c.notes)]
            for c in report.checks]
    console.print(table("Compute Broker audit", ("inv.", "check", "checked", "violations", "notes"), rows,
                        width=console.width, right=("inv.", "checked", "violations")))
    for c in report.checks:
        for v in c.violations[:10]:
            console.print(f"[red]✗[/] {c.name}: [bold]{v.subject}[/] {v.detail}")
        if len(c.violations) > 10:
            console.print(f"  … and {len(c.violations) - 10} more")
    console.print("[green]all invariants hold[/]" if report.ok else
                  f"[red]{report.violations} violation(s)[/]")


def register(cli: click.Group) -> None:
    @cli.command("audit")
    @click.option("--nats-url", envvar="NATS_URL", default=None, help="Default: $NATS_URL or the settings default.")
    @click.option("--redis-url", envvar="REDIS_URL", default=None, help="Default: $REDIS_URL or the settings default.")
    @click.option("--prefix", envvar="CB_PREFIX", default=None, help="Deployment prefix (default: cb).")
    @click.option("--meter-url", envvar="CB_METER_URL", default=None, help="The meter's API (compare its totals).")
    @click.option("--key", envvar="CB_KEY", default=None, help="Ops or admin API key for the meter (or $CB_KEY).")
    @click.option("--grace-s", type=float, default=5.0, show_default=True,
                  help="How long past its expiry a lease may still hold units (sweep interval + slack).")
    @click.option("--confirm-s", type=float, default=1.0, show_default=True,
                  help="Look again after this long; report only what both looks show (0: one look).")
    @click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
                  help="Seconds to wait for NATS and Redis to answer before giving up (exit 3).")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @handled
    def audit_cmd(nats_url: str | None, redis_url: str | None, prefix: str | None, meter_url: str | None,
                  key: str | None, grace_s: float, confirm_s: float, connect_timeout: float, as_json: bool) -> None:
        """Check invariants 1-4 (overbooking, durable leases, exact billing, no leaks); exit 1 on a violation."""
        if not logging.getLogger().isEnabledFor(logging.DEBUG):  # one line on failure, not a retry log (-v: all)
            logging.getLogger("services.common.nats_conn").setLevel(logging.ERROR)
        settings = settings_from_env(nats_url=nats_url, redis_url=redis_url, prefix=prefix)
        key = key or os.environ.get("CB_ADMIN_KEY")
        cfg = AuditConfig(nats_url=settings.nats_url, redis_url=settings.redis_url, prefix=settings.prefix,
                          meter_url=meter_url, key=key, min_bill_s=settings.min_bill_s,
                          meter_state=settings.meter_state, meter_durable=settings.meter_durable,
                          redis_cluster=settings.redis_cluster, grace_s=grace_s, confirm_s=confirm_s,
                          connect_timeout_s=connect_timeout)
        with waiting("reading Redis, JetStream and the meter"):
            report = asyncio.run(run_audit(cfg))
        if as_json:
            sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        else:
            print_report(report, out())
        raise SystemExit(0 if report.ok else 1)
