"""Placement quality on a real trace: Alibaba's GPU cluster (cluster-trace-gpu-v2023).

    python bench/trace_replay.py [--seed 7] [--runs 10] [--shrink 0.01] [--write]

The cluster is ``openb_node_list_gpu_node.csv`` (1,213 nodes, 6,212 GPUs): one pool per
node, read with the registry's own importer (``parse_alibaba_nodes``), units = the
node's GPUs, one price per model (the importer's default on-demand prices). The trace
hides three models behind the codes G1/G2/G3; the replay keeps them as their own
pseudo-models (baselines and ``gpu_spec`` see the code), and only for the engine they
are mapped to distinct catalogue models that no other node uses (``ASSUME``; that
choice sets their price, so it steers the engine's cost objective).

The requests are ``openb_pod_list_default.csv`` in arrival order (``creation_time``):
``num_gpu`` GPUs on one node (gang); tasks with ``num_gpu`` 0 are skipped; a fractional
``gpu_milli`` (a share of one GPU) takes a whole GPU (the engine has no GPU sharing);
``gpu_spec`` ('' = any, else codes joined by '|') restricts the models. Departures
come at ``deletion_time``; time is compressed: arrivals and departures are processed in
time order (departures first at equal times). A request that does not fit is dropped,
not queued.

Policies, each on its own copy of the same simulated cluster with exact free counts:

* ``engine``: the broker's ``Engine.match`` (gang ask, objective cost, option 1);
* ``best-fit``: the node with the fewest free GPUs that still fits (ties: CSV order);
* ``first-fit``: the first node in CSV order that fits;
* ``random-fit``: a uniformly random fitting node (seeded).

Metrics: the share of GPUs allocated when the first request cannot be placed (the
fragmentation metric of the FGD paper, Weng et al. ATC '23: higher is better), the share
of requests (and of requested GPUs) placed over the replay, the mean allocation ratio
(sampled after every arrival), and the engine's decision time per request.

Scenarios:

1. ``trace``: the whole trace with departures on the whole cluster. Its peak concurrent
   demand is ~71 GPUs of 6,212, so nothing ever fails: all policies place everything.
2. ``fill``: the FGD paper's protocol, "fill until the first failure": the trace's
   arrivals in order **without departures** on the whole cluster (7,433 GPUs requested
   in total > 6,212), continued past the first failure (drops counted).
3. ``fill-sampled``: the same with tasks drawn at random (with replacement, seeded) from
   the trace until 1.25 × the cluster's GPUs are requested, ``--runs`` seeds (in the
   spirit of the FGD paper's workloads sampled from the trace).
4. ``shrunk``: the trace with departures on a seeded random ``--shrink`` fraction of the
   nodes (so that its peak demand no longer fits), ``--runs`` node samples.

Whole-GPU packing of a workload that is 99% one-GPU tasks is easy: the packing policies
tie on the whole cluster; the differences show on the shrunk cluster. (The FGD paper's
fragmentation comes mostly from GPU sharing, which rounding up to whole GPUs removes.)
The engine ranks by cost first and uses best fit only among pools of the same price, so
it puts one-GPU tasks on a cheaper 8-GPU node while a dearer 4-GPU node is idle, where
best fit keeps the 8-GPU node whole for the next 8-GPU task; how much that matters
depends on the prices (here: on the models assumed for G2/G3).
"""

from __future__ import annotations

import argparse
import bisect
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import append_section  # noqa: E402
from services.broker.matching import Ask, Engine, PoolState  # noqa: E402
from services.registry.domain.catalogue import load_catalogue, resolve  # noqa: E402
from services.registry.domain.importers import parse_alibaba_nodes, read_csv_rows  # noqa: E402
from services.registry.domain.topology import default_topology  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alibaba-gpu-v2023"
NODES_CSV = DATA / "openb_node_list_gpu_node.csv"
PODS_CSV = DATA / "openb_pod_list_default.csv"
PROVIDER = "alibaba"
REGION = "cn-yrd"  # one region: no transfer, the placement is about packing only
# Undisclosed codes -> distinct catalogue models no other node uses (engine only; their
# default prices: a100-40gb 1.29, a100-80gb 1.79, h100 2.99 USD per GPU-hour)
OVERFILL = 1.25  # fill-sampled: GPUs requested / cluster GPUs (so every run fails)
ASSUME = {"G1": "nvidia-a100-sxm-40gb", "G2": "nvidia-a100-sxm-80gb", "G3": "nvidia-h100-sxm-80gb"}


