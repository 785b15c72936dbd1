"""Meter benchmarks: (1) sustained ingest of allocation events into the durable ledger;
(2) an invoice for one tenant with 1,000,000 ledger entries.

    python bench/meter_bench.py [--events 200000] [--entries 1000000] [--write]

Starts its own nats-server and redis-server and runs the meter as its own process
(``python -m services.meter``, uvicorn), all in a temporary folder.

(1) A backlog of allocation events (grants and ends of leases, mixed billing, a few
renewals) is published to the allocation stream first; then the meter starts and drains
it: each event read from the durable consumer, its lease account read/written in the KV
bucket with optimistic concurrency, its ledger entries appended (deduplicated ids) and
the event acked. The rate is measured on the consumer's acknowledged sequence between
10 % and 90 % of the backlog (steady state, start-up excluded) and also end to end.

(2) 1,000,000 ledger entries of one tenant (one period, 50 pools) are appended to the
ledger stream directly (what the meter would have posted for 1,000,000 leases); the meter
is restarted, rebuilds its aggregate from the stream, and ``GET /v1/invoices/{period}``
is timed over HTTP.

Targets (issue 4): >= 20,000 events/s; invoice over 1,000,000 entries <= 1 s.
``--write`` appends the printed lines to docs/benchmarks-log.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import secrets
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import msgspec  # noqa: E402
import psutil  # noqa: E402

from bench.results import Lines, append_section, bullets  # noqa: E402
from services.cli.servers import free_port, start_nats, start_redis  # noqa: E402
from services.cli.supervisor import ServiceProcess  # noqa: E402
from services.common.messages import LeaseExpired, LeaseGranted, LeaseInfo, LeaseReleased, LeaseRenewed  # noqa: E402
from services.common.nats_conn import connect, ensure_streams  # noqa: E402
from services.common.settings import Settings, settings_to_env  # noqa: E402
from services.common.subjects import Subjects  # noqa: E402
from services.common.jetstream import Publisher  # noqa: E402
from services.meter.ledger import encode, ensure_ledger  # noqa: E402
from services.meter.model import LedgerEntry  # noqa: E402
from services.common.subjects import MeterNames  # noqa: E402

T0 = datetime(2026, 10, 1, tzinfo=UTC)
POOLS = [(f"pool-{i:02d}", ["skyforge", "ascend-west", "tidewater"][i % 3],
          ["us-east", "cn-gz", "eu-west", "cn-yrd"][i % 4], ["nvidia-h100-sxm-80gb", "huawei-ascend-910b"][i % 2])
         for i in range(50)]


def alloc_events(n: int, rng: random.Random) -> list:
    """About ``n`` events: grant + end per lease, a renewal for some."""
    out = []
    i = 0
    while len(out) < n:
        pool, provider, region, model = rng.choice(POOLS)
        billing = rng.choices(["on_demand", "interruptible", "reserved_month", "reserved_year"],
                              weights=[80, 15, 4, 1])[0]
        start = T0 + timedelta(seconds=rng.randrange(0, 20 * 86400))
        reserved = billing.startswith("reserved")
        months = 12 if billing == "reserved_year" else 1
        info = LeaseInfo(lease_id=f"lease_{i:08d}", request_id=f"req_{i}", tenant=f"t{i % 20}", pool_id=pool,
                         provider=provider, region=region, model=model, units=rng.choice([1, 2, 8]), billing=billing,
                         unit_price=Decimal("900") if reserved else Decimal("2.49"),
                         price_basis="unit_month" if reserved else "unit_hour", currency="USD", granted_at=start,
                         expires_at=start + (timedelta(hours=730 * months) if reserved else timedelta(seconds=600)),
                         term_months=months if reserved else 0, ttl_s=0 if reserved else 300)
        out.append(LeaseGranted(id=f"{info.lease_id}.1", at=start, lease=info, seq=1))
        seq = 2
        if not reserved and rng.random() < 0.2:
            at = start + timedelta(seconds=200)
            info = msgspec.structs.replace(info, expires_at=at + timedelta(seconds=300))
            out.append(LeaseRenewed(id=f"{info.lease_id}.2", at=at, lease=info, seq=2))
            seq = 3
        end = LeaseExpired if rng.random() < 0.2 else LeaseReleased
        out.append(end(id=f"{info.lease_id}.{seq}", at=start + timedelta(seconds=rng.randrange(5, 500)), lease=info,
                       seq=seq))
        i += 1
    out.sort(key=lambda e: e.at)  # the order the broker would publish them in
    return out


async def publish(nc, items: list[tuple[str, bytes, str]], window: int = 2000) -> float:  # noqa: ANN001
    """Pipelined, every ack awaited (the meter's own publisher)."""
    publisher = Publisher(nc, timeout=60)
    await publisher.start()
    t0 = time.perf_counter()
    for k in range(0, len(items), window):
        await publisher.publish_all([(s, d, {"Nats-Msg-Id": m}) for s, d, m in items[k:k + window]])
    took = time.perf_counter() - t0
    await publisher.stop()
    return took


async def ingest(settings: Settings, svc: ServiceProcess, n: int, say, nats_pid: int) -> None:  # noqa: ANN001
    subjects, names = Subjects(settings.prefix), MeterNames.of(settings)
    say(f"-- ingest with {settings.workers} meter process(es) sharing the durable consumer")
    nc = await connect(settings.nats_url, "bench")
    js = nc.jetstream()
    await ensure_streams(js, subjects)
    events = alloc_events(n, random.Random(7))
    took = await publish(nc, [(subjects.alloc(e.lease.region, e.lease.tenant), msgspec.json.encode(e), e.id)
                              for e in events])
    say(f"backlog: {len(events):,} allocation events ({len(events) / took:,.0f}/s) published in {took:.1f}s")
    total = len(events)
    del events
    gc.collect()  # the load generator stays out of the meter's way while it drains
    t_start = time.perf_counter()
    svc.start()
    await asyncio.to_thread(svc.wait_healthy)
    meter_procs = [psutil.Process(svc.proc.pid), *psutil.Process(svc.proc.pid).children(recursive=True)]
    nats_proc = psutil.Process(nats_pid)
    stream = subjects.stream("alloc")
    samples: list[tuple[float, int, float, float]] = []
    while True:
        try:
            info = await js.consumer_info(stream, names.durable)
        except Exception:  # noqa: BLE001 - not created yet
            await asyncio.sleep(0.05)
            continue
        done = info.ack_floor.stream_seq if info.ack_floor else 0
        samples.append((time.perf_counter(), done, _cpu(meter_procs), _cpu([nats_proc])))
        if info.num_pending == 0 and info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.1)
    t_end = time.perf_counter()

    def at(fraction: float) -> tuple[float, int, float, float]:
        return next(s for s in samples if s[1] >= fraction * total)

    (ta, a, ma, na), (tb, b, mb, nb) = at(0.1), at(0.9)
    ledger = await js.stream_info(names.ledger_stream)
    say(f"ingest: {(b - a) / (tb - ta):,.0f} events/s sustained (10%-90% of the backlog); "
        f"{total:,} events in {t_end - t_start:.1f}s from process start "
        f"({total / (t_end - t_start):,.0f}/s incl. start-up); {ledger.state.messages:,} ledger entries; "
        f"batch {settings.meter_batch}; target >= 20,000/s")
    say(f"CPU per event (10%-90%): meter process(es) {(mb - ma) / (b - a) * 1e6:.1f} us, "
        f"nats-server {(nb - na) / (b - a) * 1e6:.1f} us")
    await nc.drain()


