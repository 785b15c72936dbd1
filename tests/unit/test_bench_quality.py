"""Sanity of the placement-quality benches' pieces (bench/trace_replay.py, bench/milp_gap.py):
baselines pick what they claim and never overbook, the replay's metrics are right on
hand-made cases, and the MILP finds the known optimum of a tiny instance."""

from __future__ import annotations

import csv
import io
from decimal import Decimal
from pathlib import Path

import pytest

from bench import trace_replay as tr
from services.registry.domain.topology import default_topology

NODES = """sn,cpu_milli,memory_mib,gpu,model
n0,64000,262144,8,G2
n1,64000,262144,4,V100M16
n2,64000,262144,2,T4
n3,64000,262144,1,P100
n4,64000,262144,2,T4
"""


def nodes(text: str = NODES) -> list[tr.Node]:
    return tr.nodes_from_rows(list(csv.DictReader(io.StringIO(text))))


def task(k: int, gpus: int, start: int = 0, end: int | None = None,
         codes: frozenset[str] = frozenset()) -> tr.Task:
    return tr.Task(name=f"t{k}", gpus=gpus, codes=codes, start=start,
                   end=start + 1 if end is None else end)


def test_nodes_keep_codes_and_map_g_codes_for_the_engine() -> None:
    ns = nodes()
    assert [n.code for n in ns] == ["G2", "V100M16", "T4", "P100", "T4"]
    assert ns[0].model == tr.ASSUME["G2"] and ns[0].state.model == tr.ASSUME["G2"]
    assert [n.gpus for n in ns] == [8, 4, 2, 1, 2]
    assert all(n.state.free == n.state.capacity == n.gpus for n in ns)
    assert len({n.model for n in ns if n.code in tr.ASSUME}) == 1
    assert set(tr.ASSUME.values()).isdisjoint({n.model for n in ns if n.code not in tr.ASSUME})


def test_baselines_pick_what_they_claim() -> None:
    ns = nodes()
    free = [n.gpus for n in ns]
    one, two, four = task(0, 1), task(1, 2), task(2, 4)
    assert tr.BestFit(ns).choose(one, free) == 3  # the 1-GPU node
    assert tr.BestFit(ns).choose(two, free) == 2  # the first 2-GPU node
    assert tr.BestFit(ns).choose(task(3, 8), free) == 0
    assert tr.BestFit(ns).choose(task(4, 9), free) is None
    assert tr.FirstFit(ns).choose(two, free) == 0
    assert tr.FirstFit(ns).choose(four, free) == 0
    assert tr.BestFit(ns).choose(task(5, 2, codes=frozenset({"G2"})), free) == 0
    picks = [tr.RandomFit(ns, seed=3).choose(four, free) for _ in range(3)]
    assert set(picks) <= {0, 1}
    rf1, rf2 = tr.RandomFit(ns, seed=5), tr.RandomFit(ns, seed=5)
    assert [rf1.choose(one, free) for _ in range(20)] == [rf2.choose(one, free) for _ in range(20)]


def test_engine_policy_is_cheapest_first_then_best_fit() -> None:
    ns = nodes()
    free = [n.gpus for n in ns]
    eng = tr.EnginePolicy(ns)
    assert ns[eng.choose(task(0, 1), free)].code == "T4"  # cheapest model (0.35)
    assert eng.choose(task(1, 8), free) == 0
    assert eng.choose(task(2, 1, codes=frozenset({"P100"})), free) == 3
    assert eng.choose(task(3, 16), free) is None


@pytest.mark.parametrize("policy", ["engine", "best-fit", "first-fit", "random-fit"])
def test_replay_never_overbooks(policy: str) -> None:
    ns = nodes()
    tasks = [task(k, g, start=k, end=k + 7) for k, g in enumerate([1, 2, 4, 8, 1, 2, 1, 4, 8, 2] * 4)]
    for deps in (True, False):
        (p,) = tr.make_policies(ns, 1, [policy])
        r = tr.replay(p, tasks, departures=deps)
        assert r.requests == len(tasks) and 0 < r.placed <= len(tasks)
        assert 0 <= r.final_alloc <= 1 and 0 <= r.mean_alloc <= 1
    total = sum(n.gpus for n in ns)
    assert r.gpus_placed <= total  # no departures: what is placed stays


