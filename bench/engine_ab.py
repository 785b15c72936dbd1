"""The matching engine of another git ref against this tree's, in one process.

    python bench/engine_ab.py [--base main] [--sizes 1000,10000,100000] [--asks 3000] [--seed 7]

``engine_bench.py`` times one engine at a time, so on a shared machine two runs differ by
more than a small change does. Here both engines get the same pools, the same free-unit
changes and the same asks (``engine_bench``'s), and each ask is timed on both back to back,
alternating which goes first; the median of the per-ask ratios (this tree / base) cancels
the machine's load. Run it with ``--base HEAD`` to see the harness's own bias (about 1%).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import engine_bench as eb  # noqa: E402

from services.broker.matching import Engine  # noqa: E402
from services.registry.domain.topology import default_topology  # noqa: E402


def base_package(ref: str, into: Path):
    """The ref's ``services/broker/matching`` as the package ``base_matching``."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "services/broker/matching"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    (into / "services/broker/matching").rename(into / "base_matching")
    sys.path.insert(0, str(into))
    return importlib.import_module("base_matching")


def convert(struct, cls):
    return cls(**{f: getattr(struct, f) for f in cls.__struct_fields__})


def run(base, size: int, n: int, seed: int) -> str:
    rng = random.Random(seed * 1_000_003 + size)
    pools = eb.make_pools(size, rng, eb.load_models())
    asks = eb.make_asks(n, rng, eb.load_models(), [p.pool_id for p in pools])
    base_asks = [convert(a, base.Ask) for a in asks]
    a, b = base.Engine(default_topology()), Engine(default_topology())
    for p in pools:
        a.upsert(convert(p, base.PoolState))
        b.upsert(p)
    gc.collect()
    gc.freeze()
    for x, y in zip(base_asks[:200], asks[:200], strict=True):  # warm both engines' caches
        a.match(x)
        b.match(y)
    ta: list[float] = []
    tb: list[float] = []
    ids = [p.pool_id for p in pools]
    caps = {p.pool_id: p.capacity for p in pools}
    for i, (x, y) in enumerate(zip(base_asks, asks, strict=True)):
        for _ in range(2):
            pid = rng.choice(ids)
            free = rng.randint(0, caps[pid])
            a.set_free(pid, free)
            b.set_free(pid, free)
        for engine, ask, out in ([(a, x, ta), (b, y, tb)] if i % 2 else [(b, y, tb), (a, x, ta)]):
            t = time.perf_counter_ns()
            engine.match(ask)
            out.append((time.perf_counter_ns() - t) / 1000)
    gc.unfreeze()
    ratio = statistics.median([q / p for p, q in zip(ta, tb, strict=True)])
    return (f"| {size:,} | {statistics.median(ta):.0f} | {statistics.median(tb):.0f} | {statistics.fmean(ta):.0f} "
            f"| {statistics.fmean(tb):.0f} | {ratio:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="main", help="git ref of the engine to compare with")
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--asks", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = base_package(args.base, Path(tmp))
        print(f"base {args.base} vs this tree, {args.asks} asks per size, seed {args.seed}\n")
        print("| pools | base median µs | this median µs | base mean µs | this mean µs | median per-ask ratio |")
        print("|---:|---:|---:|---:|---:|---:|")
        for size in map(int, args.sizes.split(",")):
            print(run(base, size, args.asks, args.seed), flush=True)


if __name__ == "__main__":
    main()