# --- data ---------------------------------------------------------------------------------
@dataclass
class Node:
    pool_id: str
    sn: str
    code: str  # the trace's model code (G2, T4, V100M32, ...)
    model: str  # the catalogue model the engine sees
    gpus: int
    state: PoolState  # as the engine indexes it (free = gpus)


@dataclass(frozen=True)
class Task:
    name: str
    gpus: int  # whole GPUs (gpu_milli fractions rounded up to 1)
    codes: frozenset[str]  # allowed model codes (empty: any)
    start: int
    end: int


def _pool_state(pool_id: str, spec, acc, country: str) -> PoolState:
    return PoolState(
        pool_id=pool_id, provider=spec.provider or PROVIDER, region=spec.region, country=country,
        zone=spec.zone, model=spec.model, vendor=acc.vendor, stack=acc.stack,
        frameworks=acc.frameworks, memory_gib=acc.memory_gib,
        interconnect=spec.interconnect or acc.interconnect, host_arch=spec.host_arch,
        bf16_tflops=acc.bf16_tflops, fp16_tflops=acc.fp16_tflops, fp8_tflops=acc.fp8_tflops,
        units_per_node=spec.units_per_node, capacity=spec.units, free=spec.units,
        currency=spec.prices.currency, on_demand=spec.prices.on_demand, egress_gbps=spec.egress_gbps)


def load_nodes(path: Path = NODES_CSV) -> list[Node]:
    return nodes_from_rows(list(read_csv_rows(path)))


def nodes_from_rows(rows: list[dict[str, str]]) -> list[Node]:
    """Nodes from rows of the node list, through the registry's importer."""
    result = parse_alibaba_nodes(rows, PROVIDER, REGION, ASSUME)
    if result.errors or result.unmapped or result.skipped_no_accelerator \
            or len(result.pools) != len(rows):
        raise SystemExit(f"node import lost rows: errors {result.errors[:3]}, unmapped "
                         f"{dict(result.unmapped)}, no GPU {result.skipped_no_accelerator}")
    catalogue = load_catalogue()
    country = {r.id: r.country for r in default_topology().regions}[REGION]
    nodes = []
    for row, (pool_id, spec) in zip(rows, result.pools, strict=True):
        nodes.append(Node(pool_id=pool_id, sn=row["sn"], code=row["model"], model=spec.model,
                          gpus=spec.units,
                          state=_pool_state(pool_id, spec, catalogue[spec.model], country)))
    return nodes


def load_tasks(path: Path = PODS_CSV) -> tuple[list[Task], dict[str, int]]:
    """Tasks in arrival order, and counts of what was skipped or rounded."""
    tasks = []
    stats = {"rows": 0, "no_gpu": 0, "fractional": 0}
    for row in read_csv_rows(path):
        stats["rows"] += 1
        n = int(row["num_gpu"] or 0)
        if n == 0:
            stats["no_gpu"] += 1
            continue
        if int(row["gpu_milli"] or 1000) < 1000:
            stats["fractional"] += 1
        spec = row.get("gpu_spec", "")
        codes = frozenset(c.strip() for c in spec.split("|") if c.strip())
        start = int(row["creation_time"])
        tasks.append(Task(name=row["name"], gpus=n, codes=codes, start=start,
                          end=max(start, int(row["deletion_time"] or start))))
    tasks.sort(key=lambda t: t.start)  # stable: CSV order at equal times
    return tasks, stats


def engine_models(codes: frozenset[str]) -> frozenset[str]:
    """The catalogue models the engine is asked for, for a task's allowed codes."""
    out = set()
    for code in codes:
        if code in ASSUME:
            out.add(ASSUME[code])
        else:
            acc = resolve(code)
            if acc is not None:
                out.add(acc.model)
    return frozenset(out)


