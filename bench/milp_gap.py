"""Placement quality against the optimum: the engine placing a batch one request at a
time versus an exact MILP (scipy.optimize.milp, HiGHS) placing the whole batch at once.

    python bench/milp_gap.py [--seeds 1,2,3,4,5] [--pools 200] [--slack 2.5]
                             [--time-limit 25] [--write]

Instances (seeded): at least ``--pools`` pools over 8 regions of the default topology
(US, EU, JP, SG and two Chinese hubs), 6 real models priced at the importer's default USD
prices times a per-region factor (0.85–1.25) and a per-pool factor (0.85–1.15), 4–32
units each, half of them partly leased. Requests are drawn until their demand reaches
free / ``--slack`` and there are at least 100 (pools are added if 100 requests need
more, so free ≥ slack × demand always holds): 1–32 units, gang (≤ 16 units) or split
(2–4 pools in 1–3 regions), for 1–72 hours; 35% restricted to 1–3 models, 20% to 2–4
regions (residency), 50% with 50–3,000 GB of data in some region (egress counts). Every
request fits on its own on the initial free capacity (checked with the engine).

Exact: a MILP over the whole batch. For a request ``r`` and an eligible pool ``p``:
gang ``y[r,p]`` binary (all units in ``p``); split ``x[r,p]`` integer units and
``y[r,p]`` binary "uses p" with ``x <= min(units, free)·y``, ``sum_p y <= max_pools``,
``z[r,g]`` binary "uses region g" with ``sum_{p in g} x[r,p] <= units·z[r,g]`` and
``sum_g z <= max_regions``. Every request is served in full or not at all (``s[r]``
binary, penalised by ~10× its most expensive placement, so only if nothing else fits);
free units per pool are shared. Cost = unit price × units × hours + data_gb ×
egress(data_region → region) once per region used: the engine's cost model (checked:
the engine's own ``total_cost`` equals this bench's cost of its placements). HiGHS
starts from the broker's best plan when that serves every request
(``read_solution_file``), runs without its feasibility jump and presolve
(``HIGHS_OPTIONS``), and stops at ``--time-limit``: the "optimum" is then the best
solution known (HiGHS's, or the broker's if better), within the reported MIP gap of the
true one.

Broker: one ``Engine`` over the same pools; requests placed one at a time (option 1,
objective cost), free units updated after each, in three fixed orders: as generated,
largest first, and most constrained first (least eligible free capacity per unit asked).
A request it cannot place pays the same penalty.

Report per seed: the optimum, HiGHS's dual bound, time and whether it hit the cap; per
order the broker's total (Decimal, recomputed from the placements), unserved requests,
the gap ``(broker − optimum) / optimum`` (target ≤ 3%), the gap against the dual bound
(an upper bound on the true gap), and the served-only gap (the broker's cost of the
requests it served vs the optimum's cost of the same requests). "Alone" separates the
engine's own choices from order effects: every request by itself on the initial
capacity, engine vs the optimum for that request.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import append_section  # noqa: E402
from services.broker.matching import Ask, Engine, Placement, PoolState, place_batch  # noqa: E402
from services.common.messages import Topology  # noqa: E402
from services.registry.domain.catalogue import load_catalogue  # noqa: E402
from services.registry.domain.importers import default_price  # noqa: E402
from services.registry.domain.topology import default_topology  # noqa: E402

REGIONS = ("us-east", "us-west", "eu-central", "eu-west", "ap-northeast", "ap-southeast",
           "cn-yrd", "cn-gba")
MODELS = ("nvidia-h100-sxm-80gb", "nvidia-a100-sxm-80gb", "nvidia-a100-sxm-40gb",
          "nvidia-l40s", "nvidia-l4", "nvidia-a10g")
CAPACITIES = (4, 8, 8, 16, 16, 32)
SIZES = (1, 2, 4, 8, 8, 16, 16, 24, 32)
HOURS = (1, 2, 8, 24, 72)
DATA_GB = (50, 200, 1000, 3000)
SLACK = 2.5  # free capacity / demand (>= 1.5); --slack 1.5 is harder for HiGHS
GANG_SHARE = 0.6  # of requests of <= 16 units
MODELS_SHARE = 0.35  # requests restricted to 1-3 models
# HiGHS options beyond scipy's list (passed through): on these instances the feasibility
# jump's first incumbent (most requests unserved) and presolve slow HiGHS's sub-MIP
# heuristics down; without them it mostly finds solutions within ~1-3% of its bound in
# 25 s (if it finds none at all, the jump is switched back on for a short second try)
JUMP = "mip_heuristic_run_feasibility_jump"
HIGHS_OPTIONS = {JUMP: False, "presolve": False}
CENT = Decimal("0.01")
ZERO = Decimal(0)


# --- instances ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    idx: int
    ask: Ask

    @property
    def units(self) -> int:
        return self.ask.units or 0


@dataclass
class Instance:
    seed: int
    topology: Topology
    pools: list[PoolState]
    requests: list[Request]
    egress: dict[tuple[str, str], Decimal]  # (data region, pool region) -> USD per GB

    @property
    def free(self) -> int:
        return sum(p.free for p in self.pools)

    @property
    def demand(self) -> int:
        return sum(r.units for r in self.requests)


def pool_state(pool_id: str, model: str, region: str, country: str, price: Decimal,
               capacity: int, free: int) -> PoolState:
    acc = load_catalogue()[model]
    return PoolState(
        pool_id=pool_id, provider="prov", region=region, country=country, model=model,
        vendor=acc.vendor, stack=acc.stack, frameworks=acc.frameworks,
        memory_gib=acc.memory_gib, interconnect=acc.interconnect, bf16_tflops=acc.bf16_tflops,
        fp16_tflops=acc.fp16_tflops, fp8_tflops=acc.fp8_tflops, capacity=capacity, free=free,
        on_demand=price)


def egress_table(topology: Topology) -> dict[tuple[str, str], Decimal]:
    return {(ln.src, ln.dst): ln.egress_per_gb for ln in topology.links}


def make_instance(seed: int, n_pools: int = 200, topology: Topology | None = None,
                  min_requests: int = 100, slack: float = SLACK) -> Instance:
    rng = random.Random(seed)
    topology = topology or default_topology()
    country = {r.id: r.country for r in topology.regions}
    catalogue = load_catalogue()
    base = {m: default_price(catalogue[m]) for m in MODELS}
    region_factor = {r: rng.uniform(0.85, 1.25) for r in REGIONS}
    pools = []

    def new_pool(i: int) -> PoolState:
        model, region = rng.choice(MODELS), rng.choice(REGIONS)
        price = (base[model] * Decimal(repr(region_factor[region] * rng.uniform(0.85, 1.15)))
                 ).quantize(CENT)
        capacity = rng.choice(CAPACITIES)
        free = capacity if rng.random() < 0.5 else rng.randint(capacity // 2, capacity)
        return pool_state(f"p{i:04d}", model, region, country[region], price, capacity, free)

    for i in range(n_pools):
        pools.append(new_pool(i))
    engine = Engine(topology)
    for p in pools:
        engine.upsert(p)
    total_free = sum(p.free for p in pools)
    requests: list[Request] = []
    demand = 0
    while demand < total_free / slack or len(requests) < min_requests:
        units = rng.choice(SIZES)
        gang = units <= 16 and rng.random() < GANG_SHARE
        fields: dict = {"units": units, "gang": gang, "hours": Decimal(rng.choice(HOURS))}
        if not gang:
            fields["max_pools"] = rng.choice((2, 3, 4))
            fields["max_regions"] = rng.choice((1, 1, 2, 3))
        if rng.random() < MODELS_SHARE:
            fields["models"] = frozenset(rng.sample(MODELS, rng.randint(1, 3)))
        if rng.random() < 0.2:
            fields["regions"] = frozenset(rng.sample(REGIONS, rng.randint(2, 4)))
        if rng.random() < 0.5:
            fields["data_region"] = rng.choice(REGIONS)
            fields["data_gb"] = float(rng.choice(DATA_GB))
        ask = Ask(**fields)
        if not engine.match(ask, limit=1).placed:  # cannot fit even alone: draw again
            continue
        requests.append(Request(len(requests), ask))
        demand += units
    while sum(p.free for p in pools) < slack * demand:  # min_requests asked for more: add pools
        pools.append(new_pool(len(pools)))
    return Instance(seed, topology, pools, requests, egress_table(topology))


# --- cost model (the engine's) ---------------------------------------------------------------
def eligible(req: Request, pool: PoolState) -> bool:
    a = req.ask
    return ((not a.models or pool.model in a.models)
            and (not a.regions or pool.region in a.regions)
            and (not a.countries or pool.country in a.countries)
            and pool.currency == a.currency and pool.free >= (req.units if a.gang else 1))


def transfer(inst: Instance, req: Request, region: str) -> Decimal:
    a = req.ask
    if not a.data_region or a.data_gb <= 0:
        return ZERO
    return Decimal(repr(float(a.data_gb))) * inst.egress[(a.data_region, region)]


def placement_cost(inst: Instance, req: Request, units_by_pool: dict[str, int]) -> Decimal:
    """Cost of serving ``req`` with ``units_by_pool`` (pool id -> units)."""
    pools = {p.pool_id: p for p in inst.pools}
    compute = sum((pools[pid].on_demand * u * req.ask.hours for pid, u in units_by_pool.items()
                   if u > 0), ZERO)
    regions = {pools[pid].region for pid, u in units_by_pool.items() if u > 0}
    return compute + sum((transfer(inst, req, g) for g in regions), ZERO)


def penalty(inst: Instance, req: Request) -> Decimal:
    """What leaving ``req`` unserved costs: ~10× its most expensive possible placement."""
    top = max(p.on_demand for p in inst.pools)
    worst_transfer = max((transfer(inst, req, g) for g in REGIONS), default=ZERO)
    return (10 * (top * req.units * req.ask.hours + worst_transfer * len(REGIONS))
            + 1000).quantize(CENT)


def check_plan(inst: Instance, plan: dict[int, dict[str, int]]) -> None:
    """A plan (request -> pool -> units) respects every constraint (raises otherwise)."""
    pools = {p.pool_id: p for p in inst.pools}
    used = dict.fromkeys(pools, 0)
    for req in inst.requests:
        alloc = {pid: u for pid, u in plan.get(req.idx, {}).items() if u > 0}
        if not alloc:
            continue
        a = req.ask
        assert sum(alloc.values()) == req.units, (req.idx, alloc)
        for pid in alloc:
            p = pools[pid]
            assert (not a.models or p.model in a.models) and \
                (not a.regions or p.region in a.regions), (req.idx, pid)
            used[pid] += alloc[pid]
        if a.gang:
            assert len(alloc) == 1, (req.idx, alloc)
        else:
            assert len(alloc) <= max(1, a.max_pools), (req.idx, alloc)
            assert len({pools[pid].region for pid in alloc}) <= max(1, a.max_regions), (req.idx, alloc)
    for pid, u in used.items():
        assert u <= pools[pid].free, f"pool {pid} overbooked: {u} > {pools[pid].free}"


def plan_cost(inst: Instance, plan: dict[int, dict[str, int]]) -> tuple[Decimal, int]:
    """(total cost with penalties for unserved requests, unserved count)."""
    total = ZERO
    unserved = 0
    for req in inst.requests:
        alloc = plan.get(req.idx)
        if alloc and sum(alloc.values()):
            total += placement_cost(inst, req, alloc)
        else:
            total += penalty(inst, req)
            unserved += 1
    return total, unserved


# --- exact: MILP ---------------------------------------------------------------------------
@dataclass
class Model:
    """The MILP in scipy's form, and where each request's variables are."""

    c: np.ndarray
    A: object  # scipy.sparse CSR
    lo: np.ndarray
    hi: np.ndarray
    ub: np.ndarray
    s: dict[int, int] = field(default_factory=dict)  # request -> unserved
    y: dict[tuple[int, str], int] = field(default_factory=dict)  # (request, pool) -> uses pool
    x: dict[tuple[int, str], int] = field(default_factory=dict)  # (request, pool) -> units (split)
    z: dict[tuple[int, str], int] = field(default_factory=dict)  # (request, region) -> uses region

    @property
    def n(self) -> int:
        return len(self.c)

    def vector(self, inst: Instance, plan: dict[int, dict[str, int]]) -> np.ndarray:
        """A plan as a point of the model (used as a start solution)."""
        region = {p.pool_id: p.region for p in inst.pools}
        v = np.zeros(self.n)
        for req in inst.requests:
            alloc = {pid: u for pid, u in plan.get(req.idx, {}).items() if u > 0}
            if not alloc:
                v[self.s[req.idx]] = 1
                continue
            for pid, u in alloc.items():
                v[self.y[(req.idx, pid)]] = 1
                if not req.ask.gang:
                    v[self.x[(req.idx, pid)]] = u
                    v[self.z[(req.idx, region[pid])]] = 1
        return v


def build_model(inst: Instance) -> Model:
    """For a request ``r`` and an eligible pool ``p``: gang ``y[r,p]`` binary (all units in
    ``p``); split ``x[r,p]`` integer units, ``y[r,p]`` binary with ``x <= min(units,
    free)·y``, ``sum_p y <= max_pools``, ``z[r,g]`` binary with ``sum_{p in g} x[r,p] <=
    units·z[r,g]`` and ``sum_g z <= max_regions``; ``s[r]`` binary: not served (penalty).
    Free units per pool are shared. Cost: price × units × hours, plus transfer on ``y``
    (gang) or ``z`` (split)."""
    pools = inst.pools
    cost: list[float] = []
    ub: list[float] = []
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lo: list[float] = []
    hi: list[float] = []
    m = Model(c=np.zeros(0), A=None, lo=np.zeros(0), hi=np.zeros(0), ub=np.zeros(0))

    def var(c: float, upper: float) -> int:
        cost.append(c)
        ub.append(upper)
        return len(cost) - 1

    def row(entries: list[tuple[int, float]], lb: float, ubound: float) -> None:
        r = len(lo)
        for j, v in entries:
            rows.append(r)
            cols.append(j)
            vals.append(v)
        lo.append(lb)
        hi.append(ubound)

    load: list[list[tuple[int, float]]] = [[] for _ in pools]  # pool -> (var, units per unit)
    for req in inst.requests:
        a, u, i = req.ask, req.units, req.idx
        h = float(a.hours)
        m.s[i] = s = var(float(penalty(inst, req)), 1)
        elig = [(k, p) for k, p in enumerate(pools) if eligible(req, p)]
        if a.gang:
            ys = []
            for k, p in elig:
                m.y[(i, p.pool_id)] = y = var(
                    float(p.on_demand) * u * h + float(transfer(inst, req, p.region)), 1)
                ys.append((y, 1.0))
                load[k].append((y, float(u)))
            row(ys + [(s, 1.0)], 1, 1)
            continue
        for g in sorted({p.region for _, p in elig}):
            m.z[(i, g)] = var(float(transfer(inst, req, g)), 1)
        xs, ys = [], []
        by_region: dict[str, list[tuple[int, float]]] = {}
        for k, p in elig:
            cap = min(u, p.free)
            m.x[(i, p.pool_id)] = x = var(float(p.on_demand) * h, cap)
            m.y[(i, p.pool_id)] = y = var(0.0, 1)
            xs.append((x, 1.0))
            ys.append((y, 1.0))
            load[k].append((x, 1.0))
            row([(x, 1.0), (y, -float(cap))], -np.inf, 0)  # x <= cap·y
            by_region.setdefault(p.region, []).append((x, 1.0))
        for g, xg in by_region.items():  # sum of x in g <= units·z[g]
            row(xg + [(m.z[(i, g)], -float(u))], -np.inf, 0)
        row(xs + [(s, float(u))], u, u)  # served in full, or not at all
        row(ys, 0, max(1, a.max_pools))
        row([(m.z[(i, g)], 1.0) for g in {p.region for _, p in elig}], 0, max(1, a.max_regions))
    for k, p in enumerate(pools):
        if load[k]:
            row(load[k], 0, p.free)
    m.c, m.ub = np.array(cost), np.array(ub)
    m.lo, m.hi = np.array(lo), np.array(hi)
    m.A = coo_matrix((vals, (rows, cols)), shape=(len(lo), len(cost))).tocsr()
    return m


class NoSolution(RuntimeError):
    """HiGHS stopped without any solution."""


@dataclass
class Exact:
    plan: dict[int, dict[str, int]]
    objective: float  # HiGHS's incumbent (float)
    dual_bound: float  # HiGHS's lower bound on the optimum
    mip_gap: float  # HiGHS's relative gap between the two
    status: int  # scipy: 0 optimal, 1 time/iteration limit
    message: str
    seconds: float
    n_vars: int = 0
    n_rows: int = 0

    @property
    def capped(self) -> bool:
        return self.status == 1


def _write_start(path: Path, v: np.ndarray) -> None:
    """A start solution in HiGHS's solution-file format (``read_solution_file``)."""
    with path.open("w") as f:
        f.write("Model status\nNone\n\n# Primal solution values\nFeasible\n")
        f.write(f"Objective {0.0}\n# Columns {len(v)}\n")
        f.writelines(f"c{j} {int(round(x))}\n" for j, x in enumerate(v))
        f.write("# Rows 0\n")


