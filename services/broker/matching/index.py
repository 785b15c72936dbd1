"""The engine's index: cells of interchangeable pools, and per-cell price books.

A **cell** groups the pools that are identical in every attribute the matcher filters
or ranks on, except price, free/capacity and identity: model, region, country, vendor,
stack, frameworks, memory, interconnect, host arch, currency, TFLOPS figures, egress
bandwidth and the workload kinds delivered. In practice that is at most a few cells per
(model, region). Static filters
(model, memory, residency, latency, currency, ...) are therefore decided once per cell,
never per pool.

A **book** is one cell's pools that offer one billing mode, grouped into price levels
(ascending). Each level keeps ``(free, pool_id)`` sorted and its sum of free units, and a
segment tree over the levels keeps the max free units, so that

* "cheapest level with a pool that has >= n free" is one O(log L) descent,
* "best fit inside that level" is one bisect,
* a change of a pool's free units is O(level) + O(log L) (the climb stops as soon as a
  maximum is unchanged),
* the maximum of free units below a price cap is O(log L), the sum O(L) (in C).

Capacity (free ignoring leases) only changes when a pool is re-registered, which
rebuilds the cell, so it is kept as plain prefix arrays.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator
from decimal import Decimal

from .devices import MILLI
from .model import PoolState

BILLINGS = ("on_demand", "reserved_month", "reserved_year", "interruptible")

CellKey = tuple


def cell_key(pool: PoolState) -> CellKey:
    return (pool.model, pool.region, pool.country, pool.vendor, pool.stack,
            frozenset(pool.frameworks), float(pool.memory_gib), pool.interconnect,
            pool.host_arch, pool.currency, float(pool.bf16_tflops), float(pool.fp16_tflops),
            float(pool.fp8_tflops or 0.0), float(pool.egress_gbps), pool.delivery,
            pool.max_milli >= MILLI)  # whole: the pool sells whole devices (not slices only)


class Book:
    """The pools of one cell that offer one billing mode, by price level."""

    __slots__ = ("_caps", "_min_ppv", "billing", "cap_max", "cap_sum", "floor", "index", "levels", "mx",
                 "lsum", "pools", "prices", "size", "total")

    def __init__(self, billing: str, pools: dict[str, PoolState],
                 entries: list[tuple[Decimal, PoolState]]) -> None:
        self.billing = billing
        self.pools = pools  # the cell's pools (shared), for prices and capacities
        self._caps: list[tuple[int, str]] | None = None
        self._min_ppv: dict[str, Decimal] = {}
        groups: dict[Decimal, list[PoolState]] = {}
        for price, pool in entries:
            groups.setdefault(price, []).append(pool)
        self.prices: list[Decimal] = sorted(groups)
        self.index: dict[Decimal, int] = {p: i for i, p in enumerate(self.prices)}
        self.levels: list[list[tuple[int, str]]] = []
        self.cap_max: list[int] = []  # prefix max of capacity over levels [0, i]
        self.cap_sum: list[int] = []  # prefix sum of capacity over levels [0, i]
        run_max = run_sum = 0
        for price in self.prices:
            members = groups[price]
            self.levels.append(sorted((p.free, p.pool_id) for p in members))
            for p in members:
                if p.capacity > run_max:
                    run_max = p.capacity
                run_sum += p.capacity
            self.cap_max.append(run_max)
            self.cap_sum.append(run_sum)
        n = len(self.prices)
        size = 1
        while size < n:
            size <<= 1
        self.size = size
        mx = [0] * (2 * size)
        for i, level in enumerate(self.levels):
            mx[size + i] = level[-1][0]
        for i in range(size - 1, 0, -1):
            a, b = mx[2 * i], mx[2 * i + 1]
            mx[i] = a if a > b else b
        self.mx = mx  # segment tree: max free per level, root at 1
        # the cheapest level with any free unit (-1: none): a lower bound on the price of
        # any pool that can take a unit, which orders the engine's walk over cells
        self.floor = self.first(0, 1)
        self.lsum = [sum(f for f, _ in level) for level in self.levels]  # free per level
        self.total = sum(self.lsum)

    # --- queries -------------------------------------------------------------------
    def first(self, lo: int, need: int) -> int:
        """The lowest level index >= ``lo`` holding a pool with >= ``need`` free
        (``need`` >= 1), or -1. O(log L)."""
        size = self.size
        if lo >= size:
            return -1
        mx = self.mx
        i = lo + size
        if mx[i] >= need:
            return lo
        while True:
            while i & 1:
                if i == 1:
                    return -1
                i >>= 1
            i += 1
            if mx[i] >= need:
                break
        while i < size:
            i <<= 1
            if mx[i] < need:
                i += 1
        return i - size

    def prefix(self, hi: int) -> tuple[int, int]:
        """(max free, total free) over levels [0, hi). O(log L)."""
        if hi >= len(self.prices):
            return self.mx[1], self.total
        if hi <= 0:
            return 0, 0
        mx = self.mx
        total = sum(self.lsum[:hi])
        lo, hi = self.size, self.size + hi
        best = 0
        while lo < hi:
            if lo & 1:
                if mx[lo] > best:
                    best = mx[lo]
                lo += 1
            if hi & 1:
                hi -= 1
                if mx[hi] > best:
                    best = mx[hi]
            lo >>= 1
            hi >>= 1
        return best, total

    def capacity_prefix(self, hi: int) -> tuple[int, int]:
        """(max capacity, total capacity) over levels [0, hi)."""
        if hi <= 0:
            return 0, 0
        hi = min(hi, len(self.prices))
        return self.cap_max[hi - 1], self.cap_sum[hi - 1]

    @property
    def floor_price(self) -> Decimal:
        """The price of the cheapest level with a free unit. With none free, the top
        price: no pool can be used, so any bound holds, and this one keeps the book last
        among its peers."""
        return self.prices[self.floor] if self.floor >= 0 else self.prices[-1]

    def min_ppv(self, metric: str, tflops: float) -> Decimal:
        """Price per TFLOPS of ``metric`` at the floor (cached until the floor moves)."""
        ppv = self._min_ppv.get(metric)
        if ppv is None:
            ppv = self._min_ppv[metric] = self.floor_price / Decimal(repr(float(tflops)))
        return ppv

    def price(self, pool_id: str) -> Decimal:
        return getattr(self.pools[pool_id], self.billing)

    def iter_largest(self, cap: Decimal | None, exclude: frozenset[str]) -> Iterator[tuple[int, str]]:
        """(free, pool id) of pools with free > 0, largest first, skipping excluded pools
        and pools priced above ``cap``: a lazy merge of the levels within the cap."""
        hi = len(self.prices) if cap is None else bisect_right(self.prices, cap)
        levels = self.levels[:hi]
        merged = levels[0][::-1] if len(levels) == 1 else \
            heapq.merge(*(reversed(level) for level in levels), reverse=True)
        for free, pid in merged:
            if free <= 0:
                return
            if pid not in exclude:
                yield free, pid

    def iter_capacity(self, cap: Decimal | None) -> Iterator[tuple[int, str]]:
        """(capacity, pool id) of pools priced within ``cap``, largest first."""
        hi = len(self.prices) if cap is None else bisect_right(self.prices, cap)
        if hi < len(self.prices) and 2 * hi <= len(self.prices):
            pools = self.pools
            entries = [(pools[pid].capacity, pid) for level in self.levels[:hi] for _, pid in level]
            entries.sort(reverse=True)
            yield from entries
            return
        if self._caps is None:
            self._caps = sorted(((p.capacity, pid) for pid, p in self.pools.items()
                                 if getattr(p, self.billing) is not None), reverse=True)
        pools, billing = self.pools, self.billing
        for capacity, pid in self._caps:
            if capacity <= 0:
                return
            if hi == len(self.prices) or getattr(pools[pid], billing) <= cap:
                yield capacity, pid

    # --- updates -------------------------------------------------------------------
    def update(self, price: Decimal, pool_id: str, old: int, new: int) -> bool:
        """Returns whether the floor (cheapest level with a free unit) moved."""
        li = self.index[price]
        level = self.levels[li]
        del level[bisect_left(level, (old, pool_id))]
        insort(level, (new, pool_id))
        d = new - old
        self.lsum[li] += d
        self.total += d
        mx = self.mx
        i = li + self.size
        top = level[-1][0]
        was = mx[i]
        if was == top:
            return False
        mx[i] = top
        i >>= 1
        while i:
            a, b = mx[2 * i], mx[2 * i + 1]
            m = a if a > b else b
            if mx[i] == m:
                break  # unchanged from here up
            mx[i] = m
            i >>= 1
        floor = self.floor
        if top > 0 and was <= 0 and (floor < 0 or li < floor):
            self.floor = li
        elif top <= 0 and was > 0 and li == floor:
            self.floor = self.first(li + 1, 1)
        else:
            return False
        self._min_ppv.clear()
        return True


class Cell:
    """Pools that are interchangeable for every static constraint."""

    __slots__ = ("bf16", "books", "country", "currency", "delivery", "egress_gbps", "fp16", "fp8",
                 "frameworks", "host_arch", "id", "interconnect", "key", "memory_gib", "model",
                 "pools", "region", "stack", "vendor", "whole")

    def __init__(self, cell_id: int, key: CellKey) -> None:
        self.id = cell_id
        self.key = key
        (self.model, self.region, self.country, self.vendor, self.stack, self.frameworks,
         self.memory_gib, self.interconnect, self.host_arch, self.currency, self.bf16,
         self.fp16, self.fp8, self.egress_gbps, self.delivery, self.whole) = key
        self.pools: dict[str, PoolState] = {}
        self.books: dict[str, Book] = {}

    def tflops(self, metric: str) -> float:
        if metric == "bf16":
            return self.bf16
        if metric == "fp16":
            return self.fp16
        return self.fp8

    def rebuild(self) -> None:
        books: dict[str, Book] = {}
        pools = list(self.pools.values())
        for billing in BILLINGS:
            entries = [(price, p) for p in pools if (price := getattr(p, billing)) is not None]
            if entries:
                books[billing] = Book(billing, self.pools, entries)
        self.books = books

    def __repr__(self) -> str:
        return f"Cell({self.id}, {self.model}@{self.region}, {len(self.pools)} pools)"
