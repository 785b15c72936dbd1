"""The FGD paper's policies, ported from its public simulator (hkust-adsl/
kubernetes-scheduler-simulator) to Python for bench/fgd_replay.py: FGD itself, best-fit,
dot-product (Tetris) and random. Written from reading the Go code, not copied from it.

What each port keeps from the simulator, because it changes the numbers:
* scores are Kubernetes node scores, integers 0–100 (FGD: ``int(sigmoid(Δ/1000)·100)``,
  best-fit min-max normalised over the feasible nodes), and among the nodes with the top
  score the simulator's scheduler (its fork of kube-scheduler 1.20, ``selectHost``) takes
  the one whose name sorts first "for reproducibility" — not a random one. This packs
  ties onto low-numbered nodes and is worth several points of allocation to FGD;
* the GPU on the chosen node is picked by FGD's own score (FGD), by best fit (best-fit,
  dot-product: their configured ``gpuSelMethod`` is "best") or at random (random);
* FGD's fragmentation of a node sums, over the typical pods, the free GPU milli a pod
  could not use; CPU-only typical pods count all free GPU; CPU shortage counts, memory
  does not (the simulator's ``PodResource`` has no memory); filters check CPU and memory.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Sequence

MILLI = 1000
MAX_SPEC_CPU = 128_000  # simulator constants used to normalise scores
MAX_SPEC_GPU = 8_000


class Pod:
    """A pod as the simulator sees it (``PodResource`` plus memory for the filter)."""

    __slots__ = ("name", "cpu", "mem", "gpus", "milli", "models")

    def __init__(self, name: str, cpu: int, mem: int, gpus: int, milli: int,
                 models: frozenset[str] = frozenset()) -> None:
        self.name, self.cpu, self.mem, self.gpus, self.milli, self.models = name, cpu, mem, gpus, milli, models

    @property
    def total_milli(self) -> int:
        return self.gpus * self.milli

    @property
    def share(self) -> bool:
        return self.gpus == 1 and self.milli < MILLI

    def shape(self) -> tuple:
        return (self.cpu, self.milli, self.gpus, "|".join(sorted(self.models)))


class Cluster:
    """Free CPU, memory and per-device milli of every node."""

    def __init__(self, nodes: Sequence[tuple[str, str, int, int, int]]) -> None:
        # (name, model, devices, cpu_milli, memory_mib)
        self.names = [n[0] for n in nodes]
        self.model = [n[1] for n in nodes]
        self.cpu = [n[3] for n in nodes]
        self.mem = [n[4] for n in nodes]
        self.free = [[MILLI] * n[2] for n in nodes]
        order = sorted(range(len(nodes)), key=lambda i: nodes[i][0])
        self.rank = [0] * len(nodes)  # position by name: the scheduler's tie-break
        for r, i in enumerate(order):
            self.rank[i] = r
        self.capacity = sum(n[2] for n in nodes) * MILLI
        self.allocated = 0

    def feasible(self, pod: Pod) -> list[int]:
        """The simulator's filters: NodeResourcesFit (CPU, memory) and Open-Gpu-Share."""
        out = []
        cpu, mem, free, model = self.cpu, self.mem, self.free, self.model
        for i in range(len(cpu)):
            if cpu[i] < pod.cpu or mem[i] < pod.mem:
                continue
            if pod.milli > 0:
                if pod.models and model[i] not in pod.models:
                    continue
                if sum(1 for v in free[i] if v >= pod.milli) < pod.gpus:
                    continue
            out.append(i)
        return out

    def bind(self, pod: Pod, node: int, devices: Sequence[int]) -> None:
        self.cpu[node] -= pod.cpu
        self.mem[node] -= pod.mem
        for d in devices:
            assert self.free[node][d] >= pod.milli
            self.free[node][d] -= pod.milli
        self.allocated += pod.milli * len(devices)


def typical_pods(pods: Sequence[Pod], threshold: float = 95.0) -> list[tuple[tuple, float]]:
    """``GetTypicalPods`` with the experiments' settings (CPU pods included, popularity
    threshold 95%, increase step 1, no GPU weight): [(shape, weight)], weights sum to 1."""
    counts: dict[tuple, float] = {}
    for p in pods:
        counts[p.shape()] = counts.get(p.shape(), 0.0) + 1.0
    total = float(len(pods))
    ranked = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
    expected = threshold * total / 100.0
    cum, i = 0.0, 0
    out: list[list] = []
    while cum < expected and i < len(ranked):
        cum += ranked[i][1]
        out.append([ranked[i][0], ranked[i][1] / total])
        i += 1
    if i < len(ranked):
        for o in out:
            o[1] /= cum / total
    return [(o[0], o[1]) for o in out]


def _accessible(model: str, spec: str) -> bool:
    wanted = [m for m in spec.split("|") if m]
    return not wanted or model in wanted