def peak_demand(tasks: list[Task]) -> int:
    cur = peak = 0
    for _, delta in sorted([(t.start, t.gpus) for t in tasks] + [(t.end, -t.gpus) for t in tasks],
                           key=lambda e: (e[0], e[1])):
        cur += delta
        peak = max(peak, cur)
    return peak


# --- policies -------------------------------------------------------------------------------
class Policy:
    """Chooses a node for a task; told of every change of a node's free GPUs."""

    name = "?"

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes

    def choose(self, task: Task, free: list[int]) -> int | None:
        raise NotImplementedError

    def changed(self, i: int, old: int, new: int) -> None:
        pass


class _Buckets(Policy):
    """Nodes bucketed by (code, free GPUs), each bucket a sorted list of node indexes."""

    def __init__(self, nodes: list[Node]) -> None:
        super().__init__(nodes)
        self.max_gpus = max(n.gpus for n in nodes)
        self.codes = sorted({n.code for n in nodes})
        self.buckets: dict[tuple[str, int], list[int]] = {}
        for i, n in enumerate(nodes):
            self.buckets.setdefault((n.code, n.gpus), []).append(i)

    def changed(self, i: int, old: int, new: int) -> None:
        code = self.nodes[i].code
        b = self.buckets[(code, old)]
        del b[bisect.bisect_left(b, i)]
        bisect.insort(self.buckets.setdefault((code, new), []), i)

    def _fitting(self, task: Task):
        codes = [c for c in self.codes if c in task.codes] if task.codes else self.codes
        for f in range(task.gpus, self.max_gpus + 1):
            lists = [b for c in codes if (b := self.buckets.get((c, f)))]
            if lists:
                yield f, lists


class BestFit(_Buckets):
    name = "best-fit"

    def choose(self, task: Task, free: list[int]) -> int | None:
        for _, lists in self._fitting(task):
            return min(b[0] for b in lists)
        return None


class FirstFit(_Buckets):
    name = "first-fit"

    def choose(self, task: Task, free: list[int]) -> int | None:
        firsts = [b[0] for _, lists in self._fitting(task) for b in lists]
        return min(firsts) if firsts else None


class RandomFit(_Buckets):
    name = "random-fit"

    def __init__(self, nodes: list[Node], seed: int) -> None:
        super().__init__(nodes)
        self.rng = random.Random(seed)

    def choose(self, task: Task, free: list[int]) -> int | None:
        lists = [b for _, ls in self._fitting(task) for b in ls]
        total = sum(len(b) for b in lists)
        if not total:
            return None
        k = self.rng.randrange(total)
        for b in lists:
            if k < len(b):
                return b[k]
            k -= len(b)
        raise AssertionError("unreachable")


class EnginePolicy(Policy):
    name = "engine"

    def __init__(self, nodes: list[Node]) -> None:
        super().__init__(nodes)
        self.engine = Engine(default_topology())
        self.index = {n.pool_id: i for i, n in enumerate(nodes)}
        for n in nodes:
            self.engine.upsert(n.state)
        self.times_ns: list[int] = []
        self._asks: dict[tuple[int, frozenset[str]], Ask] = {}

    def ask(self, task: Task) -> Ask:
        key = (task.gpus, task.codes)
        a = self._asks.get(key)
        if a is None:
            a = self._asks[key] = Ask(units=task.gpus, gang=True, models=engine_models(task.codes),
                                      objective="cost")
        return a

    def choose(self, task: Task, free: list[int]) -> int | None:
        ask = self.ask(task)
        t0 = time.perf_counter_ns()
        decision = self.engine.match(ask, limit=1)
        self.times_ns.append(time.perf_counter_ns() - t0)
        if not decision.options:
            return None
        (alloc,) = decision.options[0].allocations
        return self.index[alloc.pool_id]

    def changed(self, i: int, old: int, new: int) -> None:
        self.engine.set_free(self.nodes[i].pool_id, new)