def solve_exact(inst: Instance, time_limit: float = 25.0, mip_rel_gap: float = 1e-4, *,
                start: dict[int, dict[str, int]] | None = None, disp: bool = False,
                highs: dict | None = None) -> Exact:
    """Solve the batch MILP with HiGHS; ``start`` (a feasible plan, e.g. the broker's) is
    handed to HiGHS as its first incumbent."""
    m = build_model(inst)
    options: dict = {"time_limit": time_limit, "mip_rel_gap": mip_rel_gap, "disp": disp,
                     **(HIGHS_OPTIONS if highs is None else highs)}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # HiGHS options scipy does not list: it passes them on verbatim, with a warning
        warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
        if start is not None:
            path = Path(tmp) / "start.sol"
            _write_start(path, m.vector(inst, start))
            options["read_solution_file"] = str(path)
        t0 = time.perf_counter()
        res = milp(m.c, constraints=LinearConstraint(m.A, m.lo, m.hi),
                   integrality=np.ones(m.n), bounds=Bounds(np.zeros(m.n), m.ub), options=options)
        seconds = time.perf_counter() - t0
    if res.x is None:
        raise NoSolution(f"seed {inst.seed}: HiGHS found no solution: {res.message}")
    x = np.round(res.x).astype(int)
    plan: dict[int, dict[str, int]] = {}
    for (r, pid), j in m.y.items():
        req = inst.requests[r]
        units = (req.units * x[j]) if req.ask.gang else x[m.x[(r, pid)]]
        if units > 0:
            plan.setdefault(r, {})[pid] = int(units)
    return Exact(plan=plan, objective=float(res.fun), status=int(res.status),
                 dual_bound=float(getattr(res, "mip_dual_bound", res.fun) or res.fun),
                 mip_gap=float(getattr(res, "mip_gap", 0.0) or 0.0), message=str(res.message),
                 seconds=seconds, n_vars=m.n, n_rows=len(m.lo))


