"""Per-device placement for pools that share accelerators: structs in, decision out.

A pool here is nodes × devices. Each device has free milli (0–1000), each node free CPU
and memory. An ask is either a share of one device (``milli`` < 1000) or whole devices
that must sit on one node (a gang). Among the feasible placements the engine picks the
one that least increases the *expected fragmentation* of the node it lands on, where
fragmentation is the free GPU that the expected mix of asks could not use (the measure of
Weng et al., ATC '23, "Beware of Fragmentation", extended to memory), plus a penalty for
using up models that constrained asks can only run on. See docs/matching.md, "Shares and
fragmentation", for the rule and its knobs.

Why buckets: the score of a node depends only on its model, the multiset of its devices'
free milli and which expected asks its CPU and memory could still host, so nodes with the
same such *shape* share one cached score. A decision walks the shapes (hundreds to a few
thousand), not the nodes (100,000 devices = 12,500 eight-device nodes).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import msgspec

MILLI = 1000
_MEMO_LIMIT = 1_000_000  # cached scores kept before the memo is dropped (bounded memory)
_SCAN = 8  # members of a bucket tried for an ask's exact CPU/memory before moving on


class DeviceAsk(msgspec.Struct, frozen=True, kw_only=True):
    """``gpus`` whole devices on one node (``milli`` = 1000), or a share of one device
    (``gpus`` = 1, ``milli`` < 1000), or no device at all (``gpus`` = 0)."""

    cpu_milli: int = 0
    memory_mib: int = 0
    gpus: int = 1
    milli: int = MILLI
    models: frozenset[str] = frozenset()  # empty: any model

    def __post_init__(self) -> None:
        if self.cpu_milli < 0 or self.memory_mib < 0 or self.gpus < 0:
            raise ValueError("cpu_milli, memory_mib and gpus must not be negative")
        if self.gpus == 0 and self.milli not in (0, MILLI):
            raise ValueError("an ask without devices cannot ask for a share")
        if self.gpus > 0 and not 0 < self.milli <= MILLI:
            raise ValueError("milli must be in 1..1000")
        if self.gpus > 1 and self.milli != MILLI:
            raise ValueError("a share is of one device; several devices are whole")

    @property
    def share(self) -> bool:
        return self.gpus == 1 and self.milli < MILLI

    @property
    def total_milli(self) -> int:
        return self.gpus * self.milli if self.gpus else 0


class NodeSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    model: str
    devices: int
    cpu_milli: int
    memory_mib: int


class DevicePlacement(msgspec.Struct, frozen=True, kw_only=True):
    """Everything ``release`` needs to give back exactly what ``take`` took."""

    node: int
    devices: tuple[int, ...]
    milli: int  # per device
    cpu_milli: int
    memory_mib: int


class TypicalAsk(msgspec.Struct, frozen=True):
    ask: DeviceAsk
    weight: float  # share of the expected asks; the weights of a mix sum to 1


class Knobs(msgspec.Struct, frozen=True, kw_only=True):
    """``memory_aware``: a node whose memory cannot host an expected ask counts its free
    GPU as fragment for that ask (FGD looks at CPU only). ``scarcity_weight``: milli of
    penalty per milli placed, per unit of constrained demand pressing on the model.
    ``best_fit``: among equal fragmentation, fill the fuller node and device."""

    memory_aware: bool = True
    scarcity_weight: float = 1.0
    best_fit: bool = True
    tolerance: float = 100.0  # fragmentation differences below this many milli count as equal


def typical_mix(asks: Iterable[DeviceAsk], coverage: float = 0.95) -> tuple[TypicalAsk, ...]:
    """The most frequent ask shapes covering ``coverage`` of the asks, weights renormalised
    (FGD's "typical pods", popularity threshold 95%, step 1)."""
    counts = Counter(asks)
    total = sum(counts.values())
    if not total:
        return ()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], _shape_order(kv[0])))
    kept: list[tuple[DeviceAsk, int]] = []
    covered = 0
    for ask, n in ranked:
        if covered >= coverage * total:
            break
        kept.append((ask, n))
        covered += n
    return tuple(TypicalAsk(ask, n / covered) for ask, n in kept)


