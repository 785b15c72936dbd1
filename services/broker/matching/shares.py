"""Shares of one device, and device hints for whole asks, on pools that share.

The engine keeps, per sharing pool, a ``DeviceCluster`` (devices.py: free milli per
device, nodes of ``units_per_node`` devices) and hands this module the asks that need it:
an ask for a share (``Ask.milli`` < 1000) is placed here entirely; a whole-unit ask is
placed by the engine's books as before (a sharing pool's ``free`` counts its devices with
all 1000 free), and only the options that landed on a sharing pool come here for their
devices. An engine without sharing pools never enters this module for whole asks.

The rule for a share (docs/matching.md, "Shares in the broker"): cost first — the share's
price (unit price x milli/1000 over the ask's hours or term) plus transfer, or time first
with ``objective: time``, as for whole asks; among pools of equal cost, devices.py's score
(expected fragmentation plus scarcity, then best fit) picks the pool and device. Pools of
one cost class are scored at most ``PER_CLASS`` at a time, those whose largest free slice
fits the share most tightly first, so a decision costs a bounded number of cluster walks.

The expected mix that scoring needs is learned from the asks that come here (shares, and
whole asks while sharing pools exist), re-learned every ``RELEARN`` asks.
"""

from __future__ import annotations

import heapq
from bisect import insort
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from decimal import Decimal
from itertools import groupby, islice
from typing import TYPE_CHECKING

import msgspec

from .devices import (
    MILLI,
    Caches,
    DeviceAsk,
    DeviceCluster,
    NodeSpec,
    TypicalAsk,
    scarcity_of,
    typical_mix,
)
from .index import BILLINGS
from .model import Allocation, Ask, Placement, PoolState
from .texts import few as _few
from .texts import fmt_money as _money
from .texts import fmt_num as _num

if TYPE_CHECKING:
    from .engine import Engine, _Ctx
    from .index import Cell

PER_CLASS = 8  # pools of one cost class scored with the device rule per decision
VISIT_MAX = 256  # pools that pass the checks looked at per decision, in cost order
WINDOW = 2000  # recent asks the expected mix is learned from
RELEARN = 2000  # asks between two learnings of the mix (the first after 50 asks)
MIX_MAX = 8  # expected ask shapes kept (the score of a node shape costs O(mix x devices))
DRIFT = 0.1  # a new mix this close (total variation distance) to the one in use is not taken:
# taking one drops every cached score, and the decisions after it pay for recomputing them
_MILLI = Decimal(MILLI)
_MICRO = Decimal("0.000001")