# --- broker: the engine, one request at a time ---------------------------------------------
@dataclass
class Greedy:
    plan: dict[int, dict[str, int]] = field(default_factory=dict)
    engine_total: Decimal = ZERO  # sum of the placements' own total_cost
    seconds: float = 0.0
    decisions: int = 0


def run_engine(inst: Instance, order: list[Request]) -> Greedy:
    engine = Engine(inst.topology)
    for p in inst.pools:
        engine.upsert(p)
    free = {p.pool_id: p.free for p in inst.pools}
    out = Greedy()
    for req in order:
        t0 = time.perf_counter()
        decision = engine.match(req.ask, limit=1)
        out.seconds += time.perf_counter() - t0
        out.decisions += 1
        if not decision.options:
            continue
        best: Placement = decision.options[0]
        out.engine_total += best.total_cost
        alloc: dict[str, int] = {}
        for al in best.allocations:
            assert free[al.pool_id] >= al.units, f"engine overbooked {al.pool_id}"
            free[al.pool_id] -= al.units
            alloc[al.pool_id] = alloc.get(al.pool_id, 0) + al.units
            engine.set_free(al.pool_id, free[al.pool_id])
        out.plan[req.idx] = alloc
    return out


def run_batch(inst: Instance, time_budget_s: float) -> Greedy:
    """The engine's batch mode (``place_batch``: regret order, then local moves and swaps)
    on the requests as generated, unserved requests at the bench's own penalty."""
    engine = Engine(inst.topology)
    for p in inst.pools:
        engine.upsert(p)
    out = Greedy()
    t0 = time.perf_counter()
    result = place_batch(engine, [r.ask for r in inst.requests], time_budget_s=time_budget_s,
                         unserved_cost=max(penalty(inst, r) for r in inst.requests))
    out.seconds = time.perf_counter() - t0
    out.decisions = len(inst.requests)  # per request of the batch, not per engine.match
    for req, placement in zip(inst.requests, result.placements, strict=True):
        if placement is None:
            continue
        out.engine_total += placement.total_cost
        alloc: dict[str, int] = {}
        for al in placement.allocations:
            alloc[al.pool_id] = alloc.get(al.pool_id, 0) + al.units
        out.plan[req.idx] = alloc
    return out


