"""The matching engine: pools in, ranked placements (or reasons) out.

Pure and synchronous: no clock, no I/O, no randomness. See ``docs/matching.md`` for the
model (constraints, cost, time, shapes, normalised performance, tiebreaks, reasons) and
the index design; ``index.py`` holds the data structures.

Complexity per decision (C = candidate cells after the static filters, L = price levels
in a cell, k = ``limit``):

* static filters: per-dimension cell sets from inverted indexes (attribute value ->
  cell ids), intersected in C; the sets, their intersection and the sorted candidate
  list are cached per request shape (dropped when a cell is created, re-indexed or the
  topology changes), so a repeated shape costs O(1) here;
* gang: cells are visited in order of a lower bound on cost and the scan stops as soon
  as the bound passes the k-th best option; each visited cell costs O(log L) for "is
  there a pool with n free" and O(log L + k) to take its best k (best fit);
* split: a lazy k-way merge over the cells' price levels, cheapest units first, touching
  only the levels it takes units from, per region set tried; when the pool budget
  binds, each further pick is one O(log L) query per cell (``_fill_exact``);
* ``set_free``: O(level) + O(log L) per billing mode the pool offers; ``upsert`` /
  ``remove``: O(1), the cell is re-indexed on the next ``match`` (O(cell log cell));
* reasons (only when nothing fits): O(C log L), touching pools only for exclusions and
  the largest-pools checks.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right, insort
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from itertools import chain, combinations

import msgspec

from services.common.messages import Topology
from services.common.network import Network

from .devices import MILLI
from .index import Book, Cell, cell_key
from .model import HOURS_PER_MONTH, Allocation, Ask, Decision, Placement, PoolState
from .reliability import PRIOR_SCORE, Scores, touches
from .shares import Shares
from .texts import few as _few
from .texts import fmt_money as _fmt_money
from .texts import fmt_num as _fmt_num

__all__ = ["Engine"]

ZERO = Decimal(0)
MICRO = Decimal("0.000001")
YEAR_MONTHS = Decimal(12)
_INF = float("inf")
_REL_EPS = 1e-9  # relative tolerance on TFLOPS sums (floats)
_CACHE_MAX = 4096  # entries per request cache before it is dropped
_ORDER_CACHE_MAX = 256  # sorted candidate lists are larger: keep fewer
_SUBSET_BUDGET = 20_000  # region subsets tried when looking for any feasible split
# cell attributes with an inverted index (value -> cell ids)
_INDEXED = ("model", "region", "country", "vendor", "stack", "interconnect", "host_arch",
            "currency")

# what a pool that delivers a workload kind delivers, for reasons ("no pool in cn-gz delivers containers")
DELIVERED = {"ssh": "ssh access", "process": "processes", "container": "containers", "slurm": "slurm jobs"}

# one candidate pick inside a placement: (cell, unit price, pool id, free before, units)
Pick = tuple[Cell, Decimal, str, int, int]
# a candidate cell for one billing mode: (lower bound on price per unit of value, cell, book)
Row = tuple[Decimal, Cell, Book]


def _units_for(remaining: float, per_unit: float) -> int:
    """Units of ``per_unit`` TFLOPS needed to deliver ``remaining`` (rounded up)."""
    u = math.ceil(remaining / per_unit)
    if u > 1 and (u - 1) * per_unit >= remaining * (1 - 1e-12):
        u -= 1
    return max(u, 1)


def _dec(x: float) -> Decimal:
    return Decimal(repr(float(x)))




class _Ctx:
    """Everything about one ask that the search needs, computed once."""

    __slots__ = ("ask", "basis", "billing", "cap", "currency", "data_dec", "data_gb",
                 "data_region", "eps", "exclude", "factor", "hour_div", "links", "metric",
                 "need", "need_lo_f", "perf", "rank", "time_obj", "_info", "_units", "_vdec")

    def __init__(self, ask: Ask, links: Network, scores: Scores) -> None:
        self.ask = ask
        self.links = links
        billing = self.billing = ask.billing
        if billing in ("on_demand", "interruptible"):
            self.factor = Decimal(ask.hours)
            self.hour_div = Decimal(1)
            self.basis = "unit_hour"
        elif billing == "reserved_month":
            self.factor = Decimal(1)
            self.hour_div = HOURS_PER_MONTH
            self.basis = "unit_month"
        elif billing == "reserved_year":
            self.factor = YEAR_MONTHS
            self.hour_div = HOURS_PER_MONTH
            self.basis = "unit_month"
        else:
            raise ValueError(f"unknown billing {billing!r}")
        if ask.max_price is None:
            self.cap = None
        else:
            self.cap = ask.max_price * self.hour_div  # in the book's unit (hour or month)
        self.metric = ask.metric
        if ask.units is None:
            if ask.min_tflops is None or not ask.min_tflops > 0:
                raise ValueError("an ask needs units >= 1 or min_tflops > 0")
            self.perf = True
            self.need: float | int = float(ask.min_tflops)
            self.eps = self.need * _REL_EPS
            need_lo = _dec(self.need * (1 - _REL_EPS))
        else:
            if ask.units < 1:
                raise ValueError("an ask needs units >= 1 or min_tflops > 0")
            self.perf = False
            self.need = int(ask.units)
            self.eps = 0
            need_lo = Decimal(self.need)
        self.need_lo_f = need_lo * self.factor
        self.exclude = ask.exclude_pools if ask.min_reliability is None else \
            scores.exclusion(ask.exclude_pools, ask.min_reliability)
        # None: the price order is the expected-cost order
        self.rank = None if ask.failover_cost <= 0 else scores.ranking(ask.failover_cost)
        self.currency = ask.currency
        if ask.data_region and ask.data_gb > 0:
            self.data_region = ask.data_region
            self.data_gb = float(ask.data_gb)
            self.data_dec = _dec(ask.data_gb)
        else:
            self.data_region = None
            self.data_gb = 0.0
            self.data_dec = ZERO
        self.time_obj = ask.objective == "time" and self.data_gb > 0
        self._info: dict[str, tuple[Decimal, float] | None] = {}
        self._units: dict[int, int] = {}
        self._vdec: dict[int, Decimal] = {}

    # --- per region / per cell -----------------------------------------------------
    def region(self, region: str) -> tuple[Decimal, float] | None:
        """(transfer cost, link bandwidth Gbit/s) of moving the ask's data to
        ``region``; None if it cannot be priced (no link, or a paid link in another
        currency than the ask's)."""
        try:
            return self._info[region]
        except KeyError:
            pass
        info: tuple[Decimal, float] | None
        if self.data_region is None:
            info = (ZERO, _INF)
        elif self.links.is_unlocated(region) or self.links.is_unlocated(self.data_region):
            info = None  # no distance is made up for a place nobody knows, not even 0
        else:
            link = self.links.link(self.data_region, region)
            if link is None and region != self.data_region:
                link = self.links.link(region, self.data_region)
            if link is None:
                info = (ZERO, _INF) if region == self.data_region else None
            else:
                cost = self.data_dec * link.egress_per_gb
                if cost and link.currency != self.currency:
                    info = None
                else:
                    info = (cost, float(link.bandwidth_gbps))
        self._info[region] = info
        return info

    def time_for(self, info: tuple[Decimal, float], egress_gbps: float) -> float:
        """Seconds to move the data over a link of ``info`` into a pool whose egress
        (ingress) bandwidth is ``egress_gbps``."""
        if not self.data_gb:
            return 0.0
        bw = min(info[1], egress_gbps)
        return self.data_gb * 8 / bw if bw > 0 else _INF

    def cell_time(self, cell: Cell, info: tuple[Decimal, float]) -> float:
        return self.time_for(info, cell.egress_gbps)

    def value(self, cell: Cell) -> float | int:
        """What one unit of ``cell`` contributes to the ask's need (1, or TFLOPS)."""
        return cell.tflops(self.metric) if self.perf else 1

    def units(self, cell: Cell) -> int:
        """Units of ``cell`` that one gang placement needs."""
        if not self.perf:
            return self.need  # type: ignore[return-value]
        u = self._units.get(cell.id)
        if u is None:
            u = self._units[cell.id] = _units_for(self.need, cell.tflops(self.metric))
        return u

    def units_left(self, cell: Cell, remaining: float | int) -> int:
        if not self.perf:
            return remaining  # type: ignore[return-value]
        return _units_for(remaining, cell.tflops(self.metric))

    def ppv(self, cell: Cell, price: Decimal) -> Decimal:
        """Price per unit of value: per unit, or per TFLOPS for performance asks."""
        if not self.perf:
            return price
        v = self._vdec.get(cell.id)
        if v is None:
            v = self._vdec[cell.id] = _dec(cell.tflops(self.metric))
        return price / v

    def hi(self, book: Book) -> int:
        """Number of price levels of ``book`` within the ask's max price."""
        if self.cap is None:
            return len(book.prices)
        return bisect_right(book.prices, self.cap)


def _location_checks(ask: Ask) -> list[str]:
    """The ask's constraints that need to know where a pool is (empty: it may run in a
    region of unknown location)."""
    checks = []
    if ask.users_region is not None and ask.max_latency_ms is not None:
        checks.append(f"latency to users in {ask.users_region}")
    if ask.countries:
        checks.append("residency")
    if ask.data_region is not None:
        checks.append(f"distance to data in {ask.data_region}")
    return checks


def _row_key(row: Row) -> tuple[Decimal, int]:
    return row[0], row[1].id


def _move(rows: list[Row], old: Row, new: Row) -> None:
    """Replace ``old`` by ``new`` in ``rows``, which stay sorted by ``_row_key``."""
    del rows[bisect_left(rows, _row_key(old), key=_row_key)]
    insort(rows, new, key=_row_key)


class _Moves:
    """The cells whose floor moved, in order; ``epoch`` counts them. Only the recent
    ones are kept: an order older than that re-sorts in full."""

    KEEP = 4096

    def __init__(self) -> None:
        self.base = 0
        self.cells: list[Cell] = []

    @property
    def epoch(self) -> int:
        return self.base + len(self.cells)

    def add(self, cell: Cell) -> None:
        if len(self.cells) >= self.KEEP:
            self.base += len(self.cells)
            self.cells = []
        self.cells.append(cell)

    def since(self, epoch: int) -> list[Cell] | None:
        if epoch < self.base:
            return None
        return self.cells[epoch - self.base:]


class _Order:
    """The candidate cells of one request shape that offer one billing mode, sorted by
    their cheapest price per unit of value (a lower bound on any of their pools), and
    the same rows grouped by region and by (region, egress bandwidth). Cached per
    (static constraints, billing) until a cell is re-indexed."""

    __slots__ = ("_by_region", "_groups", "_max_egress", "epoch", "metric", "row_of", "rows")

    def __init__(self, ctx: _Ctx, cells: list[Cell], epoch: int) -> None:
        self.metric = ctx.metric if ctx.perf else None
        self.sort([(c, book) for c in cells if (book := c.books.get(ctx.billing)) is not None], epoch)

    def bound(self, cell: Cell, book: Book) -> Decimal:
        """A lower bound on the price (per unit of value) of any pool of ``book`` that
        can take a unit: its floor. It moves as pools fill up and empty; a bound from
        the cheapest price ever offered would let the walk wade through every cell whose
        cheap pools are long taken."""
        metric = self.metric
        return book.floor_price if metric is None else book.min_ppv(metric, cell.tflops(metric))

    def sort(self, offering: list[tuple[Cell, Book]], epoch: int) -> None:
        rows = [(self.bound(c, book), c.id, c, book) for c, book in offering]
        rows.sort()  # (bound, cell id) is unique: cells and books are never compared
        self.rows: list[Row] = [(ppv, c, book) for ppv, _, c, book in rows]
        self.row_of = {row[1].id: row for row in self.rows}  # cell id -> its row
        self._reset(epoch)

    def _reset(self, epoch: int) -> None:
        self.epoch = epoch
        self._by_region: dict[str, list[Row]] | None = None
        self._groups: dict[tuple[str, float], list[Row]] | None = None
        self._max_egress: dict[str, float] = {}

    def refresh(self, moves: _Moves) -> None:
        """Catch up with the floors that moved since this order was last used: the rows
        of those cells move to their new place, here and in the per-region and
        per-group views (a full re-sort only when the engine no longer remembers the
        moves, or they are more than a quarter of the rows)."""
        if self.epoch == moves.epoch:
            return
        since = moves.since(self.epoch)
        if since is None or 4 * len(since) > len(self.rows) + 64:
            self.sort([(c, book) for _, c, book in self.rows], moves.epoch)
            return
        row_of = self.row_of
        for cell in dict.fromkeys(since):
            old = row_of.get(cell.id)
            if old is None:
                continue
            new = (self.bound(cell, old[2]), cell, old[2])
            if new[0] == old[0]:
                continue
            _move(self.rows, old, new)
            if self._by_region is not None:
                _move(self._by_region[cell.region], old, new)
            if self._groups is not None:
                _move(self._groups[(cell.region, cell.egress_gbps)], old, new)
            row_of[cell.id] = new
        self.epoch = moves.epoch

    @property
    def by_region(self) -> dict[str, list[Row]]:
        if self._by_region is None:
            self._by_region = {}
            for row in self.rows:
                c = row[1]
                self._by_region.setdefault(c.region, []).append(row)
                if c.egress_gbps > self._max_egress.get(c.region, 0.0):
                    self._max_egress[c.region] = c.egress_gbps
        return self._by_region

    @property
    def max_egress(self) -> dict[str, float]:
        self.by_region  # noqa: B018 (computed together)
        return self._max_egress

    @property
    def groups(self) -> dict[tuple[str, float], list[Row]]:
        if self._groups is None:
            self._groups = {}
            for row in self.rows:
                c = row[1]
                self._groups.setdefault((c.region, c.egress_gbps), []).append(row)
        return self._groups

    def merged(self, regions: Iterable[str]) -> list[Row]:
        rows = [row for r in regions for row in self.by_region[r]]
        rows.sort(key=lambda row: (row[0], row[1].id))
        return rows


LOCAL_ROUNDS = 3  # whole asks on sharing pools: looks again without the pools that failed, before the sweep


class Engine:
    """Indexed matcher over pool states. Not thread-safe; one per broker process."""

    def __init__(self, topology: Topology) -> None:
        self._pools: dict[str, PoolState] = {}
        self._cell_of: dict[str, Cell] = {}
        self._cells: list[Cell] = []
        self._cell_by_key: dict[tuple, Cell] = {}
        self._dirty: set[Cell] = set()
        self._dims: dict[tuple, frozenset[int]] = {}
        self._cands: dict[tuple, list[Cell]] = {}
        self._orders: dict[tuple, _Order] = {}
        self._moves = _Moves()  # cells whose floor moved: cached orders catch up on use
        self._live: frozenset[int] | None = None
        self._attr_index: dict[str, dict[object, set[int]]] = {a: {} for a in _INDEXED}
        self._fw_index: dict[str, set[int]] = {}
        self.reliability = Scores()
        self._delivery_index: dict[str, set[int]] = {}  # workload kind -> cells that deliver it
        self._slices_only: set[int] = set()  # cells of pools that sell slices only (Sharing.max_milli < 1000)
        self._shares = Shares()  # pools that share devices: per-device state (shares.py)
        self.set_topology(topology)

    def set_reliability(self, scores: dict[str, float]) -> None:
        """Pool id -> score for every pool with a record (docs/reliability.md); the
        others score the prior."""
        self.reliability.set(scores, {pool_id: cell.id for pool_id, cell in self._cell_of.items()})

    # --- state ---------------------------------------------------------------------
    def set_topology(self, topology: Topology | Network) -> None:
        """A ``Network`` is used as it is (and may be changed in place: call this again
        after a change); a ``Topology`` is read into one."""
        self.topology = topology
        self._links = topology if isinstance(topology, Network) else Network(topology.regions, topology.links)
        self._invalidate()

    def upsert(self, pool: PoolState) -> None:
        """Add or replace a pool (the engine keeps its own copy)."""
        pool = msgspec.structs.replace(pool, free=max(0, int(pool.free)))
        if pool.pool_id in self._pools:
            self._detach(pool.pool_id)
        key = cell_key(pool)
        cell = self._cell_by_key.get(key)
        if cell is None:
            cell = Cell(len(self._cells), key)
            self._cells.append(cell)
            self._cell_by_key[key] = cell
            for attr, index in self._attr_index.items():
                index.setdefault(getattr(cell, attr), set()).add(cell.id)
            for fw in cell.frameworks:
                self._fw_index.setdefault(fw, set()).add(cell.id)
            for kind in cell.delivery:
                self._delivery_index.setdefault(kind, set()).add(cell.id)
            if not cell.whole:
                self._slices_only.add(cell.id)
            self._invalidate()
        cell.pools[pool.pool_id] = pool
        self._cell_of[pool.pool_id] = cell
        self._pools[pool.pool_id] = pool
        self._dirty.add(cell)
        if self.reliability.scores:
            self.reliability.joined(pool.pool_id, cell.id)
        if pool.sharing != "none" or pool.pool_id in self._shares.pools:
            self._shares.upsert(pool, cell.id)

    def remove(self, pool_id: str) -> None:
        if pool_id in self._pools:
            self._detach(pool_id)
            self._shares.remove(pool_id)

    def set_devices(self, pool_id: str, free: Mapping[int, int]) -> None:
        """Free milli of devices of a sharing pool (device index -> 0..1000, absolute, as
        Redis says them: an allocation event's ``devices_free_after``, or the whole
        per-device hash); unknown pools and indices are ignored. The pool's ``free``
        (devices with all 1000 free) is set apart, by ``set_free``, as for any pool."""
        sp = self._shares.pools.get(pool_id)
        if sp is not None:
            sp.set(free)

    def shared_devices(self) -> dict[str, dict[int, int]]:
        """Free milli per device of every sharing pool (a snapshot to restore with
        ``set_devices``)."""
        return {pid: sp.free_milli() for pid, sp in self._shares.pools.items()}

    def device_free(self, pool_id: str, index: int) -> int:
        """Free milli of one device of a sharing pool (0 if there is no such device)."""
        sp = self._shares.pools.get(pool_id)
        return sp.get(index) if sp is not None and 0 <= index < sp.capacity else 0

    def devices(self, pool_id: str) -> dict[int, int] | None:
        """Free milli per device of a sharing pool (None: not a sharing pool here)."""
        sp = self._shares.pools.get(pool_id)
        return None if sp is None else sp.free_milli()

    def set_free(self, pool_id: str, free: int) -> None:
        pool = self._pools.get(pool_id)
        if pool is None:
            return
        free = max(0, int(free))
        old = pool.free
        if old == free:
            return
        pool.free = free
        cell = self._cell_of[pool_id]
        if cell in self._dirty:
            return  # re-indexed on the next match
        for billing, book in cell.books.items():
            price = getattr(pool, billing)
            if price is not None and book.update(price, pool_id, old, free):
                self._moves.add(cell)

    def free_units(self) -> dict[str, int]:
        """Free units of every pool (a snapshot to restore with ``set_free``)."""
        return {pid: pool.free for pid, pool in self._pools.items()}

    def get(self, pool_id: str) -> PoolState | None:
        """The engine's view of a pool (read-only: change it through the methods)."""
        return self._pools.get(pool_id)

    def __len__(self) -> int:
        return len(self._pools)

    def _detach(self, pool_id: str) -> None:
        del self._pools[pool_id]
        cell = self._cell_of.pop(pool_id)
        del cell.pools[pool_id]
        self._dirty.add(cell)

    def _invalidate(self) -> None:
        self._live = None
        self._dims.clear()
        self._cands.clear()
        self._orders.clear()

    def _flush(self) -> None:
        if self._dirty:
            for cell in self._dirty:
                cell.rebuild()
            self._dirty.clear()
            self._orders.clear()
            self._live = None

    # --- static filters --------------------------------------------------------------
    def _latency(self, src: str, dst: str) -> float:
        ms = self._links.rtt_ms(src, dst)
        if ms is None:
            ms = self._links.rtt_ms(dst, src)
        if ms is None:
            return 0.0 if src == dst and not self._links.is_unlocated(src) else _INF
        return float(ms)

    def _dim(self, key: tuple, compute: Callable[[], frozenset[int]]) -> frozenset[int]:
        s = self._dims.get(key)
        if s is None:
            if len(self._dims) > _CACHE_MAX:
                self._dims.clear()
            s = self._dims[key] = compute()
        return s

    def _union(self, attr: str, values: Iterable[object]) -> frozenset[int]:
        """Ids of cells whose ``attr`` is one of ``values`` (inverted index)."""
        index = self._attr_index[attr]
        out: set[int] = set()
        for v in values:
            ids = index.get(v)
            if ids:
                out |= ids
        return frozenset(out)

    def _scan(self, pred: Callable[[Cell], bool]) -> frozenset[int]:
        return frozenset(c.id for c in self._cells if pred(c))

    def _dim_list(self, ask: Ask, perf: bool) -> list[tuple[str, tuple, Callable[[], frozenset[int]]]]:
        """The active static dimensions of ``ask`` as (name, cache key, compute the set
        of matching cell ids), in the order reasons report them."""
        dims: list[tuple[str, tuple, Callable[[], frozenset[int]]]] = []
        for name, attr in (("models", "model"), ("regions", "region"), ("located", ""),
                           ("countries", "country"), ("vendors", "vendor"), ("stacks", "stack")):
            if name == "located":
                if self._links.unlocated and _location_checks(ask):
                    dims.append(("located", ("located",), lambda: self._scan(
                        lambda c: not self._links.is_unlocated(c.region))))
                continue
            values = getattr(ask, name)
            if values:
                dims.append((name, (name, values),
                             lambda attr=attr, values=values: self._union(attr, values)))
        if ask.frameworks:
            fw = ask.frameworks
            dims.append(("frameworks", ("frameworks", fw), lambda: frozenset(
                set.intersection(*(self._fw_index.get(f, set()) for f in fw)))))
        for name, attr in (("interconnects", "interconnect"), ("host_archs", "host_arch")):
            values = getattr(ask, name)
            if values:
                dims.append((name, (name, values),
                             lambda attr=attr, values=values: self._union(attr, values)))
        if ask.min_memory_gib > 0:
            mem = float(ask.min_memory_gib)
            dims.append(("memory", ("memory", mem),
                         lambda: self._scan(lambda c: c.memory_gib >= mem)))
        if perf:
            metric = ask.metric
            dims.append(("metric", ("metric", metric),
                         lambda: self._scan(lambda c: c.tflops(metric) > 0)))
        if ask.users_region is not None and ask.max_latency_ms is not None:
            users, ms = ask.users_region, float(ask.max_latency_ms)
            dims.append(("latency", ("latency", users, ms), lambda: self._union(
                "region", self._links.within(users, ms, list(self._attr_index["region"])))))
        if ask.delivery is not None:
            kind = ask.delivery
            dims.append(("delivery", ("delivery", kind), lambda: frozenset(self._delivery_index.get(kind, ()))))
        if ask.milli >= MILLI and self._slices_only:  # whole devices: never a pool that sells slices only
            dims.append(("whole", ("whole",), lambda: self._scan(lambda c: c.whole)))
        currency = ask.currency
        dims.append(("currency", ("currency", currency),
                     lambda: self._union("currency", (currency,))))
        return dims

    def _candidates(self, ask: Ask, perf: bool) -> tuple[tuple, list[Cell]]:
        key = (ask.models, ask.vendors, ask.stacks, ask.frameworks, ask.interconnects,
               ask.host_archs, ask.min_memory_gib, ask.regions, ask.countries,
               ask.users_region if ask.max_latency_ms is not None else None,
               ask.max_latency_ms, ask.currency, ask.metric if perf else None,
               ask.data_region is not None, ask.delivery, ask.milli >= MILLI)
        hit = self._cands.get(key)
        if hit is None:
            s: frozenset[int] | None = None
            for _, dkey, compute in self._dim_list(ask, perf):
                d = self._dim(dkey, compute)
                s = d if s is None else s & d
            if len(self._cands) > _CACHE_MAX:
                self._cands.clear()
            hit = self._cands[key] = [self._cells[i] for i in sorted(s or ())]
        return key, hit

    def _order(self, ctx: _Ctx, key: tuple, cells: list[Cell]) -> _Order:
        okey = (key, ctx.billing)
        hit = self._orders.get(okey)
        if hit is None:
            if len(self._orders) >= _ORDER_CACHE_MAX:
                del self._orders[next(iter(self._orders))]  # oldest first
            hit = self._orders[okey] = _Order(ctx, cells, self._moves.epoch)
        else:
            hit.refresh(self._moves)
        return hit

    # --- matching --------------------------------------------------------------------
    def match(self, ask: Ask, *, limit: int = 3) -> Decision:
        """Up to ``limit`` distinct placements for ``ask``, best first; or the reasons
        none fits (and whether none ever could: ``never``)."""
        self._flush()
        limit = max(1, int(limit))
        ctx = _Ctx(ask, self._links, self.reliability)
        key, cells = self._candidates(ask, ctx.perf)
        if ask.milli < 1000:  # a share of one device: only sharing pools (shares.py)
            return self._share(ctx, cells, limit)
        options = self._whole_options(ctx, key, cells, limit)
        if options and self._shares.pools:
            return self._on_shared(ask, options, limit)
        if options:
            return Decision(options=tuple(options))
        reasons, never = self._explain(ctx)
        return Decision(reasons=tuple(reasons), never=never)

    def _whole_options(self, ctx: _Ctx, key: tuple, cells: list[Cell], limit: int) -> list[Placement]:
        if not cells:
            return []
        order = self._order(ctx, key, cells)
        if not order.rows:
            return []
        return self._gang(ctx, order, limit) if ctx.ask.gang else self._split(ctx, order, limit)

    def _options_for(self, ask: Ask, limit: int) -> list[Placement]:
        ctx = _Ctx(ask, self._links, self.reliability)
        key, cells = self._candidates(ask, ctx.perf)
        return self._whole_options(ctx, key, cells, limit)

    def _share(self, ctx: _Ctx, cells: list[Cell], limit: int) -> Decision:
        if ctx.perf or ctx.need != 1:
            raise ValueError("a share is of one device: units 1, no min_tflops")
        options = self._shares.match(self, ctx, cells, limit) if cells else []
        if options:
            return Decision(options=tuple(options))
        reasons, never = self._shares.explain(self, ctx, cells) if cells else self._explain(ctx)
        return Decision(reasons=tuple(reasons), never=never)

    def _on_shared(self, ask: Ask, options: list[Placement], limit: int) -> Decision:
        """Whole units that landed on a sharing pool take devices with all 1000 free, on
        one node when they fit one: the options get their device hints; if none is left,
        the match runs again without the pools whose free devices are spread too thin."""
        first = options
        excluded: set[str] = set()
        for rounds_left in range(LOCAL_ROUNDS, -1, -1):
            kept, bad = self._shares.whole(ask, options, everywhere=rounds_left == 0, first=options is first)
            if kept or not bad:
                return Decision(options=tuple(kept))
            excluded |= bad
            retry = msgspec.structs.replace(ask, exclude_pools=ask.exclude_pools | excluded)
            if rounds_left == 0:
                again = self.match(retry, limit=limit)  # every pool that cannot fit is out: it ends here
                return again if again.placed else Decision(reasons=(self._shares.spread_reason(first, excluded),))
            options = self._options_for(retry, limit)
            if not options:
                break
            if not any(a.pool_id in self._shares.pools for o in options for a in o.allocations):
                return Decision(options=tuple(options))
        return Decision(reasons=(self._shares.spread_reason(first, excluded),))

    # --- gang: one pool, exact ---------------------------------------------------------
    def _gang(self, ctx: _Ctx, order: _Order, limit: int) -> list[Placement]:
        """The best ``limit`` single pools. Cells are visited in order of a lower bound
        on their objective key; the walk stops when the bound passes the current
        ``limit``-th best, so the answer is exact."""
        best: list[tuple] = []  # (k0, k1, stranded, pool_id, cell, price, units)
        cap = ctx.cap
        need_lo_f = ctx.need_lo_f
        # by expected cost: each pool's cost times its multiplier, bounded below by the lowest
        m_lo = ctx.rank[0] if ctx.rank is not None else None
        take = self._gang_cell if m_lo is None else self._gang_cell_rank
        if ctx.data_region is None:
            # no data: no transfer cost or time; the cells' price order is the bound order
            bound_f = need_lo_f if m_lo is None else need_lo_f * m_lo
            for ppv, cell, book in order.rows:
                if len(best) >= limit and ppv * bound_f > best[-1][0]:
                    break
                if m_lo is not None and len(best) >= limit and \
                        ppv * need_lo_f * ctx.rank[2](cell.id) > best[-1][0]:  # type: ignore[index]
                    continue  # no pool of this cell is reliable enough to beat what was found
                if cap is not None and book.floor_price > cap:
                    if ctx.perf:
                        continue
                    break  # unit asks: cells are in price order
                n = ctx.units(cell)
                if book.mx[1] >= n:
                    take(ctx, cell, book, n, ZERO, 0.0, best, limit)
        else:
            # k-way merge over (region, egress) groups: inside a group transfer cost and
            # time are the same, and cells are in price order
            heap = []
            groups = []
            for (region, egress), rows in order.groups.items():
                info = ctx.region(region)
                if info is None:
                    continue
                ctime = ctx.time_for(info, egress)
                g = len(groups)
                groups.append((rows, info[0], ctime))
                lbc = rows[0][0] * need_lo_f + info[0]
                if m_lo is not None:
                    lbc *= m_lo
                heap.append((ctime, lbc, g, 0) if ctx.time_obj else (lbc, ctime, g, 0))
            heapq.heapify(heap)
            while heap:
                k0, k1, g, j = heapq.heappop(heap)
                if len(best) >= limit:
                    w = best[-1]
                    if k0 > w[0] or (k0 == w[0] and k1 > w[1]):
                        break
                rows, transfer, ctime = groups[g]
                if j + 1 < len(rows):
                    lbc = rows[j + 1][0] * need_lo_f + transfer
                    if m_lo is not None:
                        lbc *= m_lo
                    heapq.heappush(heap, (ctime, lbc, g, j + 1) if ctx.time_obj
                                   else (lbc, ctime, g, j + 1))
                _, cell, book = rows[j]
                if cap is not None and book.floor_price > cap:
                    continue
                n = ctx.units(cell)
                if book.mx[1] >= n:
                    take(ctx, cell, book, n, transfer, ctime, best, limit)
        return [self._placement(ctx, [(cell, price, pid, stranded + n, n)])
                for _, _, stranded, pid, cell, price, n in best]

    def _gang_cell(self, ctx: _Ctx, cell: Cell, book: Book, n: int, transfer: Decimal,
                   ctime: float, best: list[tuple], limit: int) -> None:
        """Merge the best ``limit`` pools of ``cell`` with >= ``n`` free into ``best``:
        cheapest price level first, best fit (smallest free) inside a level."""
        prices, levels = book.prices, book.levels
        hi = ctx.hi(book)
        f = ctx.factor
        exclude = ctx.exclude
        time_obj = ctx.time_obj
        taken = 0
        li = book.first(0, n)
        while 0 <= li < hi:
            price = prices[li]
            cost = price * n * f + transfer
            k0, k1 = (ctime, cost) if time_obj else (cost, ctime)
            if len(best) >= limit:
                w = best[-1]
                if k0 > w[0] or (k0 == w[0] and k1 > w[1]):
                    return
            level = levels[li]
            for j in range(bisect_left(level, (n,)), len(level)):
                free, pid = level[j]
                if pid in exclude:
                    continue
                item = (k0, k1, free - n, pid, cell, price, n)
                if len(best) >= limit:
                    if item >= best[-1]:
                        break
                    insort(best, item)
                    best.pop()
                else:
                    insort(best, item)
                taken += 1
                if taken >= limit:
                    return
            li = book.first(li + 1, n)

    def _gang_cell_rank(self, ctx: _Ctx, cell: Cell, book: Book, n: int, transfer: Decimal,
                        ctime: float, best: list[tuple], limit: int) -> None:
        """``_gang_cell`` by expected cost: each pool's cost times its multiplier. Inside a
        level the pools' multipliers differ, so every pool of a level is weighed; levels
        stop once the cheapest could not enter ``best`` even at the lowest multiplier."""
        prices, levels = book.prices, book.levels
        hi = ctx.hi(book)
        f = ctx.factor
        exclude = ctx.exclude
        time_obj = ctx.time_obj
        _, mult, cell_mult = ctx.rank  # type: ignore[misc]
        m_lo = cell_mult(cell.id)  # no pool of the cell has a lower multiplier
        li = book.first(0, n)
        while 0 <= li < hi:
            price = prices[li]
            cost = price * n * f + transfer
            if len(best) >= limit:
                lb = cost * m_lo
                k0, k1 = (ctime, lb) if time_obj else (lb, ctime)
                w = best[-1]
                if k0 > w[0] or (k0 == w[0] and k1 > w[1]):
                    return
            level = levels[li]
            for j in range(bisect_left(level, (n,)), len(level)):
                free, pid = level[j]
                if pid in exclude:
                    continue
                expected = cost * mult(pid)
                item = (ctime, expected, free - n, pid, cell, price, n) if time_obj else \
                    (expected, ctime, free - n, pid, cell, price, n)
                if len(best) >= limit:
                    if item >= best[-1]:
                        continue
                    insort(best, item)
                    best.pop()
                else:
                    insort(best, item)
            li = book.first(li + 1, n)

    # --- split: up to max_pools pools in up to max_regions regions, greedy --------------
    def _split(self, ctx: _Ctx, order: _Order, limit: int) -> list[Placement]:
        """Options from a few greedy fills (see ``_fill``), ranked exactly:

        * one per region, regions in order of a lower bound on cost (or time), stopping
          when the bound passes the ``limit``-th best option found;
        * with ``max_regions`` > 1: cheapest units first across all regions, and the
          cheapest regions (by bound) until they hold enough;
        * if none of those fits, any region set that can (so a split is found whenever
          one exists)."""
        ask = ctx.ask
        max_pools = max(1, ask.max_pools)
        max_regions = max(1, ask.max_regions)
        region_lb: dict[str, tuple] = {}
        for r, rows in order.by_region.items():
            info = ctx.region(r)
            if info is None:
                continue
            if not ctx.perf and ctx.cap is not None and rows[0][0] > ctx.cap:
                continue  # unit asks: rows are in price order, all above the cap
            lbc = rows[0][0] * ctx.need_lo_f + info[0]
            lbt = ctx.time_for(info, order.max_egress[r])
            region_lb[r] = (lbt, lbc) if ctx.time_obj else (lbc, lbt)
        if not region_lb:
            return []
        regs = sorted(region_lb, key=lambda r: (region_lb[r], r))
        options: dict[frozenset[str], tuple] = {}
        checked = False

        def hopeless() -> bool:
            """Checked once, when a fill first fails: the max_pools largest pools of all
            regions together do not hold enough (so no fill can succeed)."""
            nonlocal checked
            if checked or options:
                return False
            checked = True
            rows = order.rows if len(region_lb) == len(order.by_region) else \
                [row for row in order.rows if row[1].region in region_lb]
            return sum(t[0] for t in self._largest(ctx, rows, max_pools)) < ctx.need - ctx.eps

        def consider(picks: list[Pick] | None) -> None:
            if picks:
                key = self._split_key(ctx, picks)
                ids = frozenset(key[3])
                if ids not in options:
                    options[ids] = key

        if max_regions > 1 and len(regs) > 1:
            consider(self._fill(ctx, order.rows, max_pools, max_regions, exact=False))
            if hopeless():
                return []
            chosen: list[str] = []
            total: float | int = 0
            for r in regs:
                if len(chosen) >= max_regions:
                    break
                chosen.append(r)
                total += self._free_value(ctx, order.by_region[r])
                if total >= ctx.need - ctx.eps:
                    break
            if len(chosen) > 1:
                consider(self._fill(ctx, order.merged(chosen), max_pools, len(chosen),
                                    exact=True))
        for r in regs:
            if len(options) >= limit:
                kth = sorted(options.values())[limit - 1]
                if region_lb[r] > (kth[0], kth[1]):
                    break
            consider(self._fill(ctx, order.by_region[r], max_pools, 1, exact=True))
            if hopeless():
                return []
        if not options and max_regions > 1 and len(regs) > 1:
            chosen_t = self._feasible_regions(ctx, order, regs, max_pools, max_regions)
            if chosen_t:
                consider(self._fill(ctx, order.merged(chosen_t), max_pools, len(chosen_t),
                                    exact=True))
        keys = list(options.values())
        if ctx.rank is not None:  # by expected cost: the fills take the cheapest units, the ranking weighs them
            keys = [self._expected_key(ctx, key) for key in keys]
        ranked = sorted(keys)[:limit]
        return [self._placement(ctx, key[4]) for key in ranked]

    def _expected_key(self, ctx: _Ctx, key: tuple) -> tuple:
        """A split option's key with its total cost replaced by its expected cost (the
        unit-weighted mean score of its pools: docs/reliability.md)."""
        m = self.reliability.multiplier(ctx.ask.failover_cost, self.reliability.mean((p[2], p[4]) for p in key[4]))
        if ctx.time_obj:
            return (key[0], key[1] * m, *key[2:])
        return (key[0] * m, *key[1:])

    def _split_key(self, ctx: _Ctx, picks: list[Pick]) -> tuple:
        f = ctx.factor
        compute = ZERO
        transfer: dict[str, Decimal] = {}
        ctime = 0.0
        stranded = 0
        for cell, price, _, free, units in picks:
            compute += price * units * f
            info = ctx.region(cell.region)
            assert info is not None
            transfer[cell.region] = info[0]
            ctime = max(ctime, ctx.cell_time(cell, info))
            stranded += free - units
        total = compute + sum(transfer.values(), ZERO)
        ids = tuple(sorted(p[2] for p in picks))
        if ctx.time_obj:
            return (ctime, total, stranded, ids, picks)
        return (total, ctime, stranded, ids, picks)

    def _free_value(self, ctx: _Ctx, rows: list[Row]) -> float | int:
        """Free units (or TFLOPS) within the price cap, excluded pools left out."""
        total: float | int = 0
        for _, cell, book in rows:
            total += self._cell_free(ctx, cell, book)[1] * ctx.value(cell)
        return total

    def _cell_free(self, ctx: _Ctx, cell: Cell, book: Book) -> tuple[int, int]:
        """(max free, total free) of the cell's pools within the price cap, excluded
        pools left out."""
        hi = ctx.hi(book)
        if ctx.exclude and touches(ctx.exclude, cell.pools):
            best = total = 0
            for level in book.levels[:hi]:
                for free, pid in level:
                    if pid not in ctx.exclude:
                        total += free
                        if free > best:
                            best = free
            return best, total
        return book.prefix(hi)

    def _fill(self, ctx: _Ctx, rows: list[Row], max_pools: int, max_regions: int, *,
              exact: bool) -> list[Pick] | None:
        """Cheapest units first over ``rows`` (cells sorted by lower-bound price), at most
        ``max_pools`` pools in at most ``max_regions`` regions.

        Cells are opened lazily (only when their lower bound comes up), so only the price
        levels units are taken from are touched. Levels of equal price per unit (of
        value) are merged across cells and taken together: the largest pools whole
        (ties: lower pool id) until the rest fits one pool, which is then chosen
        best-fit (least stranded, then pool id). If the pool budget runs out first and
        ``exact`` is set (``rows`` then span at most ``max_regions`` regions), falls
        back to ``_fill_exact``, which finds a fill whenever one exists."""
        exclude = ctx.exclude
        cap = ctx.cap
        heap: list[tuple[Decimal, int, int]] = []  # opened levels: (ppv, row, level)
        picks: list[Pick] = []
        used: set[str] = set()
        remaining = ctx.need
        eps = ctx.eps
        ptr = 0
        n_rows = len(rows)
        while True:
            while ptr < n_rows and (not heap or rows[ptr][0] <= heap[0][0]):
                _, cell, book = rows[ptr]
                if cap is not None and book.floor_price > cap:
                    if not ctx.perf:
                        ptr = n_rows  # unit asks: rows are in price order
                        break
                elif (cell.region in used or len(used) < max_regions) \
                        and ctx.region(cell.region) is not None:
                    li = book.first(0, 1)
                    if 0 <= li < ctx.hi(book):
                        heapq.heappush(heap, (ctx.ppv(cell, book.prices[li]), ptr, li))
                ptr += 1
            if not heap:
                break
            ppv = heap[0][0]
            group: list[tuple[int, int]] = []
            while heap and heap[0][0] == ppv:
                _, i, li = heapq.heappop(heap)
                if rows[i][1].region in used or len(used) < max_regions:
                    group.append((i, li))
            if not group:
                continue
            avail = []  # (-value, pool id, free, cell, price), largest first
            for i, li in group:
                _, cell, book = rows[i]
                v = ctx.value(cell)
                price = book.prices[li]
                level = book.levels[li]
                for j in range(bisect_left(level, (1,)), len(level)):
                    free, pid = level[j]
                    if pid not in exclude:
                        avail.append((-free * v, pid, free, cell, price))
            avail.sort(key=lambda a: (a[0], a[1]))
            k = 0
            while k < len(avail) and len(picks) < max_pools:
                if len(used) >= max_regions and avail[k][3].region not in used:
                    k += 1
                    continue
                if -avail[k][0] >= remaining - eps:
                    # the rest fits one pool: the one that strands the least
                    chosen = None
                    for a in avail[k:]:
                        if -a[0] < remaining - eps:
                            break
                        if len(used) >= max_regions and a[3].region not in used:
                            continue
                        units = ctx.units_left(a[3], remaining)
                        key = (a[2] - units, a[1])
                        if chosen is None or key < chosen[0]:
                            chosen = (key, a, units)
                    assert chosen is not None
                    _, a, units = chosen
                    picks.append((a[3], a[4], a[1], a[2], units))
                    return picks
                _, pid, free, cell, price = avail[k]
                k += 1
                picks.append((cell, price, pid, free, free))
                used.add(cell.region)
                remaining -= free * ctx.value(cell)
                if remaining <= eps:
                    return picks
            if len(picks) >= max_pools:
                break
            for i, li in group:
                _, cell, book = rows[i]
                nli = book.first(li + 1, 1)
                if 0 <= nli < ctx.hi(book):
                    heapq.heappush(heap, (ctx.ppv(cell, book.prices[nli]), i, nli))
        if exact and len(picks) >= max_pools:
            return self._fill_exact(ctx, rows, max_pools)
        return None

    def _largest(self, ctx: _Ctx, rows: list[Row], count: int, *,
                 capacity: bool = False) -> list[tuple]:
        """The ``count`` largest pools of ``rows`` within the price cap, by value (free
        or, with ``capacity``, capacity; times TFLOPS for performance asks), largest
        first, as (value, pool id, units, cell, price). Excluded pools are left out
        unless ``capacity``. Cells are visited in order of their largest pool and the
        walk stops once no further cell can place a pool in the top ``count``."""
        if ctx.cap is not None:  # bounds within the price cap: O(log L) per cell
            bounds = []
            for i, (_, cell, book) in enumerate(rows):
                hi = ctx.hi(book)
                ub = book.capacity_prefix(hi)[0] if capacity else book.prefix(hi)[0]
                if ub > 0:
                    bounds.append((-ub * ctx.value(cell), i))
        elif capacity:
            bounds = [(-book.cap_max[-1] * ctx.value(cell), i)
                      for i, (_, cell, book) in enumerate(rows) if book.cap_max[-1] > 0]
        elif ctx.perf:
            metric = ctx.metric
            bounds = [(-book.mx[1] * cell.tflops(metric), i)
                      for i, (_, cell, book) in enumerate(rows) if book.mx[1] > 0]
        else:
            bounds = [(-book.mx[1], i) for i, (_, _, book) in enumerate(rows) if book.mx[1] > 0]
        heapq.heapify(bounds)
        best: list[tuple] = []  # min-heap of (value, pool id, units, cell, book)
        while bounds:
            neg_ub, i = heapq.heappop(bounds)
            if len(best) >= count and -neg_ub <= best[0][0]:
                break  # ties: any pool of equal value will do (callers use the values)
            _, cell, book = rows[i]
            v = ctx.value(cell)
            it = book.iter_capacity(ctx.cap) if capacity else book.iter_largest(ctx.cap, ctx.exclude)
            for units, pid in it:
                item = (units * v, pid, units, cell, book)
                if len(best) < count:
                    heapq.heappush(best, item)
                elif item[0] > best[0][0]:
                    heapq.heapreplace(best, item)
                else:
                    break
        best.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return [(val, pid, units, cell, book.price(pid)) for val, pid, units, cell, book in best]

    def _fill_exact(self, ctx: _Ctx, rows: list[Row], max_pools: int) -> list[Pick] | None:
        """Feasibility-preserving greedy: repeatedly take the cheapest pool after which
        the largest remaining pools can still cover the rest.

        With ``k`` pools left to take, ``R`` still needed and ``S`` the sum of the
        ``k - 1`` largest unused pools, a pool qualifies iff its value >= ``R - S`` (if
        ``sum of the k largest >= R`` held before, which holds by induction). So each
        step is one "cheapest pool with at least t free" query per cell: O(log L)."""
        exclude = ctx.exclude
        top = self._largest(ctx, rows, 2 * max_pools + 1)
        need, eps = ctx.need, ctx.eps
        if sum(t[0] for t in top[:max_pools]) < need - eps:
            return None
        picks: list[Pick] = []
        used: set[str] = set()
        remaining = need
        while remaining > eps:
            slots = max_pools - len(picks)
            if slots <= 0:
                return None
            others = [t[0] for t in top if t[1] not in used][:slots - 1]
            threshold = remaining - sum(others)
            group: list[tuple] = []  # pools of the cheapest qualifying price per value
            best_ppv: Decimal | None = None
            for ppv_lb, cell, book in rows:
                if best_ppv is not None and ppv_lb > best_ppv:
                    break
                if ctx.region(cell.region) is None:
                    continue
                v = ctx.value(cell)
                need_free = max(1, math.ceil((threshold - eps) / v)) if ctx.perf \
                    else max(1, threshold)
                hi = ctx.hi(book)
                li = book.first(0, need_free)
                while 0 <= li < hi:
                    price = book.prices[li]
                    ppv = ctx.ppv(cell, price)
                    if best_ppv is not None and ppv > best_ppv:
                        break
                    level = book.levels[li]
                    found = [(free * v, pid, free, cell, price)
                             for free, pid in level[bisect_left(level, (need_free,)):]
                             if pid not in exclude and pid not in used]
                    if found:
                        if best_ppv is None or ppv < best_ppv:
                            best_ppv = ppv
                            group = found
                        else:
                            group.extend(found)
                        break
                    li = book.first(li + 1, need_free)
            if not group:
                return None
            covering = [g for g in group if g[0] >= remaining - eps]
            if covering:
                units_of = {g[1]: ctx.units_left(g[3], remaining) for g in covering}
                g = min(covering, key=lambda g: (g[2] - units_of[g[1]], g[1]))
                picks.append((g[3], g[4], g[1], g[2], units_of[g[1]]))
                return picks
            g = min(group, key=lambda g: (-g[0], g[1]))
            picks.append((g[3], g[4], g[1], g[2], g[2]))
            used.add(g[1])
            remaining -= g[0]
        return picks

    def _feasible_regions(self, ctx: _Ctx, order: _Order, regs: list[str], max_pools: int,
                          max_regions: int) -> tuple[str, ...] | None:
        """Some set of at most ``max_regions`` regions whose ``max_pools`` largest pools
        can cover the ask, or None. Only when the greedy fills found nothing."""
        tops = {r: [t[0] for t in self._largest(ctx, order.by_region[r], max_pools)]
                for r in regs}
        regs = sorted(regs, key=lambda r: (-sum(tops[r]), r))
        k = min(max_regions, len(regs))
        need = ctx.need - ctx.eps
        for budget, combo in enumerate(combinations(regs, k)):
            if budget >= _SUBSET_BUDGET:
                break
            if sum(heapq.nlargest(max_pools, chain.from_iterable(tops[r] for r in combo))) >= need:
                return combo
        return None

    # --- building the answer ----------------------------------------------------------
    def _placement(self, ctx: _Ctx, picks: list[Pick]) -> Placement:
        f = ctx.factor
        allocations = []
        compute = ZERO
        price_units = ZERO
        units = 0
        tflops = 0.0
        stranded = 0
        transfer: dict[str, Decimal] = {}
        ctime = 0.0
        for cell, price, pid, free, u in picks:
            pool = cell.pools[pid]
            allocations.append(Allocation(
                pool_id=pid, region=cell.region, provider=pool.provider, model=cell.model,
                units=u, unit_price=price, price_basis=ctx.basis,
                availability="listed" if pool.listed else "live",
                location="unknown" if self._links.is_unlocated(cell.region) else "known"))
            compute += price * u * f
            price_units += price * u
            units += u
            tflops += u * cell.tflops(ctx.metric)
            stranded += free - u
            info = ctx.region(cell.region)
            assert info is not None
            transfer[cell.region] = info[0]
            ctime = max(ctime, ctx.cell_time(cell, info))
        transfer_cost = sum(transfer.values(), ZERO)
        return Placement(
            allocations=tuple(allocations), units=units, tflops=tflops,
            compute_cost=compute, transfer_cost=transfer_cost,
            total_cost=compute + transfer_cost, currency=ctx.currency,
            unit_hour_price=(price_units / units / ctx.hour_div).quantize(MICRO),
            transfer_s=ctime, expected_start_s=0.0, stranded_units=stranded,
            expected_cost=None if ctx.ask.failover_cost <= 0 else self._expected_cost(ctx, compute + transfer_cost, picks))

    def _expected_cost(self, ctx: _Ctx, total: Decimal, picks: list[Pick]) -> Decimal:
        score = self.reliability.mean((pid, u) for _, _, pid, _, u in picks)
        return (total * self.reliability.multiplier(ctx.ask.failover_cost, score)).quantize(MICRO)

    def annotate(self, placement: Placement) -> Placement:
        """``placement`` with its pools' scores, for whoever is shown it (quotes, the
        request view); left out of ``match`` so that ranking by price pays nothing for it."""
        of = self.reliability.of
        allocations = tuple(msgspec.structs.replace(a, reliability=of(a.pool_id)) for a in placement.allocations)
        mean = self.reliability.mean((a.pool_id, a.units) for a in allocations)
        return msgspec.structs.replace(placement, allocations=allocations, reliability=round(mean, 6))

    # --- reasons ------------------------------------------------------------------------
    def _explain(self, ctx: _Ctx) -> tuple[list[str], bool]:
        """Why nothing fits: the first constraint (in a fixed order) that empties the
        candidate set, with context; and ``never``: whether even registered capacity,
        ignoring leases and exclusions, could not fit. Failure path: may touch pools."""
        ask = ctx.ask
        if self._live is None:
            self._live = frozenset(c.id for c in self._cells if c.pools)
        live = self._live
        if not live:
            return ["no pools are online"], True
        s = live
        scope = ""
        words = {
            "vendors": "is from vendors", "stacks": "runs stacks",
            "frameworks": "supports all of frameworks", "interconnects": "has interconnects",
            "host_archs": "has host arch",
        }
        notes: list[str] = []
        for name, dkey, compute in self._dim_list(ask, ctx.perf):
            nxt = s & self._dim(dkey, compute)
            if nxt:
                if name == "models":
                    scope += f" of models {_few(ask.models)}"
                elif name == "regions":
                    scope += f" in allowed regions {_few(ask.regions)}"
                elif name == "countries":
                    scope += f" in countries {_few(ask.countries)}"
                elif name == "located" and (gone := s - nxt):
                    notes.append(self._unlocated_note(ask, [self._cells[i] for i in gone]) + " (not considered)")
                elif name == "currency":
                    others = Counter()
                    for i in s - nxt:
                        others[self._cells[i].currency] += len(self._cells[i].pools)
                    if others:
                        notes.append(self._currency_note(others, ask.currency) + " (not considered)")
                s = nxt
                continue
            cells = [self._cells[i] for i in s]
            if name == "models":
                msg = f"no pool of models {_few(ask.models)} is registered"
            elif name == "regions":
                msg = (f"no pool{scope} is in allowed regions {_few(ask.regions)} "
                       f"(they are in {_few(c.region for c in cells)})")
            elif name == "located":
                msg = self._unlocated_note(ask, cells)
            elif name == "countries":
                msg = (f"no pool{scope} is in countries {_few(ask.countries)} "
                       f"(they are in {_few(c.country for c in cells)})")
            elif name in words:
                values = getattr(ask, name)
                have = {"vendors": lambda c: [c.vendor], "stacks": lambda c: [c.stack],
                        "frameworks": lambda c: list(c.frameworks),
                        "interconnects": lambda c: [c.interconnect],
                        "host_archs": lambda c: [c.host_arch]}[name]
                msg = (f"no pool{scope} {words[name]} {_few(values)} "
                       f"(available: {_few(x for c in cells for x in have(c))})")
            elif name == "memory":
                largest = max(c.memory_gib for c in cells)
                msg = (f"no pool{scope} has ≥ {_fmt_num(ask.min_memory_gib)} GB per unit "
                       f"(largest: {_fmt_num(largest)} GB)")
            elif name == "metric":
                msg = f"no pool{scope} has a {ask.metric} TFLOPS figure to deliver {ask.metric} performance"
            elif name == "delivery":
                kinds = {k for c in cells for k in c.delivery}
                can = f"; they deliver {_few(kinds)}" if kinds else "; they are capacity only"
                msg = f"no pool{scope} delivers {DELIVERED.get(str(ask.delivery), ask.delivery)}{can}"
            elif name == "whole":
                most = max(p.max_milli for c in cells for p in c.pools.values())
                msg = (f"no pool{scope} sells whole devices: they sell slices only (a share of at most "
                       f"{most} milli: ask for a share)")
            elif name == "latency":
                assert ask.users_region is not None
                lat, region = min((self._latency(ask.users_region, c.region), c.region)
                                  for c in cells)
                near = (f" (nearest: {region} at {_fmt_num(lat)} ms)" if lat < _INF else "")
                msg = (f"no pool{scope} within {_fmt_num(ask.max_latency_ms or 0)} ms of "
                       f"users in {ask.users_region}{near}")
            else:  # currency
                others = Counter()
                for c in cells:
                    others[c.currency] += len(c.pools)
                msg = self._currency_note(others, ask.currency)
            return [msg] + notes, True
        cells = sorted((self._cells[i] for i in s), key=lambda c: c.id)
        reached = [c for c in cells if ctx.region(c.region) is not None]
        if not reached:
            return [f"no pool{scope} can receive data from {ctx.data_region}: no network link "
                    f"priced in {ask.currency} to {_few(c.region for c in cells)}"] + notes, True
        billing = ctx.billing
        offering = [(c, c.books[billing]) for c in reached if billing in c.books]
        if not offering:
            offered = {b for c in reached for b in c.books}
            return [f"no pool{scope} offers {billing} (they offer {_few(offered)})"] + notes, True
        if ctx.cap is not None:
            cheapest = min(book.prices[0] for _, book in offering)
            if cheapest > ctx.cap:
                return [f"cheapest match costs {_fmt_money(cheapest / ctx.hour_div)}/unit-hour, "
                        f"above your max {_fmt_money(ask.max_price)}"] + notes, True  # type: ignore[arg-type]
            offering = [(c, b) for c, b in offering if b.prices[0] <= ctx.cap]
        if ask.min_reliability is not None and ctx.exclude is not ask.exclude_pools:
            scored = [self.reliability.of(pid) for c, book in offering for level in book.levels[:ctx.hi(book)]
                      for _, pid in level]
            low = [x for x in scored if x < ask.min_reliability]
            if scored and len(low) == len(scored):
                return [f"all {len(scored)} matching pools are scored below min_reliability "
                        f"{ask.min_reliability:g} (best: {max(low):.3f}; a pool without a record scores "
                        f"{PRIOR_SCORE:g})"] + notes, True
            if low:
                notes.append(f"{len(low)} matching pools scored below min_reliability "
                             f"{ask.min_reliability:g} (not considered)")
        if ask.exclude_pools:
            count = excluded = 0
            for c, book in offering:
                hi = ctx.hi(book)
                count += sum(len(level) for level in book.levels[:hi])
                excluded += sum(1 for level in book.levels[:hi] for _, pid in level
                                if pid in ask.exclude_pools)
            if count and count == excluded:
                _, never = self._explain_capacity(ctx, offering)
                return [f"all {count} matching pools are excluded (just taken by another "
                        "broker)"] + notes, never
        reasons, never = self._explain_capacity(ctx, offering)
        return reasons + notes, never

    @staticmethod
    def _unlocated_note(ask: Ask, cells: list[Cell]) -> str:
        pools = sorted(pid for c in cells for pid in c.pools)
        which = f"pool {pools[0]}" if len(pools) == 1 else f"{len(pools)} pools {_few(pools, 3)}"
        return (f"location of {which} unknown (region {_few(c.region for c in cells)}): "
                f"cannot check {', '.join(_location_checks(ask))}")

    @staticmethod
    def _currency_note(others: Counter, currency: str) -> str:
        parts = [f"{n} pool{'s' if n != 1 else ''} {'are' if n != 1 else 'is'} priced in {cur}"
                 if i == 0 else f"{n} in {cur}"
                 for i, (cur, n) in enumerate(sorted(others.items(), key=lambda kv: (-kv[1], kv[0])))]
        return ", ".join(parts) + f", not {currency}"

    def _qty(self, ctx: _Ctx, x: float | int, what: str = "") -> str:
        if ctx.perf:
            return f"{_fmt_num(x)} TFLOPS {ctx.metric}"
        return f"{_fmt_num(x)}{what}"

    def _explain_capacity(self, ctx: _Ctx, offering: list[tuple[Cell, Book]]) -> tuple[list[str], bool]:
        ask = ctx.ask
        need = ctx.need
        eps = ctx.eps
        exclude = ctx.exclude
        plain = ctx.cap is None
        total_free = total_cap = 0
        largest_free = largest_cap = 0
        ever = False  # gang: some pool is big enough when idle
        for cell, book in offering:
            if plain and not (exclude and touches(exclude, cell.pools)):
                mf, tf, mc, tc = book.mx[1], book.total, book.cap_max[-1], book.cap_sum[-1]
            else:
                mf, tf = self._cell_free(ctx, cell, book)
                mc, tc = book.capacity_prefix(ctx.hi(book))
            if ctx.perf:
                v = cell.tflops(ctx.metric)
                mf, tf, mc, tc = mf * v, tf * v, mc * v, tc * v
            total_free += tf
            total_cap += tc
            if mf > largest_free:
                largest_free = mf
            if mc > largest_cap:
                largest_cap = mc
            if ask.gang and not ever:
                ever = book.capacity_prefix(ctx.hi(book))[0] >= ctx.units(cell)
        fits_split_now = total_free >= need - eps
        if ask.gang:
            what = f"can deliver {self._qty(ctx, need)}" if ctx.perf else f"has {need} free units"
            if not ever:
                hint = "; try shape split" if total_cap >= need - eps else ""
                if ctx.perf:
                    return [f"no single pool can deliver {self._qty(ctx, need)} even when idle "
                            f"(largest: {self._qty(ctx, largest_cap)}){hint}"], True
                return [f"no single pool has {need} units even when idle "
                        f"(largest: {largest_cap} units){hint}"], True
            hint = "; try shape split" if fits_split_now else ""
            return [f"no single pool {what} (largest free: "
                    f"{self._qty(ctx, largest_free)}){hint}"], False
        max_pools = max(1, ask.max_pools)
        max_regions = max(1, ask.max_regions)
        noun = "free capacity" if ctx.perf else "free units"
        if not fits_split_now:
            reason = (f"not enough {noun}: {self._qty(ctx, total_free)} of "
                      f"{self._qty(ctx, need)} free across matching pools")
        else:
            reason = self._split_limit_reason(ctx, offering, max_pools, max_regions,
                                              use_cap=False)
            reason = reason or (f"no combination of at most {max_pools} pools in at most "
                                f"{max_regions} regions was found for {self._qty(ctx, need)}")
        # never: necessary conditions on registered capacity (exclusions ignored)
        if total_cap < need - eps:
            return [reason, f"not enough capacity even when idle: {self._qty(ctx, total_cap)} "
                    f"of {self._qty(ctx, need)} registered across matching pools"], True
        cap_reason = self._split_limit_reason(ctx, offering, max_pools, max_regions,
                                              use_cap=True)
        if cap_reason:
            return [reason, cap_reason + " even when idle"], True
        return [reason], False

    def _split_limit_reason(self, ctx: _Ctx, offering: list[tuple[Cell, Book]],
                            max_pools: int, max_regions: int, *, use_cap: bool) -> str | None:
        need = ctx.need - ctx.eps
        rows: list[Row] = [(ZERO, cell, book) for cell, book in offering]
        what = "capacity" if use_cap else "free"
        top = sum(t[0] for t in self._largest(ctx, rows, max_pools, capacity=use_cap))
        if top < need:
            return (f"{self._qty(ctx, ctx.need, ' units')} need more than max_pools={max_pools} "
                    f"pool{'s' if max_pools != 1 else ''} (the {max_pools} largest hold "
                    f"{self._qty(ctx, top)} {what})")
        by_region: dict[str, list[Row]] = {}
        for row in rows:
            by_region.setdefault(row[1].region, []).append(row)
        if len(by_region) <= max_regions:
            return None
        tops = [sum(t[0] for t in self._largest(ctx, rs, max_pools, capacity=use_cap))
                for rs in by_region.values()]
        best = sum(sorted(tops, reverse=True)[:max_regions])
        if best < need:
            return (f"{self._qty(ctx, ctx.need, ' units')} do not fit in max_regions={max_regions} "
                    f"region{'s' if max_regions != 1 else ''} (the best {max_regions} hold "
                    f"{self._qty(ctx, best)} {what} in {max_pools} pools)")
        return None