def make_policies(nodes: list[Node], seed: int, which: list[str]) -> list[Policy]:
    makers = {"engine": lambda: EnginePolicy(nodes), "best-fit": lambda: BestFit(nodes),
              "first-fit": lambda: FirstFit(nodes), "random-fit": lambda: RandomFit(nodes, seed)}
    return [makers[w]() for w in which]


# --- replay ---------------------------------------------------------------------------------
@dataclass
class Result:
    policy: str
    requests: int = 0
    placed: int = 0
    gpus_requested: int = 0
    gpus_placed: int = 0
    first_fail: int | None = None  # 1-based arrival number of the first request not placed
    first_fail_gpus: int = 0  # its size
    alloc_at_first_fail: float | None = None  # share of GPUs allocated just before it
    alloc_samples: float = 0.0  # sum of the allocation ratio after each arrival
    final_alloc: float = 0.0
    times_ns: list[int] = field(default_factory=list)

    @property
    def mean_alloc(self) -> float:
        return self.alloc_samples / self.requests if self.requests else 0.0


def replay(policy: Policy, tasks: list[Task], *, departures: bool) -> Result:
    """Place ``tasks`` with ``policy`` on a fresh copy of its nodes. Checks every choice
    (fits, allowed model) so that no policy can overbook."""
    nodes = policy.nodes
    free = [n.gpus for n in nodes]
    total = sum(free)
    allocated = 0
    events: list[tuple[int, int, int]] = []  # (time, 0 departure / 1 arrival, task index)
    for k, t in enumerate(tasks):
        events.append((t.start, 1, k))
        if departures:
            events.append((t.end, 0, k) if t.end > t.start else (t.start, 2, k))
    events.sort()
    where: dict[int, int] = {}
    res = Result(policy=policy.name)
    for _, kind, k in events:
        t = tasks[k]
        if kind != 1:  # departure
            i = where.pop(k, None)
            if i is not None:
                old = free[i]
                free[i] = old + t.gpus
                allocated -= t.gpus
                policy.changed(i, old, free[i])
            continue
        res.requests += 1
        res.gpus_requested += t.gpus
        i = policy.choose(t, free)
        if i is None:
            if res.first_fail is None:
                res.first_fail = res.requests
                res.first_fail_gpus = t.gpus
                res.alloc_at_first_fail = allocated / total
        else:
            if free[i] < t.gpus or (t.codes and nodes[i].code not in t.codes):
                raise AssertionError(f"{policy.name} overbooked or misplaced {t.name} on "
                                     f"{nodes[i].sn} ({free[i]} free, {nodes[i].code})")
            old = free[i]
            free[i] = old - t.gpus
            allocated += t.gpus
            policy.changed(i, old, free[i])
            where[k] = i
            res.placed += 1
            res.gpus_placed += t.gpus
        res.alloc_samples += allocated / total
    res.final_alloc = allocated / total
    if isinstance(policy, EnginePolicy):
        res.times_ns = policy.times_ns
    return res


def sample_tasks(tasks: list[Task], gpus: int, seed: int) -> list[Task]:
    """Tasks drawn with replacement (seeded) from the trace's tasks, in draw order, until
    the GPUs requested reach ``gpus``."""
    rng = random.Random(seed)
    out: list[Task] = []
    total = 0
    while total < gpus:
        t = rng.choice(tasks)
        out.append(t)
        total += t.gpus
    return out


def shrink(nodes: list[Node], fraction: float, seed: int) -> list[Node]:
    """A seeded random sample of ``fraction`` of the nodes, in CSV order."""
    rng = random.Random(seed)
    k = max(1, round(len(nodes) * fraction))
    keep = sorted(rng.sample(range(len(nodes)), k))
    return [nodes[i] for i in keep]


# --- report ---------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _times(times_ns: list[int]) -> str:
    if not times_ns:
        return "—"
    us = sorted(t / 1000 for t in times_ns)
    return (f"mean {statistics.fmean(us):.1f} µs, p50 {us[len(us) // 2]:.1f} µs, "
            f"p99 {us[min(len(us) - 1, int(len(us) * 0.99))]:.1f} µs")