def scarcity_of(mix: Iterable[TypicalAsk], devices: Mapping[str, int]) -> dict[str, float]:
    """Per model: constrained expected demand per unit of the capacity it can use
    (``devices``: model -> devices), summed over the constrained asks that can use it."""
    total = sum(devices.values()) or 1
    out = dict.fromkeys(devices, 0.0)
    for t in mix:
        models = t.ask.models
        if not models or not t.ask.gpus:
            continue
        cap = sum(devices.get(m, 0) for m in models) / total
        for m in models:
            if m in out and cap:
                out[m] += t.weight / cap
    return out


def _shape_order(a: DeviceAsk) -> tuple:
    # ties in count: larger shapes first, as FGD's reverse sort does
    return (-a.cpu_milli, -a.milli, -a.gpus, tuple(sorted(a.models)))


class _Typical:
    __slots__ = ("weight", "milli", "gpus", "models", "cpu_cls", "mem_cls")

    def __init__(self, t: TypicalAsk, cpu_th: list[int], mem_th: list[int]) -> None:
        self.weight = t.weight
        self.milli = t.ask.milli
        self.gpus = t.ask.gpus
        self.models = t.ask.models
        self.cpu_cls = bisect_right(cpu_th, t.ask.cpu_milli)
        self.mem_cls = bisect_right(mem_th, t.ask.memory_mib)


class _Bucket:
    """Nodes of one shape, with what a decision reads first precomputed."""

    __slots__ = ("model", "key", "free", "ccls", "mcls", "members", "top", "whole", "sum", "memo")

    def __init__(self, model: str, key: tuple, memo: dict[int, tuple[float, int]]) -> None:
        self.model = model
        self.key = key
        self.free, self.ccls, self.mcls = key
        self.members: dict[int, None] = {}  # insertion-ordered set of node indices
        self.top = self.free[0] if self.free else 0
        self.whole = sum(1 for v in self.free if v == MILLI)
        self.sum = sum(self.free)
        self.memo = memo  # (ask shape, CPU/memory classes after) -> (cost, device free)


class Caches:
    """Scores of node shapes: fragmentation per shape, and per shape the cost of each ask
    shape with where it goes (``_Bucket.memo``). Outlive emptied buckets; may be shared by
    clusters scored with the same mix, scarcity and knobs."""

    __slots__ = ("frag", "memos")

    def __init__(self) -> None:
        self.frag: dict[tuple, float] = {}
        self.memos: dict[tuple, dict[int, tuple[float, int]]] = {}

    def clear(self) -> None:
        self.frag.clear()
        self.memos.clear()