def test_replay_rejects_an_overbooking_policy() -> None:
    class Bad(tr.Policy):
        name = "bad"

        def choose(self, task: tr.Task, free: list[int]) -> int | None:
            return 3  # the 1-GPU node, whatever is asked

    with pytest.raises(AssertionError, match="overbooked"):
        tr.replay(Bad(nodes()), [task(0, 1), task(1, 1)], departures=False)


def test_first_failure_metric_and_price_first_fragmentation() -> None:
    """One 8-GPU node (cheaper model) and one 4-GPU node (dearer): four 1-GPU tasks then
    an 8-GPU task. Best fit keeps the 8-GPU node whole; the engine, cost first, puts the
    small tasks on the cheaper 8-GPU node and then cannot place the 8-GPU task."""
    ns = nodes("sn,cpu_milli,memory_mib,gpu,model\nbig,1,1,8,G2\nsmall,1,1,4,V100M16\n")
    assert ns[0].state.on_demand < ns[1].state.on_demand
    tasks = [task(k, 1, start=k) for k in range(4)] + [task(4, 8, start=4), task(5, 1, start=5)]
    best = tr.replay(tr.BestFit(ns), tasks, departures=False)
    assert best.first_fail == 6 and best.alloc_at_first_fail == 1.0
    assert best.placed == 5 and best.final_alloc == 1.0
    eng = tr.replay(tr.EnginePolicy(ns), tasks, departures=False)
    assert eng.first_fail == 5 and eng.first_fail_gpus == 8
    assert eng.alloc_at_first_fail == pytest.approx(4 / 12)
    assert eng.placed == 5 and eng.final_alloc == pytest.approx(5 / 12)
    assert len(eng.times_ns) == 6


def test_departures_free_capacity() -> None:
    ns = nodes("sn,cpu_milli,memory_mib,gpu,model\nonly,1,1,8,G2\n")
    tasks = [task(0, 8, start=0, end=10), task(1, 8, start=10, end=20)]
    assert tr.replay(tr.BestFit(ns), tasks, departures=True).placed == 2
    r = tr.replay(tr.BestFit(ns), tasks, departures=False)
    assert r.placed == 1 and r.first_fail == 2 and r.alloc_at_first_fail == 1.0


TRACE = Path(__file__).parents[1] / "data" / "alibaba-gpu-v2023"


def test_trace_tasks_load() -> None:
    """On the shipped excerpt of the task list: 2 rows without GPUs, 11 fractional ones
    taking a whole GPU, multi-GPU gangs of 2, 4 and 8 kept whole, arrival order."""
    tasks, stats = tr.load_tasks(TRACE / "openb_pod_list_default_excerpt.csv")
    assert stats == {"rows": 38, "no_gpu": 2, "fractional": 11}
    assert len(tasks) == 36 and sum(t.gpus for t in tasks) == 27 + 3 * (2 + 4 + 8)
    assert all(a.start <= b.start for a, b in zip(tasks, tasks[1:], strict=False))
    assert all(t.start <= t.end for t in tasks)
    assert 0 < tr.peak_demand(tasks) <= sum(t.gpus for t in tasks)
    nodes = tr.load_nodes(TRACE / "openb_node_list_gpu_node_excerpt.csv")
    assert len(nodes) == 38 and sum(n.gpus for n in nodes) == 191


# --- milp_gap ----------------------------------------------------------------------------
import bench.milp_gap as mg  # noqa: E402  (scipy is a test dependency)


def _pool(pid: str, region: str, price: str, free: int, model: str = "nvidia-l4") -> object:
    country = {r.id: r.country for r in default_topology().regions}[region]
    return mg.pool_state(pid, model, region, country, Decimal(price), free, free)


def _tiny() -> object:
    """r0 (8 units, 1 h) comes first and takes the cheap pool; r1 (8 units, 10 h) then pays
    the dear one. The optimum swaps them. r2 (split, data in us-east) fits only in eu-west."""
    topo = default_topology()
    pools = [_pool("pa", "us-east", "1.00", 8), _pool("pb", "us-east", "2.00", 8),
             _pool("pc", "eu-west", "0.50", 4, "nvidia-a10g")]
    asks = [mg.Ask(units=8, hours=Decimal(1), models=frozenset({"nvidia-l4"})),
            mg.Ask(units=8, hours=Decimal(10), models=frozenset({"nvidia-l4"})),
            mg.Ask(units=4, gang=False, max_pools=2, max_regions=1, data_region="us-east",
                   data_gb=100.0, models=frozenset({"nvidia-a10g"}))]
    return mg.Instance(0, topo, pools, [mg.Request(i, a) for i, a in enumerate(asks)],
                       mg.egress_table(topo))