BATCH = "batch (place_batch)"


def _scarcity(inst: Instance):
    """Most constrained first: free units of a request's eligible pools per unit asked."""
    free = {r.idx: sum(p.free for p in inst.pools if eligible(r, p)) for r in inst.requests}
    return lambda r: (free[r.idx] / r.units, r.idx)


ORDERS = {
    "as generated": lambda inst: list(inst.requests),
    "largest first": lambda inst: sorted(inst.requests, key=lambda r: (-r.units, r.idx)),
    "most constrained first": lambda inst: sorted(inst.requests, key=_scarcity(inst)),
}


# --- report ---------------------------------------------------------------------------------
@dataclass
class Order:
    cost: Decimal  # with penalties
    unserved: int
    served_cost: Decimal  # the requests it served
    opt_same: Decimal  # the optimum's cost of those same requests
    per_request_s: float
    plan: dict[int, dict[str, int]]


@dataclass
class Isolated:
    """Each request alone on the initial free capacity: the engine's own choice versus
    the optimum for that one request (no contention, so no order effects)."""

    engine: Decimal = ZERO
    exact: Decimal = ZERO
    worse: int = 0  # requests where the engine's choice costs more
    worst: float = 0.0  # largest relative excess of one request
    worst_req: Request | None = None
    seconds: float = 0.0

    @property
    def gap(self) -> float:
        return float((self.engine - self.exact) / self.exact)


