"""Latency of the request, idempotency-key, lock and preemption transition scripts
(issue 11: p99 <= 1 ms on Redis at 100,000 pools); the pool and lease scripts are in
``script_latency.py``.

    python bench/lifecycle_scripts_bench.py [--pools 100000] [--calls 5000]

Starts its own redis-server, registers ``--pools`` pools in one region (the registry's
pool script), queues ``--calls`` requests, then times each transition ``--calls`` times
from a client: queue, claim, settle (placed), cancel, the records of a confirmation batch
(``RECORDS_PER_CALL`` placed requests, the most the broker puts in one call), an
idempotency key's claim, naming, finish and replay (the stored answer), an owned lock's
release, and preempt (one victim, one new lease, in the region holding every pool).
Each script's time is taken twice: in Redis
(the slow log, set to record every command, gives each call's execution time: p50, p99
and the calls above the target; ``INFO commandstats`` gives the mean), and at the client
(a round trip, for context).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from pathlib import Path

import msgspec
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.cli.servers import start_redis  # noqa: E402
from services.broker.domain.requests import ComputeRequest  # noqa: E402
from services.broker.records import RequestRecord  # noqa: E402
from services.broker.request_states import RECORDS_PER_CALL  # noqa: E402
from services.common.keys import Keys  # noqa: E402
from services.common.messages import LeaseInfo  # noqa: E402
from services.common.redis_conn import read_lua  # noqa: E402

REGION = "cn-gz"
SLOWLOG_LEN = 1_000_000  # the commands a script calls are logged too, after its EVALSHA


def lua(name: str) -> str:
    return resources.files("services.broker.lua").joinpath(name).read_text()


def info(lease_id: str, pool: str, interruptible: bool) -> bytes:
    now = datetime.now(UTC)
    return msgspec.json.encode(LeaseInfo(
        lease_id=lease_id, request_id="r", tenant="t", pool_id=pool, provider="acme", region=REGION, model="m",
        units=1, billing="interruptible" if interruptible else "on_demand", unit_price=Decimal(1),
        granted_at=now, expires_at=now))


def request_record(i: int) -> bytes:
    """A placed request's record, the size the broker writes (a body with constraints,
    two lease ids)."""
    now = datetime.now(UTC)
    return msgspec.json.encode(RequestRecord(
        request_id=f"req-{i}", tenant="t", state="placed", created_at=now, updated_at=now,
        body=msgspec.convert({"units": 4, "accelerators": {"models": ["nvidia-a100-sxm-80gb"]},
                              "placement": {"regions": [REGION]}, "queue": False}, ComputeRequest),
        lease_ids=[f"lease-{i}-a", f"lease-{i}-b"]))


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def measure(client: redis.Redis, name: str, calls: list) -> str:
    client.config_resetstat()
    client.slowlog_reset()
    rtt = []
    for call in calls:
        t = time.perf_counter()
        call()
        rtt.append(time.perf_counter() - t)
    logged = client.slowlog_get(SLOWLOG_LEN)
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    in_redis = sorted(float(e["duration"]) for e in logged if bytes(e["command"][:7]).upper() == b"EVALSHA")
    assert len(in_redis) >= 0.99 * len(calls), f"{name}: the slow log holds {len(in_redis)} of {len(calls)} calls"
    over = sum(d > 1000 for d in in_redis)
    rtt.sort()
    return (f"- {name}: {len(calls)} calls; in Redis p50 {pct(in_redis, 50):.0f} us, p99 {pct(in_redis, 99):.0f} us, "
            f"max {in_redis[-1] if in_redis else float('nan'):.0f} us ({len(in_redis)} calls in the slow log), "
            f"mean {stats.get('usec_per_call', 0):.1f} us, {over} over 1 ms ({over / len(calls):.2%}: p99 <= 1 ms {'met' if over <= len(calls) / 100 else 'NOT met'}); "
            f"round trip p50 {statistics.median(rtt) * 1e6:.0f} us, p99 {rtt[int(len(rtt) * 0.99)] * 1e6:.0f} us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", type=int, default=100_000)
    ap.add_argument("--calls", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis(Path(tmp) / "redis")
        try:
            client = redis.Redis.from_url(server.url)
            client.config_set("slowlog-log-slower-than", 0)  # every command, with its time in Redis
            client.config_set("slowlog-max-len", SLOWLOG_LEN)
            k = Keys("bench")
            pool_s = client.register_script(read_lua("services.registry.lua", "pool.lua"))
            scripts = {name: client.register_script(lua(f"{name}.lua"))
                       for name in ("queue_request", "claim_request", "settle_request", "cancel_request",
                                    "record_requests", "idem_claim", "idem_name", "idem_finish", "release_lock")}
            preempt = client.register_script(read_lua("services.broker.lua", "preempt.lua"))
            reserve = client.register_script(read_lua("services.broker.lua", "reserve.lua"))
            t0 = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            for i in range(args.pools):
                pool_s(keys=[k.pool(REGION, f"p{i}"), k.region_pools(REGION), k.heartbeats(REGION),
                             k.pool_leases(REGION, f"p{i}"), k.removed_pools(REGION)],
                       args=["upsert", time.time(), f"p{i}", "", 8, "{}", "m", "acme", 1, 1], client=pipe)
                if i % 2000 == 1999:
                    pipe.execute()
            pipe.execute()
            client.set(k.leases_ready(REGION), "1")
            print(f"{args.pools} pools registered in {time.perf_counter() - t0:.1f}s; "
                  f"{client.dbsize()} keys", flush=True)
            n = args.calls
            now = time.time()

            def queue(i: int):  # noqa: ANN202
                return lambda: scripts["queue_request"](keys=[k.request(f"r{i}")], args=["{}", "2026-01-01"])

            def claim(i: int):  # noqa: ANN202
                return lambda: scripts["claim_request"](keys=[k.request(f"r{i}")], args=["tok", now, now + 60])

            def settle(i: int):  # noqa: ANN202
                return lambda: scripts["settle_request"](keys=[k.request(f"r{i}")], args=["tok", "placed", "x", "{}"])

            def cancel(i: int):  # noqa: ANN202
                return lambda: scripts["cancel_request"](keys=[k.request(f"c{i}")],
                                                         args=["cancelled", "x", "", now])

            lines = [measure(client, "queue_request.lua (accepted → queued)", [queue(i) for i in range(n)]),
                     measure(client, "claim_request.lua (queued → placing)", [claim(i) for i in range(n)]),
                     measure(client, "settle_request.lua (placing → placed)", [settle(i) for i in range(n)])]
            for i in range(n):
                scripts["queue_request"](keys=[k.request(f"c{i}")], args=["{}", "x"])
            lines.append(measure(client, "cancel_request.lua (queued → cancelled)", [cancel(i) for i in range(n)]))
            record = request_record(0)

            def record_batch(i: int):  # noqa: ANN202
                ids = range(i * RECORDS_PER_CALL, (i + 1) * RECORDS_PER_CALL)
                keys = [k.request(f"b{j}") for j in ids]
                args = [a for _ in ids for a in ("placed", "2026-12-06T12:00:00+00:00", record)]
                return lambda: scripts["record_requests"](keys=keys, args=args)

            lines.append(measure(client, f"record_requests.lua (accepted → placed, {RECORDS_PER_CALL} records "
                                         f"of {len(record)} bytes in one call)", [record_batch(i) for i in range(n)]))
            answer = msgspec.json.encode({"status": 201, "body": record.decode()})
            leases = msgspec.json.encode([[REGION, "lease-a"], [REGION, "lease-b"]])

            def idem(name: str, i: int, *args: object):  # noqa: ANN202
                return lambda: scripts[name](keys=[k.idempotency("t", f"key{i}")], args=list(args))

            ms = int(now * 1000)
            lines += [
                measure(client, "idem_claim.lua (absent → pending)",
                        [idem("idem_claim", i, "digest", f"req-{i}", "tok", ms, 32_000, 86_400) for i in range(n)]),
                measure(client, "idem_name.lua (pending: names its leases)",
                        [idem("idem_name", i, "tok", f"req-{i}", leases) for i in range(n)]),
                measure(client, "idem_finish.lua (pending → done)",
                        [idem("idem_finish", i, "tok", "done", answer, 86_400, "digest", f"req-{i}", "")
                         for i in range(n)]),
                measure(client, "idem_claim.lua (done: the stored answer)",
                        [idem("idem_claim", i, "digest", f"req-{i}", "tok2", ms, 32_000, 86_400) for i in range(n)]),
            ]
            for i in range(n):
                client.set(k.request(f"lock{i}"), "tok", px=60_000)
            lines.append(measure(client, "release_lock.lua (owner's compare-and-delete)",
                                 [(lambda i=i: scripts["release_lock"](keys=[k.request(f"lock{i}")], args=["tok"]))
                                  for i in range(n)]))
            # victims: one interruptible lease per pool, on the first n pools
            for i in range(n):
                pool, lease_id = f"p{i}", f"v{i}"
                reserve(keys=[k.lease_expiry(REGION), k.leases_ready(REGION), k.interruptible_leases(REGION),
                              k.pool(REGION, pool), k.pool_leases(REGION, pool), k.lease(REGION, lease_id)],
                        args=[1, "force", now + 3600, 1, lease_id, 8, info(lease_id, pool, True), 1, 0, 1000, ""])

            def preempt_one(i: int):  # noqa: ANN202
                pool, victim, lease_id = f"p{i}", f"v{i}", f"n{i}"
                keys = [k.lease_expiry(REGION), k.leases_ready(REGION), k.interruptible_leases(REGION),
                        k.pool(REGION, pool), k.pool_leases(REGION, pool), k.lease(REGION, victim),
                        k.pool(REGION, pool), k.pool_leases(REGION, pool), k.lease(REGION, lease_id)]
                return lambda: preempt(keys=keys, args=[1, 1, now + 30, victim, lease_id, 8,
                                                        info(lease_id, pool, False), 0, 0, 1000, ""])

            lines.append(measure(client, "preempt.lua (victim ends + new lease, one step)",
                                 [preempt_one(i) for i in range(n)]))
            print(f"{args.pools} pools in the region, {client.dbsize()} keys:")
            print("\n".join(lines))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