class FGD:
    """Fragmentation gradient descent: the node (and GPU) whose placement most reduces
    the node's fragmentation measure for the typical pods."""

    name = "fgd"

    def __init__(self, typical: Sequence[tuple[tuple, float]]) -> None:
        self.typical = [(cpu, milli, gpus, spec, w) for (cpu, milli, gpus, spec), w in typical]
        self.cpu_th = sorted({t[0] for t in self.typical if t[1] > 0})
        self._frag: dict[tuple, float] = {}
        self._score: dict[tuple, int] = {}

    def node_frag(self, model: str, free: Sequence[int], cpu_left: int) -> float:
        """``NodeGpuShareFragAmountScore``: Σ over typical pods of weight × the free
        milli the pod cannot use (all of it unless it fits; then the GPUs below its ask)."""
        key = (model, tuple(sorted(free)), bisect_right(self.cpu_th, cpu_left))
        f = self._frag.get(key)
        if f is not None:
            return f
        total = sum(free)
        f = 0.0
        for cpu, milli, gpus, spec, w in self.typical:
            if milli == 0 or not _accessible(model, spec):  # XL/XR and NoAccess: all free
                f += w * total
                continue
            if sum(1 for v in free if v >= milli) >= gpus:
                if cpu_left >= cpu:  # Q3: only GPUs too small for it are fragment
                    f += w * sum(v for v in free if v < milli)
                else:  # Q4: lacks CPU
                    f += w * total
            else:  # Q1/Q2
                f += w * total
        self._frag[key] = f
        return f

    def _int_score(self, old: float, new: float) -> int:
        return int(1.0 / (1.0 + math.exp(-(old - new) / 1000.0)) * 100)

    def score(self, c: Cluster, i: int, pod: Pod) -> tuple[int, tuple[int, ...]]:
        free, model, cpu_left = c.free[i], c.model[i], c.cpu[i]
        old = self.node_frag(model, free, cpu_left)
        if pod.share:
            best, gid = 0, -1
            for d, v in enumerate(free):
                if v >= pod.milli:
                    key = (model, tuple(sorted(free)), v, bisect_right(self.cpu_th, cpu_left),
                           bisect_right(self.cpu_th, cpu_left - pod.cpu), pod.milli)
                    s = self._score.get(key)
                    if s is None:
                        new = list(free)
                        new[d] -= pod.milli
                        s = self._score[key] = self._int_score(
                            old, self.node_frag(model, new, cpu_left - pod.cpu))
                    if gid < 0 or s > best:
                        best, gid = s, d
            return best, (gid,)
        new = list(free)
        devices: list[int] = []
        if pod.gpus:
            # NodeResource.Sub: least-sufficient GPUs first (for whole GPUs: idle ones)
            order = sorted(range(len(free)), key=lambda d: free[d])
            need = pod.gpus
            for d in order:
                if need and pod.milli <= new[d]:
                    new[d] -= pod.milli
                    need -= 1
            devices = [d for d, v in enumerate(free) if v == MILLI][: pod.gpus]  # AllocateExclusiveGpuId
        return self._int_score(old, self.node_frag(model, new, cpu_left - pod.cpu)), tuple(devices)

    def choose(self, c: Cluster, pod: Pod) -> tuple[int, tuple[int, ...]] | None:
        best: tuple[int, int] | None = None
        pick = None
        rank = c.rank
        for i in c.feasible(pod):
            s, dev = self.score(c, i, pod)
            if best is None or s > best[0] or (s == best[0] and rank[i] < best[1]):
                best, pick = (s, rank[i]), (i, dev)
        return pick


def best_fit_gpu(free: Sequence[int], pod: Pod) -> tuple[int, ...]:
    """``allocateGpuIdBasedOnBestFit``: the GPU with the least free that fits a share;
    the first idle GPUs for whole ones."""
    if not pod.gpus:
        return ()
    if pod.milli < MILLI:
        cand = -1
        for d, v in enumerate(free):
            if v >= pod.milli and (cand < 0 or v < free[cand]):
                cand = d
        return (cand,)
    return tuple(d for d, v in enumerate(free) if v == MILLI)[: pod.gpus]


class BestFit:
    name = "best-fit"

    def choose(self, c: Cluster, pod: Pod) -> tuple[int, tuple[int, ...]] | None:
        feas = c.feasible(pod)
        if not feas:
            return None
        raw = []
        for i in feas:
            s = 0.5 * (c.cpu[i] - pod.cpu) / MAX_SPEC_CPU + 0.5 * (sum(c.free[i]) - pod.total_milli) / MAX_SPEC_GPU
            raw.append(int((1.0 - s) * 100))
        hi, lo = max(raw), min(raw)
        norm = [0] * len(raw) if hi == lo else [(s - lo) * 100 // (hi - lo) for s in raw]
        top = max(norm)
        i = min((feas[k] for k, s in enumerate(norm) if s == top), key=c.rank.__getitem__)
        return i, best_fit_gpu(c.free[i], pod)


class DotProduct:
    """Tetris' alignment score with the simulator's settings (merged GPU dimension,
    normalised by the largest node spec); lower dot product scores higher."""

    name = "dot-product"

    def choose(self, c: Cluster, pod: Pod) -> tuple[int, tuple[int, ...]] | None:
        best: tuple[int, int] | None = None
        pc, pg = pod.cpu / MAX_SPEC_CPU, pod.total_milli / MAX_SPEC_GPU
        rank = c.rank
        for i in c.feasible(pod):
            dot = (c.cpu[i] / MAX_SPEC_CPU * pc + sum(c.free[i]) / MAX_SPEC_GPU * pg) / 2
            s = int(100 * (1 - dot))
            if best is None or s > best[0] or (s == best[0] and rank[i] < best[1]):
                best = (s, rank[i], i)
        if best is None:
            return None
        i = best[2]
        return i, best_fit_gpu(c.free[i], pod)


class RandomFit:
    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, c: Cluster, pod: Pod) -> tuple[int, tuple[int, ...]] | None:
        feas = c.feasible(pod)
        if not feas:
            return None
        i = self.rng.choice(feas)
        free = c.free[i]
        if pod.share:
            return i, (self.rng.choice([d for d, v in enumerate(free) if v >= pod.milli]),)
        return i, best_fit_gpu(free, pod)