def isolated(inst: Instance, time_limit: float = 10.0) -> Isolated:
    out = Isolated()
    t0 = time.perf_counter()
    for req in inst.requests:
        one = Instance(inst.seed, inst.topology, inst.pools, [Request(0, req.ask)], inst.egress)
        g = run_engine(one, one.requests)
        ex = solve_exact(one, time_limit, start=g.plan)
        ce = placement_cost(one, one.requests[0], g.plan[0])
        co, unserved = plan_cost(one, ex.plan)
        assert not unserved and co <= ce, (req, ce, co)
        out.engine += ce
        out.exact += co
        if ce > co:
            out.worse += 1
            if float(ce / co - 1) > out.worst:
                out.worst, out.worst_req = float(ce / co - 1), req
    out.seconds = time.perf_counter() - t0
    return out


@dataclass
class SeedResult:
    seed: int
    inst: Instance
    exact: Exact
    opt: Decimal  # best known solution (HiGHS's incumbent; never worse than the start)
    opt_unserved: int
    broker: dict[str, Order]
    alone: Isolated

    def gap(self, order: str) -> float:
        return float((self.broker[order].cost - self.opt) / self.opt)

    def gap_bound(self, order: str) -> float:
        return float(self.broker[order].cost) / min(self.exact.dual_bound, float(self.opt)) - 1

    def gap_served(self, order: str) -> float:
        o = self.broker[order]
        return float((o.served_cost - o.opt_same) / o.opt_same) if o.opt_same else 0.0