def test_milp_finds_the_known_optimum() -> None:
    inst = _tiny()
    egress = inst.egress[("us-east", "eu-west")]
    assert egress > 0
    transfer = Decimal("100.0") * egress
    ex = mg.solve_exact(inst, time_limit=5)
    assert ex.status == 0 and not ex.capped
    mg.check_plan(inst, ex.plan)
    assert ex.plan == {0: {"pb": 8}, 1: {"pa": 8}, 2: {"pc": 4}}
    cost, unserved = mg.plan_cost(inst, ex.plan)
    assert unserved == 0
    assert cost == 8 * 2 * 1 + 8 * 1 * 10 + 4 * Decimal("0.5") + transfer
    assert ex.objective == pytest.approx(float(cost))

    greedy = mg.run_engine(inst, inst.requests)
    mg.check_plan(inst, greedy.plan)
    assert greedy.plan == {0: {"pa": 8}, 1: {"pb": 8}, 2: {"pc": 4}}
    g_cost, _ = mg.plan_cost(inst, greedy.plan)
    assert g_cost == greedy.engine_total == 8 * 1 * 1 + 8 * 2 * 10 + 4 * Decimal("0.5") + transfer
    # a start solution is accepted and never makes the answer worse
    assert mg.plan_cost(inst, mg.solve_exact(inst, 5, start=greedy.plan).plan)[0] == cost


def test_milp_split_respects_pool_and_region_limits() -> None:
    topo = default_topology()
    pools = [_pool("a", "us-east", "1.00", 4), _pool("b", "us-east", "1.10", 4),
             _pool("c", "us-west", "0.10", 4), _pool("d", "us-east", "5.00", 8)]
    ask = mg.Ask(units=8, gang=False, max_pools=2, max_regions=1)
    inst = mg.Instance(0, topo, pools, [mg.Request(0, ask)], mg.egress_table(topo))
    ex = mg.solve_exact(inst, time_limit=5)
    assert ex.plan == {0: {"a": 4, "b": 4}}  # c is cheaper but would open a 2nd region
    inst2 = mg.Instance(0, topo, pools, [mg.Request(0, mg.Ask(units=8, gang=False, max_pools=2,
                                                                max_regions=2))],
                        mg.egress_table(topo))
    assert mg.solve_exact(inst2, time_limit=5).plan == {0: {"c": 4, "a": 4}}


def test_check_plan_catches_overbooking_and_shape() -> None:
    inst = _tiny()
    with pytest.raises(AssertionError, match="overbooked"):
        mg.check_plan(inst, {0: {"pa": 8}, 1: {"pa": 8}})
    with pytest.raises(AssertionError):
        mg.check_plan(inst, {0: {"pa": 4, "pb": 4}})  # gang split over two pools
    with pytest.raises(AssertionError):
        mg.check_plan(inst, {2: {"pa": 4}})  # wrong model


def test_generated_instances_meet_the_brief() -> None:
    inst = mg.make_instance(3)
    again = mg.make_instance(3)
    assert [r.ask for r in inst.requests] == [r.ask for r in again.requests]
    assert len(inst.requests) >= 100 and len(inst.pools) >= 200
    assert len({p.region for p in inst.pools}) >= 6 and len({p.model for p in inst.pools}) >= 4
    assert inst.free >= mg.SLACK * inst.demand
    asks = [r.ask for r in inst.requests]
    assert any(a.gang for a in asks) and any(not a.gang for a in asks)
    assert any(a.data_region for a in asks) and any(a.models for a in asks)
    assert any(a.regions for a in asks)
    g = mg.run_engine(inst, inst.requests)
    mg.check_plan(inst, g.plan)
    served = [r for r in inst.requests if r.idx in g.plan]
    assert sum((mg.placement_cost(inst, r, g.plan[r.idx]) for r in served), Decimal(0)) \
        == g.engine_total
