"""The FGD paper's evaluation (Weng et al., USENIX ATC '23), done as its public simulator
(hkust-adsl/kubernetes-scheduler-simulator) does it, for the engine's per-device placement
(services/broker/matching/devices.py) and the paper's baselines (bench/fgd_baselines.py).

Protocol, per seed (42–51 by default):
1. the pods are sorted by name and shuffled with the seed;
2. the list is tuned to 1.3 × the cluster's GPU capacity in milli-GPU: inflated by
   appending pods drawn at random from the name-sorted list (the simulator's
   ``tuneUpPods``, with its quirk: it stops when the next pod's *per-GPU* milli would
   overshoot), or deflated by dropping random pods (``tuneDownPods``);
3. the pods are scheduled one by one, none departs; after each the arrived GPU milli and
   the allocated GPU milli are recorded;
4. KPI = mean allocated ÷ capacity (in %, 2 decimals) over the events whose arrived ÷
   capacity rounds to 100% — "GPU allocation ratio when arrived workload reaches 100%"
   (``merge_alloc_discrete.py``). The run stops once the arrived work passes 100.5%.
CPU and memory of nodes and pods come from the CSVs and are filtered on; GPU model
constraints come from the pod list (``gpu_spec``). The typical pods (FGD) and the expected
mix (engine) are computed from the whole, un-inflated pod list.

Decision times are the deciding thread's CPU time (``time.thread_time_ns``): on a shared
machine wall time also counts the time the process waits for a core (printed too).

Not identical to the simulator: Python's RNG replaces Go's math/rand, so the shuffles (and
the random policy's draws) are different draws of the same distributions. Ties between
nodes go, as in the simulator's scheduler, to the node whose name sorts first.

    python bench/fgd_replay.py [--pods FILE] [--nodes FILE] [--seeds 42-51]
                               [--policies engine,fgd,best-fit,dot-product,random] [--json]
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fgd_baselines import FGD, BestFit, Cluster, DotProduct, Pod, RandomFit, typical_pods  # noqa: E402
from services.broker.matching.devices import (  # noqa: E402
    DeviceAsk,
    DeviceCluster,
    DevicePlacement,
    Knobs,
    NodeSpec,
    typical_mix,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alibaba-gpu-v2023"
POLICIES = ("engine", "fgd", "best-fit", "dot-product", "random")
PAPER = {"fgd": 95.2, "best-fit": 92.9, "dot-product": 90.6, "random": 86.3}


def read_nodes(path: Path, scale: int = 1) -> list[tuple[str, str, int, int, int]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [(f"{r['sn']}-{k}" if scale > 1 else r["sn"], r["model"], int(r["gpu"]), int(r["cpu_milli"]),
             int(r["memory_mib"])) for k in range(scale) for r in rows]


def read_pods(path: Path) -> list[Pod]:
    """As the simulator's pod_csv_to_yaml.py + GetPodResource read them: GPU milli only
    when num_gpu > 0, clipped to 1000; a zero CPU request counts as 100 milli."""
    out = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            gpus = int(r["num_gpu"])
            milli = min(int(r["gpu_milli"]), 1000) if gpus else 0
            milli = max(milli, 0)
            models = frozenset(m for m in (r.get("gpu_spec") or "").split("|") if m) if gpus else frozenset()
            out.append(Pod(r["name"], int(r["cpu_milli"]) or 100, int(r["memory_mib"]),
                           gpus if milli else 0, milli, models))
    return out


def arrival_list(pods: list[Pod], capacity: int, seed: int, ratio: float = 1.3) -> list[Pod]:
    by_name = sorted(pods, key=lambda p: p.name)
    rng = random.Random(seed)
    order = list(by_name)
    rng.shuffle(order)
    total = sum(p.total_milli for p in order)
    target = ratio * capacity
    while total > target:  # tuneDownPods: drop random pods until under the target
        total -= order.pop(rng.randrange(len(order))).total_milli
    i = 0
    while total < target:
        p = by_name[rng.randrange(len(by_name))]
        if total + p.milli > target:  # per-GPU milli, as tuneUpPods checks
            break
        total += p.total_milli
        order.append(Pod(f"{p.name}-tuned-{i}", p.cpu, p.mem, p.gpus, p.milli, p.models))
        i += 1
    return order


def as_ask(p: Pod) -> DeviceAsk:
    return DeviceAsk(cpu_milli=p.cpu, memory_mib=p.mem, gpus=p.gpus, milli=p.milli if p.gpus else 1000,
                     models=p.models)


class Engine:
    """Adapter: the engine's own state replaces the shared ``Cluster`` for decisions."""

    name = "engine"

    def __init__(self, nodes, pods: list[Pod], knobs: Knobs) -> None:
        specs = [NodeSpec(name=n[0], model=n[1], devices=n[2], cpu_milli=n[3], memory_mib=n[4]) for n in nodes]
        self.dc = DeviceCluster(specs, typical_mix([as_ask(p) for p in pods]), knobs)
        self.last: DevicePlacement | None = None

    def choose(self, c: Cluster, pod: Pod):
        self.last = self.dc.decide(as_ask(pod))
        return None if self.last is None else (self.last.node, self.last.devices)

    def bound(self) -> None:
        assert self.last is not None
        self.dc.take(self.last)


