"""Pool scores as the engine ranks and prunes with them (docs/reliability.md).

The broker refreshes the map from the reliability record every few seconds
(``World.refresh_reliability``); the engine never reads Redis. A pool without a record
scores the prior. Ranking by expected cost multiplies a placement's cost by
``1 + (1 - score) x factor``: a constant when every candidate has the same score, so the
price order (and the engine's fast path) stands until some pool has a record.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from decimal import Decimal

from services.common.reliability import PRIOR_SCORE

ONE = Decimal(1)


def _dec(score: float) -> Decimal:
    return Decimal(f"{score:.6f}")  # the record keeps six decimals: short Decimals multiply fast


class Pruned:
    """Pools left out of one match: the ask's own exclusions and the pools scored below
    its ``min_reliability``. Supports what the engine asks of an exclusion set."""

    __slots__ = ("base", "floor", "scores")

    def __init__(self, base: frozenset[str], scores: Mapping[str, float], floor: float) -> None:
        self.base, self.scores, self.floor = base, scores, floor

    def __contains__(self, pool_id: object) -> bool:
        return pool_id in self.base or self.scores.get(pool_id, PRIOR_SCORE) < self.floor  # type: ignore[call-overload]

    def __bool__(self) -> bool:
        return True


Ranking = tuple[Decimal, Callable[[str], Decimal], Callable[[int], Decimal]]


def touches(exclude: frozenset[str] | Pruned, pools: Collection[str]) -> bool:
    """Whether any of ``pools`` is left out."""
    if type(exclude) is Pruned:
        return any(pid in exclude for pid in pools)
    return any(pid in pools for pid in exclude)


class Scores:
    def __init__(self) -> None:
        self.scores: dict[str, float] = {}
        self.top = self.low = PRIOR_SCORE  # best and worst score any pool has
        # cell id -> at least the best score of its pools (a pool that left keeps it up:
        # a bound too high costs a look, one too low would skip a better pool)
        self.cell_top: dict[int, float] = {}
        self._mult: dict[float, tuple[Decimal, dict[str, Decimal], Decimal, dict[int, Decimal]]] = {}

    def set(self, scores: Mapping[str, float], cell_of: Mapping[str, int]) -> None:
        """``cell_of``: pool id -> the id of its cell, for the pools the engine holds."""
        self.scores = dict(scores)
        values = [PRIOR_SCORE, *self.scores.values()]
        self.top, self.low = max(values), min(values)
        self.cell_top = {}
        for pool_id, score in self.scores.items():
            cell = cell_of.get(pool_id)
            if cell is not None and score > self.cell_top.get(cell, PRIOR_SCORE):
                self.cell_top[cell] = score
        self._mult.clear()

    def joined(self, pool_id: str, cell: int) -> None:
        """A pool was added to (or moved into) a cell."""
        score = self.scores.get(pool_id)
        if score is not None and score > self.cell_top.get(cell, PRIOR_SCORE):
            self.cell_top[cell] = score
            for _, _, _, cells in self._mult.values():
                cells.pop(cell, None)

    def of(self, pool_id: str) -> float:
        return self.scores.get(pool_id, PRIOR_SCORE)

    def exclusion(self, base: frozenset[str], floor: float | None) -> frozenset[str] | Pruned:
        """``base`` alone when no pool scores below ``floor``."""
        if floor is None or floor <= self.low:
            return base
        return Pruned(base, self.scores, floor)

    def ranking(self, factor: float) -> Ranking | None:
        """(the lowest multiplier any pool has, pool id -> its multiplier, cell id -> the
        lowest multiplier of its pools), or None when all pools score alike (the price
        order is then the expected-cost order)."""
        if factor <= 0 or not self.scores:
            return None
        hit = self._mult.get(factor)
        if hit is None:
            hit = self._mult[factor] = (self.multiplier(factor, self.top), {}, self.multiplier(factor, PRIOR_SCORE), {})
        lo, cache, prior, cells = hit
        scores, cell_top = self.scores, self.cell_top

        def cell_mult(cell: int) -> Decimal:
            m = cells.get(cell)
            if m is None:
                top = cell_top.get(cell)
                m = cells[cell] = prior if top is None else self.multiplier(factor, top)
            return m

        def mult(pool_id: str) -> Decimal:
            m = cache.get(pool_id)
            if m is None:
                s = scores.get(pool_id)
                m = cache[pool_id] = prior if s is None else self.multiplier(factor, s)
            return m

        return lo, mult, cell_mult

    def mean(self, weighted: Iterable[tuple[str, int]]) -> float:
        """The unit-weighted mean score of a placement's pools: (pool id, units) pairs."""
        total = units = 0.0
        scores = self.scores
        for pool_id, n in weighted:
            total += scores.get(pool_id, PRIOR_SCORE) * n
            units += n
        return total / units if units else PRIOR_SCORE

    @staticmethod
    def multiplier(factor: float, score: float) -> Decimal:
        """What a placement scored ``score`` costs, per unit of its price: 1 + (1 - score) x factor."""
        return ONE + (ONE - _dec(score)) * _dec(factor)