def run_seed(seed: int, n_pools: int, time_limit: float, slack: float = SLACK,
             batch_budget_s: float = 60.0) -> SeedResult:
    inst = make_instance(seed, n_pools, slack=slack)
    broker: dict[str, Order] = {}
    runs = {name: (lambda order=order: run_engine(inst, order(inst))) for name, order in ORDERS.items()}
    runs[BATCH] = lambda: run_batch(inst, batch_budget_s)
    for name, run in runs.items():
        g = run()
        check_plan(inst, g.plan)
        cost, unserved = plan_cost(inst, g.plan)
        served = [r for r in inst.requests if r.idx in g.plan]
        mine = sum((placement_cost(inst, r, g.plan[r.idx]) for r in served), ZERO)
        assert mine == g.engine_total, f"cost model mismatch: {mine} != {g.engine_total}"
        broker[name] = Order(cost, unserved, mine, ZERO, g.seconds / max(1, g.decisions), g.plan)
    # HiGHS starts from the broker's best plan if that serves every request (a start with
    # unserved requests stalls its heuristics on these instances); the optimum reported is
    # the best solution known, never worse than the broker's
    best = min(broker.values(), key=lambda o: o.cost)
    try:
        exact = solve_exact(inst, time_limit, start=best.plan if not best.unserved else None)
    except NoSolution:  # nothing found in time: retry with the feasibility jump on
        exact = solve_exact(inst, time_limit / 5, highs={**HIGHS_OPTIONS, JUMP: True})
        exact.seconds += time_limit
    check_plan(inst, exact.plan)
    opt, opt_unserved = plan_cost(inst, exact.plan)
    if best.cost < opt:
        exact.plan, opt, opt_unserved = best.plan, best.cost, best.unserved
        exact.mip_gap = max(0.0, 1 - exact.dual_bound / float(opt))
    for o in broker.values():
        o.opt_same = sum((placement_cost(inst, r, exact.plan[r.idx]) for r in inst.requests
                          if r.idx in o.plan and r.idx in exact.plan), ZERO)
    return SeedResult(seed, inst, exact, opt, opt_unserved, broker, isolated(inst))