def make_policy(name: str, nodes, pods: list[Pod], seed: int, knobs: Knobs):
    rng = random.Random(seed * 7919 + 1)
    if name == "engine":
        return Engine(nodes, pods, knobs)
    if name == "fgd":
        return FGD(typical_pods(pods))
    if name == "random":
        return RandomFit(rng)
    return {"best-fit": BestFit, "dot-product": DotProduct}[name]()


def run(policy_name: str, nodes, pods: list[Pod], seed: int, knobs: Knobs = Knobs(),
        ratio: float = 1.3) -> dict:
    cluster = Cluster(nodes)
    cap = cluster.capacity
    arrivals = arrival_list(pods, cap, seed, ratio)
    policy = make_policy(policy_name, nodes, pods, seed, knobs)
    gc.collect()
    gc.freeze()
    arrived = placed = n = 0
    at_100: list[float] = []
    near_100: list[float] = []
    times: list[int] = []
    walls: list[int] = []
    clock, wall = time.thread_time_ns, time.perf_counter_ns
    for pod in arrivals:
        arrived += pod.total_milli
        n += 1
        t0, w0 = clock(), wall()
        pick = policy.choose(cluster, pod)
        times.append(clock() - t0)
        walls.append(wall() - w0)
        if pick is not None:
            node, devices = pick
            cluster.bind(pod, node, devices)
            if isinstance(policy, Engine):
                policy.bound()
            placed += 1
        arrive_pct = round(arrived / cap * 100)
        alloc_pct = round(cluster.allocated / cap * 100, 2)
        if arrive_pct == 100:
            at_100.append(alloc_pct)
        elif 99 <= arrive_pct <= 101:
            near_100.append(alloc_pct)
        if arrived / cap > 1.005 and at_100:
            break
    gc.unfreeze()
    if isinstance(policy, Engine):
        assert policy.dc.allocated_milli() == cluster.allocated, "engine state diverged from the replay"
    kpi = statistics.fmean(at_100 or near_100)
    times.sort()
    walls.sort()
    return {"allocated_pct": round(kpi, 2), "placed_pct": round(100 * placed / n, 2),
            "decision_us_p50": times[len(times) // 2] / 1000, "decision_us_p99": times[int(len(times) * 0.99)] / 1000,
            "wall_us_p50": walls[len(walls) // 2] / 1000, "wall_us_p99": walls[int(len(walls) * 0.99)] / 1000,
            "pods": n}


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=Path, default=DATA / "openb_pod_list_default.csv")
    ap.add_argument("--nodes", type=Path, default=DATA / "openb_node_list_gpu_node.csv")
    ap.add_argument("--seeds", default="42-51")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--scale", type=int, default=1, help="replicate the node list N times (16 ≈ 100k GPUs)")
    ap.add_argument("--tune", type=float, default=1.3)
    ap.add_argument("--scarcity-weight", type=float, default=Knobs().scarcity_weight)
    ap.add_argument("--no-memory", action="store_true", help="engine: CPU-only fragmentation, as FGD")
    ap.add_argument("--no-best-fit", action="store_true", help="engine: no best-fit tie-break")
    ap.add_argument("--tolerance", type=float, default=Knobs().tolerance)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        ap.error(f"unknown policies {bad}; choose from {', '.join(POLICIES)}")
    knobs = Knobs(memory_aware=not args.no_memory, scarcity_weight=args.scarcity_weight,
                  best_fit=not args.no_best_fit, tolerance=args.tolerance)
    nodes = read_nodes(args.nodes, args.scale)
    pods = read_pods(args.pods)
    seeds = parse_seeds(args.seeds)
    per: dict[str, list[dict]] = {p: [] for p in policies}
    cap = sum(n[2] for n in nodes)
    print(f"{len(nodes)} nodes, {cap} GPUs; {len(pods)} pods; seeds {seeds}; tune {args.tune}", flush=True)
    for seed in seeds:
        for p in policies:
            r = run(p, nodes, pods, seed, knobs, args.tune)
            per[p].append(r)
            print(f"seed {seed} {p:12s} alloc {r['allocated_pct']:6.2f}%  placed {r['placed_pct']:6.2f}%  "
                  f"cpu p50 {r['decision_us_p50']:8.1f}us p99 {r['decision_us_p99']:8.1f}us  "
                  f"wall p50 {r['wall_us_p50']:8.1f}us p99 {r['wall_us_p99']:8.1f}us", flush=True)
    summary = {p: {k: round(statistics.fmean(r[k] for r in rs), 2)
                   for k in ("allocated_pct", "placed_pct", "decision_us_p50", "decision_us_p99")}
               for p, rs in per.items()}
    print(f"\n{'policy':12s} {'alloc %':>8s} {'min':>7s} {'max':>7s} {'placed %':>9s} {'p50 us':>9s} "
          f"{'p99 us':>9s} {'paper':>6s}")
    for p, s in summary.items():
        a = [r["allocated_pct"] for r in per[p]]
        print(f"{p:12s} {s['allocated_pct']:8.2f} {min(a):7.2f} {max(a):7.2f} {s['placed_pct']:9.2f} "
              f"{s['decision_us_p50']:9.1f} {s['decision_us_p99']:9.1f} {PAPER.get(p, ''):>6}")
    if "engine" in per and "fgd" in per:
        gaps = [e["allocated_pct"] - f["allocated_pct"] for e, f in zip(per["engine"], per["fgd"])]
        sd = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
        print(f"engine − fgd: mean {statistics.fmean(gaps):+.2f} pp, min {min(gaps):+.2f}, max {max(gaps):+.2f}, "
              f"sd {sd:.2f} over {len(gaps)} seeds")
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
