"""Placing many requests at once: jointly cheaper than one at a time.

One at a time, the first request takes the cheapest pool that fits it even when a later
request needs that pool far more (it is the only one in its allowed regions, or it runs
for 72 hours rather than one). Placing a batch, the engine instead

1. orders by **regret**: each request's best cost and the cost of its best alternative
   that avoids the pools of the best; the request that would lose the most by waiting
   goes first (one that has no alternative at all, first of all). Only requests whose
   options touched the pools just taken are re-evaluated.
2. starts from the cheaper of that plan and the plan in the given order (so a batch is
   never dearer than placing the same requests one by one in order);
3. improves it: **move** a request alone to a cheaper placement until none is cheaper;
   then **ruin and recreate** — take out every request holding pools of one region, or
   of one model, or a random tenth (and every unserved one), put them back in regret
   order, keep the result only if the whole plan got cheaper — for a fixed number of
   rounds per request (so the same batch gets the same plan on any machine) or until
   the time budget is spent, moving requests again after each improvement.

Pure and synchronous like the engine: it changes the free units of the ``Engine`` it is
given exactly as placing the returned placements would (callers pass a copy, or reserve
what is returned). Costs are the engine's own ``total_cost``; a request left unserved
counts as ``unserved_cost`` (far above any placement), so serving more always wins.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from decimal import Decimal

import msgspec

from .engine import Engine
from .model import Allocation, Ask, Placement

INF = Decimal("Infinity")
ROUNDS_PER_REQUEST = 2  # ruin-and-recreate rounds per request of the batch (unless time runs out first)


class BatchResult(msgspec.Struct, kw_only=True):
    placements: list[Placement | None]  # per ask, in the order given
    cost: Decimal  # total_cost of what was placed
    unserved: int
    decisions: int  # engine.match calls made
    moves: int  # local improvements applied


class _Plan:
    """Placements by request index, applied to the engine's free units."""

    def __init__(self, engine: Engine, asks: Sequence[Ask]) -> None:
        self.engine, self.asks = engine, asks
        self.placed: dict[int, Placement] = {}
        self.holders: dict[str, set[int]] = {}  # pool id -> requests holding units there
        self.decisions = 0

    def best(self, i: int, exclude: frozenset[str] = frozenset()) -> Placement | None:
        self.decisions += 1
        ask = self.asks[i]
        if exclude:
            ask = msgspec.structs.replace(ask, exclude_pools=ask.exclude_pools | exclude)
        decision = self.engine.match(ask, limit=1)
        return decision.options[0] if decision.options else None

    def take(self, i: int, p: Placement) -> None:
        for a in p.allocations:
            assert _fits(self.engine, a), f"batch would overbook {a.pool_id}"
            self._move(a, -1)
            self.holders.setdefault(a.pool_id, set()).add(i)
        self.placed[i] = p

    def give_back(self, i: int) -> Placement:
        p = self.placed.pop(i)
        for a in p.allocations:
            self._move(a, +1)
            self.holders[a.pool_id].discard(i)
        return p

    def _move(self, a: Allocation, sign: int) -> None:
        """Take (-1) or give back (+1) an allocation: units, or a share's milli on its device."""
        if a.milli < 1000 and a.devices:
            d = a.devices[0]
            self.engine.set_devices(a.pool_id, {d: self.engine.device_free(a.pool_id, d) + sign * a.milli})
            return
        pool = self.engine.get(a.pool_id)
        assert pool is not None
        self.engine.set_free(a.pool_id, pool.free + sign * a.units)

    def cost(self, unserved_cost: Decimal) -> Decimal:
        return sum((p.total_cost for p in self.placed.values()), Decimal(0)) + \
            unserved_cost * (len(self.asks) - len(self.placed))


def _fits(engine: Engine, a: Allocation) -> bool:
    """Whether the allocation still fits: its units free, or its share on its device."""
    if a.milli < 1000 and a.devices:
        return engine.device_free(a.pool_id, a.devices[0]) >= a.milli
    return (pool := engine.get(a.pool_id)) is not None and pool.free >= a.units


def _pools(p: Placement) -> frozenset[str]:
    return frozenset(a.pool_id for a in p.allocations)


def _regret_order(plan: _Plan, todo: set[int]) -> None:
    """Place ``todo`` by descending regret (see the module docstring)."""
    best: dict[int, Placement | None] = {}
    regret: dict[int, Decimal] = {}

    def evaluate(i: int) -> None:
        b = plan.best(i)
        best[i] = b
        if b is None:
            regret[i] = -INF  # nothing fits now: last (it may fit after others move)
            return
        alt = plan.best(i, _pools(b))
        regret[i] = INF if alt is None else alt.total_cost - b.total_cost

    for i in todo:
        evaluate(i)
    while todo:
        i = max(todo, key=lambda k: (regret[k], -k))
        todo.discard(i)
        b = best[i]
        if b is None:
            continue
        if not all(_fits(plan.engine, a) for a in b.allocations):
            evaluate(i)  # stale: something placed since took its units
            todo.add(i)
            continue
        plan.take(i, b)
        touched = _pools(b)
        for k in list(todo):
            bk = best[k]
            if bk is not None and _pools(bk) & touched:
                evaluate(k)


def _improve(plan: _Plan, unserved_cost: Decimal, deadline: float) -> int:
    """Move requests, one at a time, to a cheaper placement until none is (or the deadline)."""
    moves = 0
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        order = sorted(range(len(plan.asks)), key=lambda k: -(plan.placed[k].total_cost if k in plan.placed
                                                              else unserved_cost))
        for i in order:
            if time.perf_counter() >= deadline:
                break
            current = plan.placed.get(i)
            now_cost = current.total_cost if current is not None else unserved_cost
            if current is not None:
                plan.give_back(i)
            alone = plan.best(i)
            if alone is not None and alone.total_cost < now_cost:
                plan.take(i, alone)
                moves += 1
                improved = True
            elif current is not None:
                plan.take(i, current)
    return moves


