"""The FGD port (bench/fgd_baselines.py) on a worked example of the paper's measure, with
every fragmentation value computed by hand, and the replay's protocol pieces
(bench/fgd_replay.py) on a small excerpt of the trace shipped in tests/data/fgd/."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import fgd_baselines as fb
from bench import fgd_replay as fr

DATA = Path(__file__).resolve().parents[1] / "data" / "fgd"

# Typical tasks of the example: (cpu milli, GPU milli, GPUs, model spec) -> popularity
TYPICAL = [((4000, 500, 1, ""), 0.5),    # a half-GPU task
           ((8000, 1000, 1, ""), 0.3),   # a one-GPU task
           ((2000, 0, 0, ""), 0.2)]      # a CPU-only task


def one_node(free: list[int], cpu: int = 16000, model: str = "T4", name: str = "n0") -> fb.Cluster:
    c = fb.Cluster([(name, model, len(free), cpu, 1 << 20)])
    c.free[0] = list(free)
    return c


def test_node_fragmentation_worked_example() -> None:
    """A node with four GPUs, 1, 1, 0.5 and 0.2 of them free, 16 CPUs free.
    half-GPU task: fits (three GPUs have >= 0.5); only the 0.2 GPU is stranded -> 0.5 * 200 = 100
    one-GPU task:  fits (two whole GPUs); 0.5 + 0.2 stranded                -> 0.3 * 700 = 210
    CPU-only task: uses no GPU, so all 2.7 free GPUs count                  -> 0.2 * 2700 = 540
    F = 850 milli-GPU."""
    fgd = fb.FGD(TYPICAL)
    assert fgd.node_frag("T4", [1000, 1000, 500, 200], 16000) == pytest.approx(850)
    # with 6 CPUs free the one-GPU task (8 CPUs) cannot run: all 2700 is its fragment
    assert fgd.node_frag("T4", [1000, 1000, 500, 200], 6000) == pytest.approx(100 + 0.3 * 2700 + 540)
    # a task bound to another model counts the whole node (NoAccess)
    bound = fb.FGD([((4000, 500, 1, "V100"), 1.0)])
    assert bound.node_frag("T4", [1000, 500], 16000) == pytest.approx(1500)
    assert bound.node_frag("V100", [1000, 500], 16000) == 0


def test_fgd_places_a_share_where_fragmentation_falls_most() -> None:
    """A half-GPU task (4 CPUs) on the node above:
    on the 0.5 GPU: free [1, 1, 0, 0.2] -> 0.5*200 + 0.3*200 + 0.2*2200 = 600, Δ = +250
    on a whole GPU: free [0.5, 1, 0.5, 0.2] -> 0.5*200 + 0.3*1200 + 0.2*2200 = 900, Δ = -50
    scores int(100·sigmoid(Δ/1000)): 56 and 48; the 0.2 GPU does not fit."""
    fgd = fb.FGD(TYPICAL)
    c = one_node([1000, 1000, 500, 200])
    pod = fb.Pod("p", 4000, 1024, 1, 500)
    score, devices = fgd.score(c, 0, pod)
    assert devices == (2,)
    assert score == int(100 / (1 + math.exp(-0.25))) == 56
    assert fgd._int_score(850, 900) == 48


def test_fgd_ties_go_to_the_first_node_name() -> None:
    fgd = fb.FGD(TYPICAL)
    c = fb.Cluster([("n-b", "T4", 2, 16000, 1 << 20), ("n-a", "T4", 2, 16000, 1 << 20)])
    node, devices = fgd.choose(c, fb.Pod("p", 1000, 1024, 1, 1000))
    assert node == 1 and devices == (0,)  # identical empty nodes: "n-a" sorts first


def test_whole_gpu_pods_take_idle_gpus_and_filters_respect_memory_and_model() -> None:
    c = fb.Cluster([("n0", "T4", 4, 16000, 4096), ("n1", "V100", 4, 16000, 65536)])
    c.free[1] = [400, 1000, 1000, 1000]
    pod = fb.Pod("p", 1000, 8192, 2, 1000)
    assert c.feasible(pod) == [1]  # n0 lacks memory
    assert fb.best_fit_gpu(c.free[1], pod) == (1, 2)
    assert c.feasible(fb.Pod("q", 1000, 1024, 1, 500, frozenset({"T4"}))) == [0]


def test_best_fit_and_dot_product_follow_the_simulator_scores() -> None:
    c = fb.Cluster([("a", "T4", 2, 64000, 1 << 20), ("b", "T4", 8, 96000, 1 << 20)])
    pod = fb.Pod("p", 8000, 1024, 1, 1000)
    # best-fit: left-over (cpu/128000 + gpu/8000)/2 is smaller on "a"
    assert fb.BestFit().choose(c, pod)[0] == 0
    # dot product of free and asked (normalised): smaller on "a" too
    assert fb.DotProduct().choose(c, pod)[0] == 0


def test_typical_pods_cover_95_percent_and_renormalise() -> None:
    pods = ([fb.Pod(f"a{i}", 4000, 1, 1, 500) for i in range(90)]
            + [fb.Pod(f"b{i}", 8000, 1, 1, 1000) for i in range(6)]
            + [fb.Pod(f"c{i}", 1000, 1, 8, 1000) for i in range(4)])
    t = fb.typical_pods(pods)
    assert [s for s, _ in t] == [(4000, 500, 1, ""), (8000, 1000, 1, "")]
    assert sum(w for _, w in t) == pytest.approx(1)


def test_trace_excerpt_reads_as_the_simulator_reads_it() -> None:
    pods = fr.read_pods(DATA / "pods.csv")
    nodes = fr.read_nodes(DATA / "nodes.csv")
    assert len(pods) == 20 and len(nodes) == 13
    cpu_only = next(p for p in pods if p.name == "openb-pod-1000")
    assert (cpu_only.gpus, cpu_only.milli, cpu_only.cpu, cpu_only.mem) == (0, 0, 16500, 51200)
    share = next(p for p in pods if p.name == "openb-pod-0300")
    assert (share.gpus, share.milli) == (1, 320)
    assert nodes[0] == ("openb-node-0000", "P100", 2, 64000, 262144)
    assert len(fr.read_nodes(DATA / "nodes.csv", scale=3)) == 39


def test_arrivals_are_shuffled_by_seed_and_inflated_to_the_tune_ratio() -> None:
    pods = fr.read_pods(DATA / "pods.csv")
    assert sum(p.total_milli for p in pods) == 17190
    cap = 20_000  # 1.3 x 20,000 = 26,000: inflate
    a = fr.arrival_list(pods, cap, 42)
    assert a[:20] != sorted(pods, key=lambda p: p.name)
    assert sorted(p.name for p in a[:20]) == sorted(p.name for p in pods)
    assert [p.name for p in a] == [p.name for p in fr.arrival_list(pods, cap, 42)]
    assert [p.name for p in a] != [p.name for p in fr.arrival_list(pods, cap, 43)]
    total = sum(p.total_milli for p in a)
    assert total <= 1.3 * cap and all("-tuned-" in p.name for p in a[20:])
    assert total > 1.3 * cap - 1000  # stops only when the next pod would overshoot
    down = fr.arrival_list(pods, 10_000, 42)  # 13,000: deflate by dropping random pods
    assert sum(p.total_milli for p in down) <= 13_000 and len(down) < 20
    assert not any("-tuned-" in p.name for p in down)


def test_replay_on_the_excerpt_never_overbooks_and_reports_the_kpi() -> None:
    pods = fr.read_pods(DATA / "pods.csv")
    nodes = fr.read_nodes(DATA / "nodes.csv")
    for policy in fr.POLICIES:
        r = fr.run(policy, nodes, pods, 42)
        assert 50 < r["allocated_pct"] <= 100
        assert 0 < r["placed_pct"] <= 100
        assert r["decision_us_p50"] <= r["decision_us_p99"]
