"""Broker benchmark: placements per second with 10,000 registered pools, against the
floor of the stack (one Redis EVALSHA + one acknowledged JetStream publish per request).

    python bench/broker_bench.py [--pools 10000] [--seconds 12] [--rounds 3] [--connections 64] [--workers 1] [--write]

Starts its own nats-server, redis-server, registry and broker processes (uvicorn, real
HTTP) in a temporary folder (kept, with the logs, only when the run fails or saw a 5xx);
registers the pools through the registry's bulk API, then starts the broker and waits
until it quotes every model x region registered; issues tenant keys; drives
``POST /v1/requests`` (1-4 units, ``queue: false``, sometimes a model, vendor or region
constraint) with the raw loadgen; serves ``bench/floor_app.py`` with the same worker count
and drives it the same way. The registry keeps its normal heartbeat TTL (the default
setting): from the moment the pools are registered until the end, ``bench/heartbeater.py``
(its own process, so its CPU counts for neither the load generator nor the servers) sends
batched heartbeats for every pool, and at the end the run checks that no pool went
offline (no ``pool.offline`` event in the capacity stream, none offline now) and reports
the heartbeats/s sent. The two take turns (``--rounds`` of ``seconds / rounds`` each,
after a warm-up of each), so that a slow spell of the machine falls on both sides alike;
the ratio is taken over the totals and per round. Every 201 counted is a placement whose
grant JetStream acknowledged; the run checks the allocation stream holds one grant per 201.
Targets: placements/s >= 0.5 x floor req/s; p99 <= 50 ms. ``--write`` appends the printed
lines to docs/benchmarks-log.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench.heartbeater import Heartbeater  # noqa: E402
from bench.loadgen import Result, request, run  # noqa: E402
from bench.results import Lines, append_section, bullets, command  # noqa: E402
from services.cli.servers import free_port, start_nats, start_redis, stop_process  # noqa: E402
from services.cli.supervisor import ServiceProcess  # noqa: E402
from services.common.settings import Settings, settings_to_env  # noqa: E402
from services.common.subjects import ALLOC, CAPACITY, REQUEST, Subjects  # noqa: E402

BATCH = 500
N_MODELS = 15
N_TENANTS = 8
PROVIDER = "benchcloud"
WARMUP_S = 1.0
P99_TARGET_MS = 50.0
RATIO_TARGET = 0.5


def pick_models(catalogue: list[dict], n: int) -> list[dict]:
    """``n`` real models, round-robin over vendors so that vendor constraints mean something."""
    by_vendor: dict[str, list[dict]] = {}
    for acc in catalogue:
        by_vendor.setdefault(acc["vendor"], []).append(acc)
    out: list[dict] = []
    while len(out) < n and any(by_vendor.values()):
        for vendor in sorted(by_vendor):
            if by_vendor[vendor] and len(out) < n:
                out.append(by_vendor[vendor].pop(0))
    return out


def pool_items(n: int, models: list[dict], regions: list[str], rng: random.Random) -> list[dict]:
    items = []
    for i in range(n):
        units = rng.randint(8, 64)
        price = Decimal(rng.randint(20, 3000)) / 100
        items.append({"pool_id": f"bench-{i:06d}", "region": regions[i % len(regions)], "zone": f"z{i % 3}",
                      "model": models[(i // len(regions)) % len(models)]["model"], "units": units,
                      "units_per_node": 8, "prices": {"on_demand": str(price)}, "provider": PROVIDER})
    return items


@dataclass
class BenchWorld:
    """What the broker benchmarks register: pools of real models over every region, and
    tenant keys."""

    models: list[dict]
    regions: list[str]
    items: list[dict]
    created: int
    took: float  # seconds to register the pools
    tenant_keys: list[str]
    provider_key: str = ""  # the provider's, for its heartbeats


def populate(registry_url: str, admin: str, n_pools: int, rng: random.Random) -> BenchWorld:
    """Register ``n_pools`` pools through the registry's bulk API, and ``N_TENANTS`` tenant keys."""
    with httpx.Client(base_url=registry_url, headers={"Authorization": f"Bearer {admin}"}, timeout=120) as reg:
        models = pick_models(reg.get("/v1/accelerators").raise_for_status().json(), N_MODELS)
        regions = [r["id"] for r in reg.get("/v1/regions").raise_for_status().json()]
        provider_key = reg.post("/v1/keys", json={"role": "provider", "subject": PROVIDER}).raise_for_status().json()
        items = pool_items(n_pools, models, regions, rng)
        t0 = time.perf_counter()
        created = 0
        with httpx.Client(base_url=registry_url, headers={"Authorization": f"Bearer {provider_key['key']}"},
                          timeout=120) as prov:
            for j in range(0, len(items), BATCH):
                r = prov.post("/v1/pools/bulk", content=json.dumps(items[j:j + BATCH]),
                              headers={"content-type": "application/json"})
                if r.status_code >= 400:
                    raise SystemExit(f"registry refused a batch: {r.status_code} {r.text}")
                created += r.json()["created"]
        took = time.perf_counter() - t0
        tenant_keys = [reg.post("/v1/keys", json={"role": "tenant", "subject": f"tenant-{t}"}
                                ).raise_for_status().json()["key"] for t in range(N_TENANTS)]
    return BenchWorld(models, regions, items, created, took, tenant_keys, provider_key["key"])