def _ruin_recreate(plan: _Plan, unserved_cost: Decimal, deadline: float, rng: random.Random,
                   idle_limit: int) -> tuple[int, int]:
    """Large-neighbourhood search: take out a related group of requests (those holding
    pools of one region, or of one model, or a random few) and put them back in regret
    order; keep the result only if the whole plan got cheaper. Stops at the deadline, at
    the first improvement, or after ``idle_limit`` fruitless rounds; returns
    (improvements, fruitless rounds)."""
    idle = 0
    n = len(plan.asks)
    while time.perf_counter() < deadline and idle < idle_limit:
        before = plan.cost(unserved_cost)
        old = dict(plan.placed)
        pools = [pid for pid, hs in plan.holders.items() if hs]
        if not pools:
            return 0, idle
        pick = plan.engine.get(rng.choice(pools))
        kind = rng.random()
        out: set[int] = set()
        for pid, hs in plan.holders.items():
            pool = plan.engine.get(pid)
            if pool is None or not hs:
                continue
            if (kind < 0.4 and pool.region == pick.region) or (0.4 <= kind < 0.8 and pool.model == pick.model):
                out |= hs
        if kind >= 0.8 or len(out) < 2:
            out |= set(rng.sample(sorted(plan.placed), min(len(plan.placed), max(2, n // 10))))
        out |= {i for i in range(n) if i not in plan.placed}  # the unserved always get another go
        if len(out) > max(4, n // 3):
            out = set(rng.sample(sorted(out), max(4, n // 3)))
        for i in out:
            if i in plan.placed:
                plan.give_back(i)
        _regret_order(plan, set(out))
        if plan.cost(unserved_cost) < before:
            return 1, idle
        idle += 1
        for i in list(plan.placed):  # revert
            if i in out:
                plan.give_back(i)
        for i in out:
            if i in old:
                plan.take(i, old[i])
    return 0, idle


def place_batch(engine: Engine, asks: Sequence[Ask], *, unserved_cost: Decimal | None = None,
                time_budget_s: float = 2.0) -> BatchResult:
    """Place ``asks`` jointly on ``engine`` (its free units change accordingly)."""
    deadline = time.perf_counter() + time_budget_s
    if unserved_cost is None:
        unserved_cost = Decimal(10) ** 12
    snapshot = engine.free_units()
    devices = engine.shared_devices()

    def restore() -> None:
        for pid, free in snapshot.items():
            engine.set_free(pid, free)
        for pid, state in devices.items():
            engine.set_devices(pid, state)

    in_order = _Plan(engine, asks)
    for i in range(len(asks)):
        b = in_order.best(i)
        if b is not None:
            in_order.take(i, b)
    in_order_placed, in_order_cost = dict(in_order.placed), in_order.cost(unserved_cost)
    restore()
    plan = _Plan(engine, asks)
    plan.decisions = in_order.decisions
    _regret_order(plan, set(range(len(asks))))
    if in_order_cost < plan.cost(unserved_cost):
        restore()
        decisions = plan.decisions
        plan = _Plan(engine, asks)
        plan.decisions = decisions
        for i, p in in_order_placed.items():
            plan.take(i, p)
    moves = _improve(plan, unserved_cost, deadline)
    rng = random.Random(len(asks))  # deterministic: the same batch gets the same plan
    rounds = ROUNDS_PER_REQUEST * len(asks)
    while time.perf_counter() < deadline and rounds > 0:
        found, fruitless = _ruin_recreate(plan, unserved_cost, deadline, rng, rounds)
        rounds -= fruitless + found
        if found:
            moves += found + _improve(plan, unserved_cost, deadline)
    placed = [plan.placed.get(i) for i in range(len(asks))]
    return BatchResult(placements=placed, cost=sum((p.total_cost for p in plan.placed.values()), Decimal(0)),
                       unserved=sum(p is None for p in placed), decisions=plan.decisions, moves=moves)


def plan_queue(engine: Engine, asks: Sequence[Ask], *, time_budget_s: float = 0.02) -> dict[int, Placement]:
    """Where to put queued requests (``asks`` in queue order) in one pass. Who is served
    is what the queue's order says: every request that one at a time, in that order,
    would be placed now is placed. The batch plan is used only if it serves all of those
    (and maybe more, on capacity they leave) and, serving the same, costs less.
    Returns the placement per index of ``asks``; {} to place one at a time. The engine's
    free units are put back as they were."""
    if len(asks) < 2:  # nothing to plan jointly; spares a pass over an empty queue (every
        return {}      # second, and at each kick) a snapshot and restore of every pool
    snapshot = engine.free_units()
    try:
        served: set[int] = set()
        in_order = Decimal(0)
        for i, ask in enumerate(asks):
            decision = engine.match(ask, limit=1)
            if not decision.options:
                continue
            best = decision.options[0]
            for a in best.allocations:
                engine.set_free(a.pool_id, engine.get(a.pool_id).free - a.units)  # type: ignore[union-attr]
            served.add(i)
            in_order += best.total_cost
        if len(asks) < 2 or not served:
            return {}
        for pool_id, free in snapshot.items():
            engine.set_free(pool_id, free)
        batch = place_batch(engine, asks, time_budget_s=time_budget_s)
        chosen = {i: p for i, p in enumerate(batch.placements) if p is not None}
        if not served <= set(chosen):
            return {}
        if len(chosen) == len(served) and batch.cost >= in_order:
            return {}
        return chosen
    finally:
        for pool_id, free in snapshot.items():
            engine.set_free(pool_id, free)
