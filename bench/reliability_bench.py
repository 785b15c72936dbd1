"""How fast the reliability record takes allocation events (docs/reliability.md).

    python bench/reliability_bench.py [--leases 20000] [--pools 1000] [--batch 256]

Starts its own redis-server on a free port and applies the events of ``--leases`` leases
(grant, ready or failed, an end for most) over ``--pools`` pools of 50 providers, in
batches as the broker's feed does (one pipeline of scripts per fetched batch); then the
same events again (a redelivery: nothing changes). Prints events per second for both, the
CPU the feed itself spends per event (what a broker replica gives up), and the time to
read the score map the engines refresh from.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.meter.reliability import ReliabilityRecord  # noqa: E402
from services.cli.servers import start_redis  # noqa: E402
from services.common.keys import Keys  # noqa: E402
from services.common.messages import (  # noqa: E402
    LeaseFailed,
    LeaseInfo,
    LeaseLost,
    LeaseProvisioning,
    LeaseReady,
    LeaseReleased,
)
from services.common.reliability import read_scores  # noqa: E402

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def events(leases: int, pools: int, rng: random.Random) -> list:
    out = []
    for i in range(leases):
        pool = rng.randrange(pools)
        lease = LeaseInfo(lease_id=f"l{i}", request_id=f"r{i}", tenant="t", pool_id=f"p{pool}",
                          provider=f"v{pool % 50}", region="cn-gz", model="m", units=1, billing="on_demand",
                          unit_price=Decimal(1), granted_at=T0, expires_at=T0, delivery="ssh")
        out.append(LeaseProvisioning(id=f"l{i}.1", at=T0, lease=lease))
        if rng.random() < 0.1:
            out.append(LeaseFailed(id=f"l{i}.2", at=T0 + timedelta(seconds=60), lease=lease, seq=2))
            continue
        out.append(LeaseReady(id=f"l{i}.2", at=T0 + timedelta(seconds=rng.uniform(5, 120)), lease=lease, seq=2))
        if rng.random() < 0.8:
            end = LeaseLost if rng.random() < 0.05 else LeaseReleased
            out.append(end(id=f"l{i}.3", at=T0 + timedelta(hours=rng.uniform(0.1, 10)), lease=lease, seq=3))
    return out


async def apply(record: ReliabilityRecord, evs: list, batch: int) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds)."""
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(evs), batch):
        await record.apply_all(evs[i:i + batch])
    return time.perf_counter() - t, time.process_time() - cpu


async def main_async(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    evs = events(args.leases, args.pools, rng)
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_redis(Path(tmp) / "redis")
        client = aioredis.Redis.from_url(proc.url)
        try:
            keys = Keys("bench")
            record = ReliabilityRecord(client, keys)
            await record.start()
            (first, first_cpu), (again, again_cpu) = [await apply(record, evs, args.batch) for _ in range(2)]
            t = time.perf_counter()
            scores = await read_scores(client, keys)
            read_s = time.perf_counter() - t
            print(f"{len(evs):,} events of {args.leases:,} leases over {args.pools:,} pools, batches of {args.batch}")
            for what, wall, cpu in (("first time", first, first_cpu), ("redelivered (nothing changes)", again, again_cpu)):
                print(f"- {what}: {len(evs) / wall:,.0f} events/s ({wall:.2f} s); the feed's own CPU "
                      f"{cpu * 1e6 / len(evs):.1f} us per event (the rest is Redis running the script)")
            print(f"- score map of {len(scores):,} pools read in {read_s * 1000:.1f} ms")
        finally:
            await client.aclose()
            proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leases", type=int, default=20_000)
    ap.add_argument("--pools", type=int, default=1_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=7)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