def _cpu(procs: list) -> float:  # noqa: ANN001
    """User + system CPU seconds of these processes so far: a measure of cost that the
    other work on a shared machine does not distort (wall-clock rates are)."""
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def invoice(settings: Settings, svc: ServiceProcess, n: int, say) -> None:  # noqa: ANN001
    names = MeterNames.of(settings)
    nc = await connect(settings.nats_url, "bench")
    js = nc.jetstream()
    await ensure_ledger(js, names, settings)
    now = datetime.now(UTC)
    period = f"{now.year:04d}-{now.month:02d}"
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    items = []
    for i in range(n):
        pool, provider, region, model = POOLS[i % len(POOLS)]
        e = LedgerEntry(id=f"lease_big{i:08d}.u.{period}", tenant="big", provider=provider, pool_id=pool,
                        region=region, model=model, lease_id=f"lease_big{i:08d}", billing="on_demand", kind="usage",
                        period=period, start=start, end=start + timedelta(seconds=600), units=1,
                        seconds=Decimal(600), quantity=Decimal("0.166667"), unit_price=Decimal("2.49"),
                        currency="USD", amount=Decimal("0.42"), posted_at=start + timedelta(seconds=600))
        items.append((names.ledger("big", e.id), encode(e), e.id))
    took = await publish(nc, items, window=5000)
    say(f"ledger: {n:,} entries of tenant 'big' appended in {took:.1f}s")
    t0 = time.perf_counter()
    svc.start()
    await asyncio.to_thread(svc.wait_healthy, 120)
    headers = {"Authorization": f"Bearer {settings.admin_key}"}
    async with httpx.AsyncClient(base_url=svc.url, timeout=120, headers=headers) as http:
        while not (await http.get("/health")).json().get("ledger_ready"):
            await asyncio.sleep(0.1)
        rebuilt = time.perf_counter() - t0
        times = []
        body = None
        for _ in range(7):
            t1 = time.perf_counter()
            r = await http.get(f"/v1/invoices/{period}", params={"tenant": "big"})
            times.append(time.perf_counter() - t1)
            assert r.status_code == 200, r.text
            body = r.json()
        assert body is not None and body["entries"] >= n, body["entries"]
        t1 = time.perf_counter()
        usage = await http.get("/v1/usage", params={"tenant": "big", "group_by": "pool,period"})
        usage_s = time.perf_counter() - t1
    say(f"invoice: GET /v1/invoices/{period}?tenant=big over {body['entries']:,} ledger entries "
        f"({len(body['currencies'][0]['lines'])} lines, total {body['totals']['USD']} USD): first {times[0] * 1000:.1f} ms, "
        f"median {statistics.median(times) * 1000:.1f} ms over {len(times)} (HTTP, auth included); target <= 1 s")
    say(f"usage by pool and period, same tenant: {usage_s * 1000:.1f} ms ({len(usage.json()['rows'])} rows); "
        f"aggregate rebuilt from the ledger stream at start-up in {rebuilt:.1f}s "
        f"({n / rebuilt:,.0f} entries/s, process start included)")
    await nc.drain()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                    help="meter processes (uvicorn workers) for the ingest runs")
    ap.add_argument("--skip-invoice", action="store_true")
    ap.add_argument("--write", action="store_true", help="append the results to docs/benchmarks-log.md")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cb-meter-bench-"))
    nats, redis = start_nats(tmp / "nats"), start_redis(tmp / "redis")
    settings = Settings(nats_url=nats.url, redis_url=redis.url, admin_key=f"bench-{secrets.token_hex(8)}",
                        log_level="warning", meter_batch=args.batch)
    say = lines = Lines()  # printed as it goes, kept for --write

    svc = None

    def meter(s: Settings, name: str) -> ServiceProcess:
        return ServiceProcess("meter", free_port(), settings_to_env(s),
                              tmp / f"{name}.log")

    try:
        say(f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}; "
            f"nats-server and the meter on the same cores")
        for workers in args.workers:
            run = msgspec.structs.replace(settings, prefix=f"cbw{workers}", workers=workers)
            svc = meter(run, f"meter-w{workers}")
            asyncio.run(ingest(run, svc, args.events, say, nats.proc.pid))
            svc.stop()
        if not args.skip_invoice:
            run = msgspec.structs.replace(settings, prefix="cbinv")
            svc = meter(run, "meter-invoice")
            asyncio.run(invoice(run, svc, args.entries, say))
    finally:
        if svc is not None:
            svc.stop()
        nats.stop()
        redis.stop()
    if args.write:
        append_section("meter", "python bench/meter_bench.py", bullets(lines))


if __name__ == "__main__":
    main()