class SharedPool:
    """One sharing pool's devices: device index i is device i % units_per_node of node
    i // units_per_node (the last node may have fewer)."""

    __slots__ = ("_top", "_whole_node", "capacity", "cluster", "ladders", "max_milli", "memory_gib", "min_milli",
                 "mode", "pool_id", "upn")

    def __init__(self, state: PoolState, mix: Iterable[TypicalAsk] = (),
                 scarcity: Mapping[str, float] | None = None, caches: Caches | None = None) -> None:
        self.pool_id = state.pool_id
        self.upn = upn = max(1, state.units_per_node)
        self.capacity = cap = max(0, state.capacity)
        nodes = [NodeSpec(name=str(n), model=state.model, devices=min(upn, cap - n * upn), cpu_milli=0,
                          memory_mib=0) for n in range(-(-cap // upn))]
        self.cluster = DeviceCluster(nodes)
        if mix or caches is not None:
            self.cluster.set_mix(tuple(mix), scarcity, caches)
        self._top: int | None = None
        self._whole_node: int | None = None
        self.ladders: list[Ladder] = []  # the price ladders this pool is on (one per billing mode)
        self.refresh(state)

    def refresh(self, state: PoolState) -> None:
        """What a re-registration may change without touching the devices."""
        self.mode = state.sharing
        self.min_milli, self.max_milli = state.min_milli, state.max_milli
        self.memory_gib = float(state.memory_gib)

    def same_devices(self, state: PoolState) -> bool:
        return self.capacity == max(0, state.capacity) and self.upn == max(1, state.units_per_node)

    # --- state ----------------------------------------------------------------------
    def set(self, free: Mapping[int, int]) -> None:
        """Absolute free milli per device index; indices outside the pool are ignored."""
        upn, cap, cluster = self.upn, self.capacity, self.cluster
        for index, milli in free.items():
            index = int(index)
            if 0 <= index < cap:
                node, dev = divmod(index, upn)
                cluster.set_device(node, dev, min(MILLI, max(0, int(milli))))
        old = self._top
        self._top = self._whole_node = None
        if self.ladders and self.top != old:
            for ladder in self.ladders:
                ladder.update(self.pool_id, self.top)

    def get(self, index: int) -> int:
        node, dev = divmod(index, self.upn)
        return self.cluster.free[node][dev]

    def free_milli(self) -> dict[int, int]:
        """Device index -> free milli, every device."""
        upn = self.upn
        return {n * upn + d: v for n, row in enumerate(self.cluster.free) for d, v in enumerate(row)}

    @property
    def top(self) -> int:
        """The largest free slice on any one device."""
        if self._top is None:
            self._top = self.cluster.largest_free_slice()
        return self._top

    @property
    def whole_node(self) -> int:
        """The most devices with all 1000 free on any one node."""
        if self._whole_node is None:
            self._whole_node = max((b.whole for shapes in self.cluster.buckets.values() for b in shapes.values()),
                                   default=0)
        return self._whole_node

    def fits_whole(self, units: int) -> bool:
        """Whether whole ``units`` fit here as ``hint_whole`` places them."""
        return self.whole_node >= units if units <= self.upn else self.whole_free() >= units

    def whole_free(self) -> int:
        """Devices with all 1000 milli free (what the pool hash's ``free`` says)."""
        return sum(b.whole * len(b.members) for shapes in self.cluster.buckets.values() for b in shapes.values())

    # --- rules ----------------------------------------------------------------------
    def slice_gib(self, milli: int) -> float:
        """Memory a share of ``milli`` may use: its part of the device on "memory" pools,
        the whole device's on "time_slice" pools."""
        return self.memory_gib * milli / MILLI if self.mode == "memory" else self.memory_gib

    def score(self, ask: DeviceAsk) -> tuple[float, tuple, tuple[int, ...]] | None:
        """(cost, tie-break, device indices) of devices.py's best placement here."""
        scored = self.cluster.score(ask)
        if scored is None:
            return None
        cost, tie, p = scored
        base = p.node * self.upn
        return cost, tie, tuple(base + d for d in p.devices)

    def hint_whole(self, units: int) -> tuple[int, ...] | None:
        """Devices with all 1000 free for a whole ask: on one node (scored, best fit) when
        ``units`` fit a node, else the fullest-free nodes first; None if they do not fit."""
        if not self.fits_whole(units):
            return None
        if units <= self.upn:
            scored = self.score(DeviceAsk(gpus=units))
            return None if scored is None else scored[2]
        rows = sorted(((sum(1 for v in row if v == MILLI), n) for n, row in enumerate(self.cluster.free)),
                      key=lambda t: (-t[0], t[1]))
        out: list[int] = []
        for whole, n in rows:
            if not whole or len(out) >= units:
                break
            out.extend(n * self.upn + d for d, v in enumerate(self.cluster.free[n]) if v == MILLI)
        return tuple(sorted(out[:units])) if len(out) >= units else None


class Ladder:
    """The sharing pools of one cell that offer one billing mode, by price (then id), with
    a max-tree over their largest free slices: the next pool in price order with a slice
    of at least ``milli`` is one O(log n) descent, so full pools are never walked."""

    __slots__ = ("pids", "pos", "prices", "size", "tree")

    def __init__(self, entries: list[tuple[Decimal, str, int]]) -> None:
        entries.sort(key=lambda e: (e[0], e[1]))
        self.prices = [e[0] for e in entries]
        self.pids = [e[1] for e in entries]
        self.pos = {pid: i for i, pid in enumerate(self.pids)}
        size = 1
        while size < len(entries):
            size <<= 1
        self.size = size
        tree = self.tree = [0] * (2 * size)
        for i, e in enumerate(entries):
            tree[size + i] = e[2]
        for i in range(size - 1, 0, -1):
            tree[i] = max(tree[2 * i], tree[2 * i + 1])

    def update(self, pool_id: str, top: int) -> None:
        tree = self.tree
        i = self.pos[pool_id] + self.size
        tree[i] = top
        i >>= 1
        while i:
            v = max(tree[2 * i], tree[2 * i + 1])
            if tree[i] == v:
                break
            tree[i] = v
            i >>= 1

    def first(self, j: int, milli: int) -> int:
        """The first position >= ``j`` whose pool has a slice of ``milli``; -1 if none."""
        if j >= len(self.pids):
            return -1
        tree, size = self.tree, self.size
        i = j + size
        while True:
            if tree[i] >= milli:
                while i < size:
                    i <<= 1
                    if tree[i] < milli:
                        i += 1
                return i - size
            while i & 1:
                i >>= 1
            if not i:
                return -1
            i += 1


class Shares:
    """The engine's sharing pools, by cell, and the expected mix they are scored with."""

    def __init__(self) -> None:
        self.pools: dict[str, SharedPool] = {}
        self.by_cell: dict[int, dict[str, None]] = {}  # cell id -> its sharing pools
        self._cell: dict[str, int] = {}
        self._recent: deque[DeviceAsk] = deque(maxlen=WINDOW)
        self._since = 0
        self.mix: tuple[TypicalAsk, ...] = ()
        self.scarcity: dict[str, float] = {}
        self.caches = Caches()  # scores of node shapes, shared by all sharing pools (one mix)
        self._ladders: dict[tuple[int, str], Ladder | None] = {}  # (cell id, billing) -> its ladder

    # --- pools ----------------------------------------------------------------------------
    def upsert(self, state: PoolState, cell_id: int) -> None:
        """A pool was added or replaced: a sharing pool keeps its device state when its
        devices are the same (a price change), else starts all free; a pool that stopped
        sharing leaves."""
        pid = state.pool_id
        if state.sharing == "none":
            self.remove(pid)
            return
        sp = self.pools.get(pid)
        if sp is not None and sp.same_devices(state):
            sp.refresh(state)
        else:
            self.pools[pid] = SharedPool(state, self.mix, self.scarcity, self.caches)
            if self.mix and any(t.ask.models for t in self.mix):
                self._learn(force=True)  # the devices per model changed: so did scarcity
        old = self._cell.get(pid)
        if old is not None and old != cell_id:
            self._leave(pid, old)
        self._cell[pid] = cell_id
        self.by_cell.setdefault(cell_id, {})[pid] = None
        self._unladder(cell_id)  # a price or a member changed: the cell's ladders are rebuilt when next used

    def remove(self, pool_id: str) -> None:
        if self.pools.pop(pool_id, None) is not None:
            self._leave(pool_id, self._cell.pop(pool_id))

    def _leave(self, pool_id: str, cell_id: int) -> None:
        members = self.by_cell.get(cell_id)
        if members is not None:
            members.pop(pool_id, None)
            if not members:
                del self.by_cell[cell_id]
        self._unladder(cell_id)

    def _unladder(self, cell_id: int) -> None:
        for billing in BILLINGS:
            dropped = self._ladders.pop((cell_id, billing), None)
            if dropped is not None:
                for pid in dropped.pids:
                    sp = self.pools.get(pid)
                    if sp is not None:
                        sp.ladders = [lad for lad in sp.ladders if lad is not dropped]

    def ladder(self, cell: Cell, billing: str) -> Ladder | None:
        """The cell's sharing pools that offer ``billing``, by price (built on first use)."""
        key = (cell.id, billing)
        try:
            return self._ladders[key]
        except KeyError:
            pass
        entries = []
        for pid in self.by_cell.get(cell.id, ()):
            price = getattr(cell.pools[pid], billing)
            if price is not None:
                entries.append((price, pid, self.pools[pid].top))
        ladder = self._ladders[key] = Ladder(entries) if entries else None
        if ladder is not None:
            for pid in ladder.pids:
                self.pools[pid].ladders.append(ladder)
        return ladder

    # --- the expected mix ------------------------------------------------------------------
    def record(self, ask: Ask, units: int) -> None:
        """An ask that uses (or might use) a sharing pool, for the expected mix."""
        if units > 64:
            return  # no node has that many devices: it says nothing about fragments
        self._recent.append(DeviceAsk(gpus=units, milli=min(MILLI, ask.milli), models=ask.models))
        self._since += 1
        if self._since >= RELEARN or (not self.mix and self._since >= 50):
            self._learn()

    def _learn(self, force: bool = False) -> None:
        """The most frequent recent shapes (at most ``MIX_MAX``); scores are recomputed
        (caches dropped) only when the mix moved by more than ``DRIFT``, or ``force``."""
        self._since = 0
        top = typical_mix(self._recent)[:MIX_MAX]
        total = sum(t.weight for t in top) or 1.0
        mix = tuple(TypicalAsk(t.ask, t.weight / total) for t in top)
        if not force and _close(mix, self.mix):
            return
        self.mix = mix
        devices: Counter[str] = Counter()
        for sp in self.pools.values():
            for model, n in sp.cluster.devices_of.items():
                devices[model] += n
        self.scarcity = scarcity_of(self.mix, devices)
        self.caches.clear()
        for sp in self.pools.values():
            sp.cluster.set_mix(self.mix, self.scarcity, self.caches)

    # --- placing a share ------------------------------------------------------------------
    def match(self, engine: Engine, ctx: _Ctx, cells: list[Cell], limit: int) -> list[Placement]:
        """Up to ``limit`` placements of the share on distinct pools, best first.

        The cells' price ladders are merged lazily in order of a lower bound on the key
        (cost, or time then cost), visiting only pools with a slice that fits, until
        ``limit`` pools are found and the bound passes the ``limit``-th key (at most
        ``VISIT_MAX`` pools that pass the checks); then the pools of each key, in order,
        are scored with devices.py's rule (at most ``PER_CLASS`` per key)."""
        ask = ctx.ask
        milli = ask.milli
        self.record(ask, 1)
        fraction = Decimal(milli) / _MILLI
        f = fraction * ctx.factor
        time_obj, cap, exclude, need_gib = ctx.time_obj, ctx.cap, ctx.exclude, ask.share_memory_gib
        rank = ctx.rank
        m_lo = rank[0] if rank is not None else None
        heap: list[tuple[tuple, int, int]] = []
        meta: dict[int, tuple[Cell, Ladder, Decimal, float]] = {}

        def push(cid: int, j: int) -> None:
            _, ladder, transfer, ctime = meta[cid]
            cost = ladder.prices[j] * f + transfer
            if m_lo is not None:
                cost *= m_lo
            heapq.heappush(heap, ((ctime, cost) if time_obj else (cost, ctime), cid, j))

        for cell in cells:
            if cell.id not in self.by_cell:
                continue
            info = ctx.region(cell.region)
            if info is None:
                continue
            ladder = self.ladder(cell, ctx.billing)
            if ladder is None:
                continue
            j = ladder.first(0, milli)
            if j >= 0:
                meta[cell.id] = (cell, ladder, info[0], ctx.cell_time(cell, info))
                push(cell.id, j)
        found: list[tuple[tuple, int, str, Cell, Decimal, Decimal]] = []  # (key, top, pool, cell, price, transfer)
        keys: list[tuple] = []
        while heap and len(found) < VISIT_MAX:
            if len(keys) >= limit and heap[0][0] > keys[limit - 1]:
                break
            _, cid, j = heapq.heappop(heap)
            cell, ladder, transfer, ctime = meta[cid]
            price, pid = ladder.prices[j], ladder.pids[j]
            if cap is not None and price * fraction > cap:
                continue  # the rest of this cell's ladder costs more
            nj = ladder.first(j + 1, milli)
            if nj >= 0:
                push(cid, nj)
            sp = self.pools[pid]
            if sp.min_milli > milli or milli > sp.max_milli or (need_gib and sp.slice_gib(milli) < need_gib) \
                    or pid in exclude:
                continue
            cost = price * f + transfer
            if rank is not None:
                cost = (cost * rank[1](pid)).quantize(_MICRO)
            key = (ctime, cost) if time_obj else (cost, ctime)
            found.append((key, sp.top, pid, cell, price, transfer))
            insort(keys, key)
        found.sort(key=lambda m: (m[0], m[1], m[2]))  # by key, then tightest fit first
        device_ask = DeviceAsk(gpus=1, milli=milli, models=ask.models)
        options: list[Placement] = []
        for _, members in groupby(found, key=lambda m: m[0]):
            scored = []
            for _, _, pid, cell, price, transfer in islice(members, PER_CLASS):
                s = self.pools[pid].score(device_ask)
                if s is not None:
                    scored.append((s[0], s[1], pid, s[2], cell, price, transfer))
            scored.sort(key=lambda s: (s[0], s[1], s[2]))
            for _, _, pid, devices, cell, price, transfer in scored:
                options.append(self._placement(engine, ctx, cell, pid, price, transfer, devices))
                if len(options) >= limit:
                    return options
        return options

    def _placement(self, engine: Engine, ctx: _Ctx, cell: Cell, pid: str, price: Decimal, transfer: Decimal,
                   devices: tuple[int, ...]) -> Placement:
        milli = ctx.ask.milli
        fraction = Decimal(milli) / _MILLI
        pool = cell.pools[pid]
        compute = price * fraction * ctx.factor
        total = compute + transfer
        info = ctx.region(cell.region)
        assert info is not None
        unit_hour = (price / ctx.hour_div).quantize(_MICRO)
        expected = None
        if ctx.ask.failover_cost > 0:
            rel = engine.reliability
            expected = (total * rel.multiplier(ctx.ask.failover_cost, rel.mean([(pid, 1)]))).quantize(_MICRO)
        allocation = Allocation(
            pool_id=pid, region=cell.region, provider=pool.provider, model=cell.model, units=1,
            unit_price=price, price_basis=ctx.basis, availability="listed" if pool.listed else "live",
            location="unknown" if engine._links.is_unlocated(cell.region) else "known",
            milli=milli, devices=devices)
        return Placement(
            allocations=(allocation,), units=1, tflops=cell.tflops(ctx.metric) * milli / MILLI,
            compute_cost=compute, transfer_cost=transfer, total_cost=total, currency=ctx.currency,
            unit_hour_price=unit_hour, transfer_s=ctx.cell_time(cell, info), expected_cost=expected,
            milli=milli, share_hour_price=(unit_hour * fraction).quantize(_MICRO))

    # --- whole asks on sharing pools -------------------------------------------------------
    def whole(self, ask: Ask, options: list[Placement], everywhere: bool = True,
              first: bool = True) -> tuple[list[Placement], set[str]]:
        """The options with device hints on their sharing pools; options whose sharing
        pool has its free devices spread so that the ask does not fit one node are left
        out. If one is, the pools that failed are returned, and (``everywhere``) every
        sharing pool where the ask's units (or the units of its smallest allocation)
        cannot fit, for the engine to look again without them. The sweep over every
        sharing pool costs some 5 ms at 12,500 pools, so the engine first looks again
        without the failed pools alone, a few times."""
        if ask.gang and first:  # (the engine's later looks are the same ask: counted once)
            self.record(ask, int(options[0].units))
        out: list[Placement] = []
        bad: set[str] = set()
        for option in options:
            if not any(a.pool_id in self.pools for a in option.allocations):
                out.append(option)
                continue
            allocations = []
            for a in option.allocations:
                sp = self.pools.get(a.pool_id)
                if sp is None:
                    allocations.append(a)
                    continue
                devices = sp.hint_whole(a.units)
                if devices is None:
                    bad.add(a.pool_id)
                    break
                allocations.append(msgspec.structs.replace(a, devices=devices))
            else:
                out.append(msgspec.structs.replace(option, allocations=tuple(allocations)))
        if bad and everywhere:
            least = min(a.units for o in options for a in o.allocations)
            bad |= {pid for pid, sp in self.pools.items() if not sp.fits_whole(least)}
        return out, bad

    def spread_reason(self, options: list[Placement], bad: set[str]) -> str:
        """Why whole units found in the books do not fit: their sharing pools' whole
        devices are spread over nodes (not ``never``: releases gather them)."""
        units = min(a.units for o in options for a in o.allocations if a.pool_id in bad)
        pools = [self.pools[pid] for pid in sorted(bad) if pid in self.pools]
        most = max((sp.whole_node for sp in pools), default=0)
        n = len(pools)
        return (f"{n} sharing pool{'s have' if n != 1 else ' has'} {units} whole devices free, but not on "
                f"one node (most on one node: {most})")

    # --- why not --------------------------------------------------------------------------
    def explain(self, engine: Engine, ctx: _Ctx, cells: list[Cell]) -> tuple[list[str], bool]:
        """Why no share fits, once the static constraints left some cells: the first of
        sharing, smallest share, memory, billing and price, exclusions, free slices that
        empties the set. ``never``: only free slices and exclusions can change."""
        ask = ctx.ask
        milli, need_gib = ask.milli, ask.share_memory_gib
        regions = _few(c.region for c in cells)
        pools = [(c, self.pools[pid]) for c in cells for pid in self.by_cell.get(c.id, ())]
        if not pools:
            n = sum(len(c.pools) for c in cells)
            return [(f"no pool in {regions} shares devices (the {n} matching "
                     f"{'pools lease' if n != 1 else 'pool leases'} whole devices only)")], True
        small = [(c, sp) for c, sp in pools if sp.min_milli <= milli]
        if not small:
            least = min(sp.min_milli for _, sp in pools)
            return [(f"no sharing pool in {regions} places a share of {milli} milli "
                     f"(smallest share allowed: {least} milli)")], True
        fitting = [(c, sp) for c, sp in small if milli <= sp.max_milli]
        if not fitting:
            most = max(sp.max_milli for _, sp in small)
            return [(f"no sharing pool in {regions} places a share of {milli} milli "
                     f"(largest share allowed: {most} milli)")], True
        small = fitting
        if need_gib:
            roomy = [(c, sp) for c, sp in small if sp.slice_gib(milli) >= need_gib]
            if not roomy:
                most = max(sp.slice_gib(milli) for _, sp in small)
                return [(f"no sharing pool in {regions} gives a {milli}-milli share {_num(need_gib)} GB of "
                         f"memory (most: {_num(most)} GB)")], True
            small = roomy
        billing = ctx.billing
        offering = [(c, sp) for c, sp in small if getattr(c.pools[sp.pool_id], billing) is not None]
        if not offering:
            return [f"no sharing pool in {regions} offers {billing}"], True
        reached = [(c, sp) for c, sp in offering if ctx.region(c.region) is not None]
        if not reached:
            return [f"no sharing pool in {regions} can receive data from {ctx.data_region}"], True
        fraction = Decimal(milli) / _MILLI
        if ctx.cap is not None:
            cheapest = min(getattr(c.pools[sp.pool_id], billing) * fraction for c, sp in reached)
            if cheapest > ctx.cap:
                return [(f"cheapest {milli}-milli share costs {_money(cheapest / ctx.hour_div)}/hour, "
                         f"above your max {_money(ask.max_price)}")], True  # type: ignore[arg-type]
            reached = [(c, sp) for c, sp in reached if getattr(c.pools[sp.pool_id], billing) * fraction <= ctx.cap]
        left = [(c, sp) for c, sp in reached if sp.pool_id not in ctx.exclude]
        if not left:
            return [f"all {len(reached)} matching sharing pools are excluded"], False
        largest = max(sp.top for _, sp in left)
        return [(f"no device in {_few(c.region for c, _ in left)} has {milli} milli free; "
                 f"largest free slice is {largest}")], False



def _close(a: tuple[TypicalAsk, ...], b: tuple[TypicalAsk, ...]) -> bool:
    """Total variation distance below ``DRIFT`` (never for an empty mix)."""
    if not a or not b:
        return False
    wa, wb = {t.ask: t.weight for t in a}, {t.ask: t.weight for t in b}
    return sum(abs(wa.get(k, 0.0) - wb.get(k, 0.0)) for k in wa.keys() | wb.keys()) / 2 < DRIFT