def request_bodies(n: int, models: list[dict], regions: list[str], rng: random.Random) -> list[dict]:
    """Mostly "any N units"; one in ten each with a model, a vendor or a region."""
    vendors = sorted({m["vendor"] for m in models})
    out = []
    for _ in range(n):
        body: dict = {"units": rng.randint(1, 4), "lease_ttl_s": 3600, "queue": False}
        roll = rng.random()
        if roll < 0.1:
            body["accelerators"] = {"models": [rng.choice(models)["model"]]}
        elif roll < 0.2:
            body["accelerators"] = {"vendors": [rng.choice(vendors)]}
        elif roll < 0.3:
            body["placement"] = {"regions": [rng.choice(regions)]}
        out.append(body)
    return out


def rss_mib(pid: int) -> tuple[float, list[float]]:
    """Resident memory of a process and its children (uvicorn workers), MiB."""
    proc = psutil.Process(pid)
    each = [p.memory_info().rss / 2**20 for p in [proc, *proc.children(recursive=True)]]
    return sum(each), each


def cpu_s(pid: int, children: bool = True) -> float:
    """CPU seconds (user + system) used so far by a process (and its children)."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *(proc.children(recursive=True) if children else [])]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def own_cpu_s() -> float:
    """CPU seconds of this process alone: the load generator (the servers are its children)."""
    return cpu_s(os.getpid(), children=False)


def combine(results: list[Result]) -> Result:
    """Rounds of one side taken as one run."""
    out = Result()
    for r in results:
        out.absorb(r)
    return out


def rate_201(result: Result) -> float:
    return result.statuses.get(201, 0) / result.seconds if result.seconds else 0.0


async def rejection_reasons(nats_url: str) -> Counter:
    """Why requests were turned away, from the request.rejected events of the run."""
    import nats

    from services.common.nats_conn import read_stream

    nc = await nats.connect(nats_url)
    reasons: Counter = Counter()
    try:
        async for _, data in read_stream(nc.jetstream(), Subjects().stream(REQUEST), Subjects().events(REQUEST)):
            event = json.loads(data)
            if event.get("type") == "request.rejected":
                reasons.update(event.get("reasons") or ["(none given)"])
    finally:
        await nc.close()
    return reasons


async def offline_events(nats_url: str) -> Counter:
    """``pool.offline`` events in the capacity stream, by reason: each is a pool that
    missed its heartbeat TTL (or was reported unhealthy) at some point of the run."""
    import nats

    from services.common.nats_conn import read_stream

    nc = await nats.connect(nats_url)
    found: Counter = Counter()
    try:
        async for _, data in read_stream(nc.jetstream(), Subjects().stream(CAPACITY), Subjects().events(CAPACITY)):
            if b"pool.offline" in data and (event := json.loads(data)).get("type") == "pool.offline":
                found[event.get("reason") or "(no reason given)"] += 1
    finally:
        await nc.close()
    return found


async def grants_in_stream(nats_url: str) -> int:
    import nats

    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(Subjects().stream(ALLOC))
        return info.state.messages
    finally:
        await nc.close()


def quotes_every(client: httpx.Client, combos: list[tuple[str, str]]) -> bool:
    """The broker quotes every ``(model, region)``: its world holds every pool registered."""
    for model, region in combos:
        r = client.post("/v1/quotes", json={"units": 1, "accelerators": {"models": [model]},
                                            "placement": {"regions": [region]}})
        if r.status_code != 200 or not r.json()["options"]:
            return False
    return True


def wait_until(what: str, check, timeout: float) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    deadline = t0 + timeout
    while True:
        try:
            if check():
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=12.0, help="measured seconds of each side, all rounds")
    ap.add_argument("--rounds", type=int, default=3, help="turns each side takes")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1, help="uvicorn workers for the broker and the floor app")
    ap.add_argument("--heartbeat-every", type=float, default=None,
                    help="seconds between two heartbeats of one pool (default: a third of the heartbeat TTL)")
    ap.add_argument("--write", action="store_true", help="append the results to docs/benchmarks-log.md")
    args = ap.parse_args()

    rng = random.Random(20261125)
    tmp = Path(tempfile.mkdtemp(prefix="cb-broker-bench-"))
    nats, redis = start_nats(tmp / "nats"), start_redis(tmp / "redis")
    admin = f"bench-{secrets.token_hex(8)}"
    settings = Settings(nats_url=nats.url, redis_url=redis.url, admin_key=admin,  # the default heartbeat TTL
                        log_level="warning", workers=args.workers)
    hb_every = args.heartbeat_every or settings.heartbeat_ttl_s / 3
    heartbeater: Heartbeater | None = None
    env = settings_to_env(settings)
    registry = ServiceProcess("registry", free_port(), env, tmp / "registry.log")
    broker = ServiceProcess("broker", free_port(), env, tmp / "broker.log")
    floor_port = free_port()
    floor_log = tmp / "floor.log"
    floor: subprocess.Popen | None = None
    say = lines = Lines()  # printed as it goes, kept for --write
    ok = server_errors = False

    try:
        registry.start()
        registry.wait_healthy()
        say(f"machine: {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}; "
            f"broker and floor workers: {args.workers}; {args.connections} connections")
        admin_auth = {"Authorization": f"Bearer {admin}"}
        world = populate(registry.url, admin, args.pools, rng)
        models, regions, items, created, took = world.models, world.regions, world.items, world.created, world.took
        total_units = sum(i["units"] for i in items)
        say(f"pools: {created} registered via POST /v1/pools/bulk (batches of {BATCH}) in {took:.2f}s; "
            f"{len(models)} models x {len(regions)} regions, {total_units:,} units")
        heartbeater = Heartbeater(registry.url, world.provider_key, [i["pool_id"] for i in items], hb_every)
        heartbeater.start()
        hb_started = time.perf_counter()

        t0 = time.perf_counter()
        broker.start()
        broker.wait_healthy(timeout=90)
        healthy = time.perf_counter() - t0
        qc = httpx.Client(base_url=broker.url, headers=admin_auth, timeout=30)
        combos = sorted({(i["model"], i["region"]) for i in items})

        def sees_all() -> bool:
            return quotes_every(qc, combos)

        def every_worker_ready() -> bool:  # fresh connections, so that each worker is likely asked
            for _ in range(4 * args.workers):
                r = httpx.post(f"{broker.url}/v1/quotes", json={"units": 1}, headers=admin_auth, timeout=30)
                if r.status_code != 200 or not r.json()["options"]:
                    return False
            return True

        wait_until("broker sees every model x region", sees_all, 60)
        wait_until("every broker worker quotes", every_worker_ready, 60)
        seen = time.perf_counter() - t0
        total, each = rss_mib(broker.proc.pid)
        say(f"broker: healthy {healthy:.2f}s after start, every one of {len(combos)} model x region combinations "
            f"quoted after {seen:.2f}s; RSS with {created} pools loaded {total:.0f} MiB"
            + (f" ({' + '.join(f'{x:.0f}' for x in each)} MiB: uvicorn parent, then its children)"
               if len(each) > 1 else ""))

        bodies = request_bodies(2000, models, regions, rng)
        reqs = [request("POST", "/v1/requests", {"Authorization": f"Bearer {world.tenant_keys[k % N_TENANTS]}"},
                        json.dumps(b).encode()) for k, b in enumerate(bodies)]

        floor = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "floor_app.py"), "--port", str(floor_port),
             "--workers", str(args.workers)],
            env={**os.environ, "NATS_URL": nats.url, "REDIS_URL": redis.url,
                 "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
            stdout=open(floor_log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,  # noqa: SIM115
            start_new_session=True)

        def floor_up() -> bool:
            if floor.poll() is not None:
                raise RuntimeError(f"floor app exited with {floor.returncode}; see {floor_log}")
            return httpx.post(f"http://127.0.0.1:{floor_port}/floor", timeout=5).status_code == 201

        wait_until("floor app answers", floor_up, 60)
        freqs = [request("POST", "/floor", {}, b"")]

        def side(port: int, make, seconds: float) -> Result:  # noqa: ANN001
            return asyncio.run(run(port, make, connections=args.connections, seconds=seconds))

        # the load generator runs in this process, beside the world it registered (10,000
        # pool items, the request bodies): a full collection of those stalled it for ~60 ms
        # mid-round, and every answer in flight then measured 60 ms longer, the floor's and
        # the broker's alike. Frozen, they are never walked again (bench/loadgen.py)
        gc.collect()
        gc.freeze()
        before = asyncio.run(grants_in_stream(nats.url))
        warm = side(broker.port, lambda i: reqs[i % len(reqs)], WARMUP_S)
        side(floor_port, lambda i: freqs[0], WARMUP_S)
        per_round = args.seconds / args.rounds
        rounds: list[tuple[Result, Result]] = []
        cpu = {"broker": 0.0, "floor": 0.0, "load_b": 0.0, "load_f": 0.0, "wall_b": 0.0, "wall_f": 0.0}
        for r in range(args.rounds):
            cpu0, own0, wall0 = cpu_s(broker.proc.pid), own_cpu_s(), time.perf_counter()
            offset = 7919 * (r + 1)
            res = side(broker.port, lambda i, o=offset: reqs[(i + o) % len(reqs)], per_round)
            cpu["broker"] += cpu_s(broker.proc.pid) - cpu0
            cpu["load_b"] += own_cpu_s() - own0
            cpu["wall_b"] += time.perf_counter() - wall0
            cpu0, own0, wall0 = cpu_s(floor.pid), own_cpu_s(), time.perf_counter()
            fres = side(floor_port, lambda i: freqs[0], per_round)
            cpu["floor"] += cpu_s(floor.pid) - cpu0
            cpu["load_f"] += own_cpu_s() - own0
            cpu["wall_f"] += time.perf_counter() - wall0
            rounds.append((res, fres))
        res, fres = combine([b for b, _ in rounds]), combine([f for _, f in rounds])
        placed = res.statuses.get(201, 0)
        placements = rate_201(res)
        say(f"placements: {placements:,.0f}/s (201s only; 1-4 units, queue: false, 30% with a model, vendor or "
            f"region constraint) — {res.summary()}; broker CPU {cpu['broker'] / cpu['wall_b']:.0%} of a core, "
            f"loadgen {cpu['load_b'] / cpu['wall_b']:.0%}")
        grants = asyncio.run(grants_in_stream(nats.url)) - before
        expected = warm.statuses.get(201, 0) + placed
        say(f"durability: {grants} grant events in the allocation stream for {expected} 201s "
            f"(warm-up + measured): {'match' if grants == expected else 'MISMATCH'}")
        server_errors = any(s >= 500 for s in [*res.statuses, *warm.statuses])
        if set(res.statuses) | set(warm.statuses) != {201}:
            reasons = asyncio.run(rejection_reasons(nats.url))
            say("not placed (warm-up + measured), by reason from request.rejected events: "
                + ("; ".join(f"{n} x {why!r}" for why, n in reasons.most_common(5)) or "none recorded")
                + (f"; 5xx: see {broker.log_path}" if server_errors else ""))
        floor_rate = rate_201(fres)
        say(f"floor (bench/floor_app.py: 1 EVALSHA + 1 acked JetStream publish): {floor_rate:,.0f}/s — "
            f"{fres.summary()}; floor app CPU {cpu['floor'] / cpu['wall_f']:.0%} of a core, "
            f"loadgen {cpu['load_f'] / cpu['wall_f']:.0%}")
        ratio = placements / floor_rate if floor_rate else float("nan")
        each = [rate_201(b) / rate_201(f) if rate_201(f) else float("nan") for b, f in rounds]
        p99 = res.pct(99)
        say(f"ratio = placements/s ÷ floor = {placements:,.0f} ÷ {floor_rate:,.0f} = {ratio:.2f} "
            f"(target >= {RATIO_TARGET}: {'met' if ratio >= RATIO_TARGET else 'NOT met'}); by round, taking turns "
            f"({per_round:.1f} s each side): " + ", ".join(f"{rate_201(b):,.0f} ÷ {rate_201(f):,.0f} = {x:.2f}"
                                                         for (b, f), x in zip(rounds, each, strict=True))
            + f"; placement p99 {p99:.2f} ms (target <= {P99_TARGET_MS:.0f} ms: "
            f"{'met' if p99 <= P99_TARGET_MS else 'NOT met'}; all responses)")
        beats = heartbeater.stop()
        heartbeater = None
        offline = asyncio.run(offline_events(nats.url))
        offline_now = httpx.get(f"{registry.url}/v1/pools", params={"status": "offline", "limit": 1000},
                                headers=admin_auth, timeout=60).raise_for_status().json()["items"]
        steady = not offline and not offline_now and not beats.failed_requests and not beats.error \
            and set(beats.statuses) == {"online"}
        say(f"heartbeats (registry heartbeat TTL {settings.heartbeat_ttl_s:.0f}s, every pool heartbeated every "
            f"{hb_every:.1f}s by a process of its own, for the last {time.perf_counter() - hb_started:.0f}s of the run "
            f"since registration): "
            f"{beats.summary()}; pool.offline events in the capacity stream: {sum(offline.values())}"
            + (f" ({dict(offline)})" if offline else "") + f"; pools offline at the end: {len(offline_now)} — "
            + ("every pool stayed online" if steady else "NOT STEADY: the run measured a shrinking world"))
        ok = steady
    finally:
        if heartbeater is not None:
            heartbeater.stop()
        stop_process(floor)
        broker.stop()
        registry.stop()
        nats.stop()
        redis.stop()
        if ok and not server_errors:
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # keep the logs and stores of a failed run
            print(f"logs kept in {tmp}", file=sys.stderr, flush=True)
    if args.write:
        append_section("broker", command("broker_bench.py", ap, args, ("pools", "seconds", "rounds", "connections", "workers")),
                       bullets(lines))


if __name__ == "__main__":
    main()