class DeviceCluster:
    """Live free state of one sharing pool and the placement rule over it.

    ``decide`` is pure (it only fills memo caches); ``take``/``release`` change state."""

    def __init__(self, nodes: Sequence[NodeSpec], mix: Sequence[TypicalAsk] = (),
                 knobs: Knobs = Knobs()) -> None:
        self.knobs = knobs
        self.names = [n.name for n in nodes]
        self.model = [n.model for n in nodes]
        self.cpu_cap = [n.cpu_milli for n in nodes]
        self.mem_cap = [n.memory_mib for n in nodes]
        self.cpu = list(self.cpu_cap)
        self.mem = list(self.mem_cap)
        self.free = [[MILLI] * n.devices for n in nodes]
        self.devices_of: Counter[str] = Counter()  # model -> devices
        for n in nodes:
            self.devices_of[n.model] += n.devices
        self.cpu_th: list[int] = []
        self.mem_th: list[int] = []
        self.key: list[tuple] = []
        self.set_mix(mix)

    def set_mix(self, mix: Sequence[TypicalAsk], scarcity: Mapping[str, float] | None = None,
                caches: Caches | None = None) -> None:
        """Take a new expected mix (the broker's engine re-learns it from recent asks).
        ``scarcity``: the penalty per model, when it is weighed over more devices than this
        cluster's (the engine's sharing pools together); by default over this cluster.
        ``caches``: scores shared with other clusters of the same mix, scarcity and knobs
        (nodes of one shape score alike in any of them); the caller empties them when the
        mix changes. Without, this cluster's cached scores are dropped. Nodes are
        re-bucketed only if the CPU/memory classes moved."""
        gpu_mix = [t for t in mix if t.ask.gpus > 0]
        cpu_th = sorted({t.ask.cpu_milli for t in gpu_mix})
        mem_th = sorted({t.ask.memory_mib for t in gpu_mix}) if self.knobs.memory_aware else []
        self.mix = [_Typical(t, cpu_th, mem_th) for t in gpu_mix]
        self.scarcity = scarcity_of(gpu_mix, self.devices_of) if scarcity is None else dict(scarcity)
        shared = caches is not None
        if not shared:
            caches = Caches()
        moved = not self.key or (cpu_th, mem_th) != (self.cpu_th, self.mem_th)
        if not moved and not shared:
            for memo in self._memos.values():
                memo.clear()
        self._frag, self._memos = caches.frag, caches.memos
        if not moved:
            for shapes in self.buckets.values():
                for key, b in shapes.items():
                    b.memo = self._memos.setdefault((b.model, key), {})
            return
        self.cpu_th, self.mem_th = cpu_th, mem_th
        self.buckets: dict[str, dict[tuple, _Bucket]] = {}  # model -> shape key -> bucket
        self.key = []
        for i in range(len(self.free)):
            k = self._key(i)
            self.key.append(k)
            self._bucket(self.model[i], k).members[i] = None

    # ---- the measure -------------------------------------------------------------
    def _key(self, i: int) -> tuple:
        return (tuple(sorted(self.free[i], reverse=True)),
                bisect_right(self.cpu_th, self.cpu[i]), bisect_right(self.mem_th, self.mem[i]))

    def frag(self, model: str, free: tuple[int, ...], cpu_cls: int, mem_cls: int) -> float:
        """Expected free milli on a node of this shape that the mix could not use."""
        k = (model, free, cpu_cls, mem_cls)
        f = self._frag.get(k)
        if f is not None:
            return f
        total = sum(free)
        f = 0.0
        for t in self.mix:
            if (t.models and model not in t.models) or cpu_cls < t.cpu_cls or mem_cls < t.mem_cls:
                f += t.weight * total
                continue
            fit = 0
            stranded = 0
            for v in free:
                if v >= t.milli:
                    fit += 1
                else:
                    stranded += v
            f += t.weight * (stranded if fit >= t.gpus else total)
        self._frag[k] = f
        return f

    def _bucket(self, model: str, key: tuple) -> _Bucket:
        shapes = self.buckets.setdefault(model, {})
        b = shapes.get(key)
        if b is None:
            if len(self._memos) > _MEMO_LIMIT // 64:  # shapes churn in a long-lived pool
                self._memos.clear()
                self._frag.clear()
            b = shapes[key] = _Bucket(model, key, self._memos.setdefault((model, key), {}))
        return b

    def _share_frags(self, model: str, free: tuple[int, ...], cpu_cls: int, mem_cls: int,
                     milli: int) -> list[tuple[int, float]]:
        """(free milli of a device, ``frag`` of the node after ``milli`` are taken from it)
        for each distinct device value that fits: each expected ask's fitting devices and
        stranded milli are counted once, and each candidate device only moves them (the
        same sums, in the same order, as ``frag`` of each resulting shape)."""
        total = sum(free) - milli
        counts = []
        for t in self.mix:
            if (t.models and model not in t.models) or cpu_cls < t.cpu_cls or mem_cls < t.mem_cls:
                counts.append(None)
                continue
            fit = stranded = 0
            for v in free:
                if v >= t.milli:
                    fit += 1
                else:
                    stranded += v
            counts.append((fit, stranded))
        out = []
        for v in sorted(set(free)):
            if v < milli:
                continue
            nv = v - milli
            f = 0.0
            for t, c in zip(self.mix, counts):
                if c is None:
                    f += t.weight * total
                    continue
                fit, stranded = c
                if v >= t.milli:
                    fit -= 1
                else:
                    stranded -= v
                if nv >= t.milli:
                    fit += 1
                else:
                    stranded += nv
                f += t.weight * (stranded if fit >= t.gpus else total)
            out.append((v, f))
        return out

    def _delta_for(self, model: str, key: tuple, ask: DeviceAsk, ncpu: int, nmem: int) -> tuple[float, int]:
        """(fragmentation increase, free milli of the device to use) for the best device
        choice on a node of shape ``key`` whose CPU/memory classes become ncpu/nmem."""
        free, ccls, mcls = key
        before = self.frag(model, free, ccls, mcls)
        if ask.share:
            best: tuple[float, int] | None = None
            for v, after in self._share_frags(model, free, ncpu, nmem, ask.milli):
                d = after - before
                if best is None or d < best[0] - 1e-9:
                    best = (d, v)
            hit = best if best is not None else (float("inf"), 0)
        elif ask.gpus:
            after = free[ask.gpus:] + (0,) * ask.gpus
            hit = (self.frag(model, tuple(sorted(after, reverse=True)), ncpu, nmem) - before, MILLI)
        else:
            hit = (self.frag(model, free, ncpu, nmem) - before, 0)
        return hit

    # ---- deciding ----------------------------------------------------------------
    def decide(self, ask: DeviceAsk) -> DevicePlacement | None:
        """The placement that least increases expected fragmentation (plus scarcity
        penalty); None if nothing fits.

        A bucket is represented by the first of its first ``_SCAN`` members that fits the
        ask's CPU and memory (members share the expected asks' classes, not exact values).
        Only if that finds nothing and some bucket was cut short are whole buckets
        searched, so a placement is found whenever one exists."""
        scored = self.score(ask)
        return None if scored is None else scored[2]

    def score(self, ask: DeviceAsk) -> tuple[float, tuple, DevicePlacement] | None:
        """``decide`` with what ranked its answer: (cost, tie-break, placement), so that
        placements in different clusters (pools of one price, in the broker's engine)
        are compared by the same rule."""
        scored, cut_short = self._decide(ask, _SCAN)
        if scored is None and cut_short:
            scored, _ = self._decide(ask, 0)
        return scored

    def _decide(self, ask: DeviceAsk, scan: int) -> tuple[tuple[float, tuple, DevicePlacement] | None, bool]:
        acpu, amem, models = ask.cpu_milli, ask.memory_mib, ask.models
        cpu, mem, cpu_th, mem_th = self.cpu, self.mem, self.cpu_th, self.mem_th
        need_c, need_m = bisect_right(cpu_th, acpu), bisect_right(mem_th, amem)
        share, gpus, milli = ask.share, ask.gpus, ask.milli
        base = (gpus * 1024 + milli) << 20
        weight = self.knobs.scarcity_weight * ask.total_milli
        best_fit, tol = self.knobs.best_fit, self.knobs.tolerance
        best_cost = float("inf")
        best_tie: tuple = ()
        best: tuple[int, int] | None = None
        cut_short = False
        for model, shapes in self.buckets.items():
            if models and model not in models:
                continue
            penalty = weight * self.scarcity.get(model, 0.0)
            for b in shapes.values():
                if b.ccls < need_c or b.mcls < need_m:
                    continue
                if share:
                    if b.top < milli:
                        continue
                elif gpus and b.whole < gpus:
                    continue
                n = 0
                for i in b.members:  # the first member that fits stands for the bucket
                    if cpu[i] >= acpu and mem[i] >= amem:
                        break
                    n += 1
                    if n == scan:
                        i = -1
                        break
                else:
                    continue
                if i < 0:
                    cut_short = True
                    continue
                nc, nm = bisect_right(cpu_th, cpu[i] - acpu), bisect_right(mem_th, mem[i] - amem)
                mk = base | (nc << 10) | nm
                r = b.memo.get(mk)
                if r is None:  # the penalty is fixed per model and ask shape: memoise the cost
                    d, v = self._delta_for(model, b.key, ask, nc, nm)
                    r = b.memo[mk] = (round((d + penalty) / tol) if tol else round(d + penalty, 6), v)
                cost, v = r
                if cost > best_cost:
                    continue
                tie = (b.sum, v, i) if best_fit else (i,)
                if cost < best_cost or tie < best_tie:
                    best_cost, best_tie, best = cost, tie, (i, v)
        if best is None:
            return None, cut_short
        node, v = best
        return (best_cost, best_tie, DevicePlacement(node=node, devices=self._devices(node, ask, v),
                                                     milli=milli if gpus else 0, cpu_milli=acpu,
                                                     memory_mib=amem)), cut_short

    def _devices(self, node: int, ask: DeviceAsk, v: int) -> tuple[int, ...]:
        free = self.free[node]
        if not ask.gpus:
            return ()
        if ask.share:
            return (free.index(v),)
        return tuple(d for d, f in enumerate(free) if f == MILLI)[: ask.gpus]

    # ---- changing state ----------------------------------------------------------
    def take(self, p: DevicePlacement) -> None:
        """Apply a placement; refuses (ValueError, nothing changed) if it does not fit."""
        i = p.node
        free = self.free[i]
        if self.cpu[i] < p.cpu_milli or self.mem[i] < p.memory_mib:
            raise ValueError("node has too little CPU or memory left")
        if len(set(p.devices)) != len(p.devices) or any(not 0 <= d < len(free) for d in p.devices):
            raise ValueError("bad device list")
        whole = p.milli == MILLI
        for d in p.devices:
            if free[d] < p.milli or (whole and free[d] != MILLI):
                raise ValueError(f"device {d} has {free[d]} milli free")
        self._move(i, lambda: self._apply(i, p, -1))

    def release(self, p: DevicePlacement) -> None:
        i = p.node
        free = self.free[i]
        for d in p.devices:
            if free[d] + p.milli > MILLI:
                raise ValueError(f"device {d} would exceed {MILLI} milli")
        if self.cpu[i] + p.cpu_milli > self.cpu_cap[i] or self.mem[i] + p.memory_mib > self.mem_cap[i]:
            raise ValueError("release exceeds the node's capacity")
        self._move(i, lambda: self._apply(i, p, +1))

    def set_device(self, node: int, device: int, free: int) -> None:
        """Absolute free milli of one device (what Redis says after a reservation or a
        release anywhere: replicas follow it idempotently)."""
        if not 0 <= free <= MILLI:
            raise ValueError(f"free milli must be in 0..{MILLI}")
        row = self.free[node]
        if row[device] != free:
            self._move(node, lambda: row.__setitem__(device, free))

    def place(self, ask: DeviceAsk) -> DevicePlacement | None:
        p = self.decide(ask)
        if p is not None:
            self.take(p)
        return p

    def _apply(self, i: int, p: DevicePlacement, sign: int) -> None:
        for d in p.devices:
            self.free[i][d] += sign * p.milli
        self.cpu[i] += sign * p.cpu_milli
        self.mem[i] += sign * p.memory_mib

    def _move(self, i: int, change) -> None:
        model = self.model[i]
        shapes = self.buckets[model]
        old = self.key[i]
        change()
        new = self._key(i)
        if new == old:
            return
        members = shapes[old].members
        del members[i]
        if not members:
            del shapes[old]
        self._bucket(model, new).members[i] = None
        self.key[i] = new

    # ---- reading -----------------------------------------------------------------
    def node_frag(self, i: int) -> float:
        """Expected fragmented free milli of node ``i`` now (the console's "fragmented free")."""
        free, ccls, mcls = self.key[i]
        return self.frag(self.model[i], free, ccls, mcls)

    def allocated_milli(self) -> int:
        return sum(len(f) * MILLI - sum(f) for f in self.free)

    def capacity_milli(self) -> int:
        return sum(len(f) for f in self.free) * MILLI

    def largest_free_slice(self, models: frozenset[str] = frozenset()) -> int:
        """Largest free milli on any one device (for "why not" answers)."""
        return max((k[0][0] for m, shapes in self.buckets.items() if not models or m in models
                    for k in shapes if k[0]), default=0)