def _money(d: Decimal | float) -> str:
    return f"{float(d):,.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def _describe(req: Request) -> str:
    a = req.ask
    shape = "gang" if a.gang else f"split ≤{a.max_pools} pools/≤{a.max_regions} regions"
    return f"{req.units} units {shape}, {a.hours} h" + (
        f", {a.data_gb:g} GB in {a.data_region}" if a.data_region else "")


def report(results: list[SeedResult], args: argparse.Namespace) -> list[str]:
    orders = [*ORDERS, BATCH]
    lines = [
        f"machine: {platform.machine()}, CPython {platform.python_version()}, scipy HiGHS "
        f"(cap {args.time_limit:g} s per instance, mip_rel_gap 1e-4, started from the "
        f"broker's best plan when it serves all, options {HIGHS_OPTIONS})",
        f"instances: ≥ {args.pools} pools over {len(REGIONS)} regions ({', '.join(REGIONS)}); "
        f"models {', '.join(m.removeprefix('nvidia-') for m in MODELS)} at the importer's "
        f"default prices × region (0.85–1.25) × pool (0.85–1.15) factors; requests of "
        f"{min(SIZES)}–{max(SIZES)} units for {min(HOURS)}–{max(HOURS)} h, drawn until "
        f"demand ≥ free / {args.slack:g} (≥ 100); {MODELS_SHARE:.0%} restricted to 1–3 "
        f"models, 20% to 2–4 regions, 50% with 50–3,000 GB of data; each fits alone",
        "optimum = HiGHS's best solution over the whole batch (proven within its MIP gap); "
        "gap = (broker − optimum) / optimum, unserved requests at a penalty of ~10× their "
        "most expensive placement; vs bound = broker / HiGHS dual bound − 1 (an upper bound "
        "on the true gap); served-only = the broker's cost of the requests it served vs the "
        "optimum's cost of the same requests; alone = every request by itself on the "
        "initial capacity, engine vs optimum (the engine's own choices, no order effects)",
        "",
        "| seed | pools | requests (gang/split, data, models, regions) | free / demand "
        "| MILP vars | HiGHS | optimum | dual bound | alone: engine vs optimum |",
    ]
    lines.append("|" + "---|" * (lines[-1].count("|") - 1))
    for r in results:
        reqs = r.inst.requests
        n_gang = sum(1 for q in reqs if q.ask.gang)
        desc = (f"{len(reqs)} ({n_gang}/{len(reqs) - n_gang}, "
                f"{sum(1 for q in reqs if q.ask.data_region)}, "
                f"{sum(1 for q in reqs if q.ask.models)}, {sum(1 for q in reqs if q.ask.regions)})")
        status = (f"{r.exact.seconds:.1f} s, " + ("hit the cap" if r.exact.capped else "optimal")
                  + f", MIP gap {100 * r.exact.mip_gap:.2f}%")
        opt = _money(r.opt) + (f" ({r.opt_unserved} unserved)" if r.opt_unserved else "")
        a = r.alone
        alone = (f"{_pct(a.gap)} ({a.worse} of {len(reqs)} requests dearer, worst "
                 f"{_pct(a.worst)}" + (f": {_describe(a.worst_req)}" if a.worst_req else "") + ")")
        lines.append(f"| {r.seed} | {len(r.inst.pools)} | {desc} | {r.inst.free:,} / "
                     f"{r.inst.demand:,} | {r.exact.n_vars:,} | {status} | {opt} "
                     f"| {_money(r.exact.dual_bound)} | {alone} |")
    lines += ["", "| seed | broker order | cost | unserved | gap | vs bound | served-only "
                  "| engine per request |"]
    lines.append("|" + "---|" * (lines[-1].count("|") - 1))
    for r in results:
        for o in orders:
            b = r.broker[o]
            lines.append(f"| {r.seed} | {o} | {_money(b.cost)} | {b.unserved} | {_pct(r.gap(o))} "
                         f"| {_pct(r.gap_bound(o))} | {_pct(r.gap_served(o))} "
                         f"| {b.per_request_s * 1e6:.0f} µs |")
    lines.append("")
    mean = statistics.fmean
    for o in orders:
        gaps = [r.gap(o) for r in results]
        bounds = [r.gap_bound(o) for r in results]
        served = [r.gap_served(o) for r in results]
        unserved = [r.broker[o].unserved for r in results]
        lines.append(f"- {o}: gap mean {_pct(mean(gaps))}, max {_pct(max(gaps))} (vs bound "
                     f"mean {_pct(mean(bounds))}, max {_pct(max(bounds))}); unserved "
                     f"{sum(unserved)} requests in {len(results)} seeds (max {max(unserved)}); "
                     f"served-only mean {_pct(mean(served))}, max {_pct(max(served))}; "
                     "target ≤ 3%")
    best = [min(r.gap(o) for o in ORDERS) for r in results]
    lines.append(f"- best of the {len(ORDERS)} one-at-a-time orders per seed: gap mean {_pct(mean(best))}, "
                 f"max {_pct(max(best))}; the batch mode's gap is the one that counts for the target")
    alone = [r.alone.gap for r in results]
    lines.append(f"- alone (engine vs optimum per request, no contention): mean {_pct(mean(alone))}, "
                 f"max {_pct(max(alone))}; worst single request {_pct(max(r.alone.worst for r in results))}")
    capped = sum(1 for r in results if r.exact.capped)
    lines.append(f"- HiGHS: {sum(r.exact.seconds for r in results):.1f} s on the batches, "
                 f"{capped} of {len(results)} hit the {args.time_limit:g} s cap (MIP gap then: max "
                 f"{100 * max(r.exact.mip_gap for r in results):.2f}%); per-request optima "
                 f"{sum(r.alone.seconds for r in results):.1f} s; optimum unserved: "
                 f"{sum(r.opt_unserved for r in results)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--pools", type=int, default=200)
    ap.add_argument("--slack", type=float, default=SLACK, help="free capacity / demand")
    ap.add_argument("--time-limit", type=float, default=25.0, help="HiGHS seconds per batch")
    ap.add_argument("--batch-budget", type=float, default=60.0,
                    help="time cap of the batch mode per batch (it normally stops earlier: fixed rounds)")
    ap.add_argument("--write", action="store_true", help="append the results to docs/benchmarks-log.md")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    t_start = time.perf_counter()
    results = []
    for s in seeds:
        results.append(run_seed(s, args.pools, args.time_limit, args.slack, args.batch_budget))
        print(f"seed {s} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    lines = report(results, args)
    lines.append(f"- total run time {time.perf_counter() - t_start:.1f} s")
    print("\n".join(lines))

    if args.write:
        given = argv if argv is not None else sys.argv[1:]
        out = append_section("MILP gap", "python bench/milp_gap.py" + "".join(f" {a}" for a in given if a != "--write"),
                             "\n".join(lines) + "\n")
        print(f"appended to {out.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