def table(results: list[Result], *, fill: bool) -> list[str]:
    """One run per policy."""
    head = ("| policy | first failure (arrival #, size) | GPUs allocated at first failure "
            "| requests placed | GPUs placed | mean allocation | "
            + ("final allocation | " if fill else "") + "decision time (engine) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        ff = "none" if r.first_fail is None else f"#{r.first_fail:,} ({r.first_fail_gpus} GPU)"
        lines.append(
            f"| {r.policy} | {ff} | {_pct(r.alloc_at_first_fail)} "
            f"| {r.placed:,}/{r.requests:,} ({_pct(r.placed / r.requests)}) "
            f"| {_pct(r.gpus_placed / r.gpus_requested)} | {_pct(r.mean_alloc)} | "
            + (f"{_pct(r.final_alloc)} | " if fill else "") + f"{_times(r.times_ns)} |")
    return lines


def table_runs(runs: dict[str, list[Result]], *, fill: bool) -> list[str]:
    """Several runs per policy: means over the runs (min–max of the first-failure share)."""
    head = ("| policy | runs with a failure | GPUs allocated at first failure, mean (min–max) "
            "| requests placed | GPUs placed | mean allocation | "
            + ("final allocation | " if fill else "") + "decision time (engine) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, rs in runs.items():
        ff = [r.alloc_at_first_fail for r in rs if r.alloc_at_first_fail is not None]
        ffs = (f"{_pct(statistics.fmean(ff))} ({_pct(min(ff))}–{_pct(max(ff))})" if ff else "—")
        mean = statistics.fmean
        lines.append(
            f"| {name} | {len(ff)}/{len(rs)} | {ffs} "
            f"| {_pct(mean(r.placed / r.requests for r in rs))} "
            f"| {_pct(mean(r.gpus_placed / r.gpus_requested for r in rs))} "
            f"| {_pct(mean(r.mean_alloc for r in rs))} | "
            + (f"{_pct(mean(r.final_alloc for r in rs))} | " if fill else "")
            + f"{_times([t for r in rs for t in r.times_ns])} |")
    return lines


def pairwise(runs: dict[str, list[Result]], a: str = "engine", b: str = "best-fit") -> str | None:
    """How often ``a``'s first failure comes at a higher / equal / lower allocation than
    ``b``'s (a run without a failure counts as 100%)."""
    if a not in runs or b not in runs:
        return None
    def share(r: Result) -> float:
        return 1.0 if r.alloc_at_first_fail is None else r.alloc_at_first_fail
    pairs = [(share(x), share(y)) for x, y in zip(runs[a], runs[b], strict=True)]
    hi = sum(1 for x, y in pairs if x > y + 1e-12)
    lo = sum(1 for x, y in pairs if x < y - 1e-12)
    return (f"{a} vs {b}, first-failure share per run: higher in {hi}, equal in "
            f"{len(pairs) - hi - lo}, lower in {lo} of {len(pairs)}")


def _models_line(nodes: list[Node]) -> str:
    by: dict[str, list[int]] = {}
    for n in nodes:
        by.setdefault(n.code, []).append(n.gpus)
    price = {n.code: n.state.on_demand.normalize() for n in nodes}
    return ", ".join(f"{c} {len(g)} nodes/{sum(g)} GPUs @{price[c]}"
                     for c, g in sorted(by.items(), key=lambda kv: -sum(kv[1])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=7,
                    help="first seed (random-fit, task draws, node samples)")
    ap.add_argument("--runs", type=int, default=20,
                    help="seeded runs of the sampled and shrunk scenarios")
    ap.add_argument("--shrink", type=float, default=0.01,
                    help="fraction of nodes kept in the shrunk scenario (0: skip it)")
    ap.add_argument("--policies", default="engine,best-fit,first-fit,random-fit")
    ap.add_argument("--write", action="store_true", help="append the results to docs/benchmarks-log.md")
    args = ap.parse_args(argv)
    which = [p.strip() for p in args.policies.split(",") if p.strip()]
    t_start = time.perf_counter()

    nodes = load_nodes()
    tasks, stats = load_tasks()
    gpus = sum(n.gpus for n in nodes)
    demand = sum(t.gpus for t in tasks)
    peak = peak_demand(tasks)
    seeds = [args.seed + k for k in range(max(1, args.runs))]
    lines = [
        f"machine: {platform.machine()}, CPython {platform.python_version()}; seeds "
        f"{seeds[0]}..{seeds[-1]}",
        f"cluster: {len(nodes):,} nodes, {gpus:,} GPUs, one pool per node in {REGION}; "
        f"{_models_line(nodes)} (USD per GPU-hour, importer defaults)",
        "undisclosed codes: kept as their own models in the replay; for the engine only "
        + ", ".join(f"{c} -> {m}" for c, m in ASSUME.items())
        + " (distinct catalogue models no other node uses; this sets their price)",
        f"requests: {len(tasks):,} tasks with GPUs of {stats['rows']:,} rows "
        f"({stats['no_gpu']:,} without GPUs skipped; {stats['fractional']:,} fractional "
        f"gpu_milli tasks take a whole GPU); sizes "
        + ", ".join(f"{n} GPU × {c:,}" for n, c in sorted(
            {n: sum(1 for t in tasks if t.gpus == n) for n in {t.gpus for t in tasks}}.items()))
        + f"; {demand:,} GPUs requested in total; gang (one node); "
        f"{sum(1 for t in tasks if t.codes):,} with a gpu_spec; peak concurrent demand "
        f"{peak:,} GPUs",
        "metrics: first failure = share of GPUs allocated just before the first request "
        "that cannot be placed (higher is better); mean allocation = mean over arrivals of "
        "allocated/total after the decision; unplaced requests are dropped, not queued",
    ]

    def section(key: str, title: str) -> None:
        lines.extend(["", f"**{key}**: {title}", ""])

    # 1. the trace as recorded, and 2. its arrivals without departures (one run each)
    for key, title, deps in (
            ("trace", "the whole trace with departures, whole cluster", True),
            ("fill", "fill until the first failure (FGD protocol): the trace's arrivals in "
                     "order without departures, whole cluster, continued past the first "
                     "failure", False)):
        section(key, title)
        lines.extend(table([replay(p, tasks, departures=deps)
                            for p in make_policies(nodes, seeds[0], which)], fill=not deps))

    # 3. fill with tasks drawn from the trace (several seeds)
    section("fill-sampled", f"fill with tasks drawn at random (with replacement) from the "
                            f"trace's {len(tasks):,} tasks until {OVERFILL:g} × the cluster's "
                            f"{gpus:,} GPUs are requested, no departures, whole cluster; "
                            f"{len(seeds)} seeds")
    runs: dict[str, list[Result]] = {w: [] for w in which}
    for s in seeds:
        drawn = sample_tasks(tasks, round(gpus * OVERFILL), s)
        for p in make_policies(nodes, s, which):
            runs[p.name].append(replay(p, drawn, departures=False))
    lines.extend(table_runs(runs, fill=True))
    if (pw := pairwise(runs)):
        lines.extend(["", pw])

    # 4. the trace on a shrunk cluster (several node samples)
    if 0 < args.shrink < 1:
        samples = [shrink(nodes, args.shrink, s) for s in seeds]
        sizes = [sum(n.gpus for n in ns) for ns in samples]
        section("shrunk", f"the whole trace with departures on a seeded random {args.shrink:g} "
                          f"of the nodes ({len(samples[0])} nodes, {min(sizes)}–{max(sizes)} "
                          f"GPUs; peak demand {peak}); {len(seeds)} node samples")
        runs = {w: [] for w in which}
        for s, ns in zip(seeds, samples, strict=True):
            for p in make_policies(ns, s, which):
                runs[p.name].append(replay(p, tasks, departures=True))
        lines.extend(table_runs(runs, fill=False))
        if (pw := pairwise(runs)):
            lines.extend(["", pw])

    lines.extend(["", f"total run time {time.perf_counter() - t_start:.1f} s"])
    print("\n".join(lines))

    if args.write:
        given = argv if argv is not None else sys.argv[1:]
        out = append_section("trace replay", "python bench/trace_replay.py" + "".join(f" {a}" for a in given if a != "--write"),
                             "\n".join(lines) + "\n")
        print(f"appended to {out.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
