"""Ranking and pruning by reliability in the pure engine (docs/reliability.md)."""

from __future__ import annotations

from decimal import Decimal as D

from hypothesis import given, settings
from hypothesis import strategies as st

from services.broker.domain.requests import FAILOVER_COST_FACTOR
from services.broker.matching import Ask

from .test_engine import A100, ASCEND, H100, engine, first, ids, pool, reason

F = FAILOVER_COST_FACTOR
DELIVERS = dict(failover_cost=F)  # what the broker asks for a request with a workload


def test_equal_prices_go_to_the_more_reliable_pool() -> None:
    e = engine(pool("shaky", "us-east", "2.00"), pool("steady", "us-east", "2.00"), pool("new", "us-east", "2.00"))
    e.set_reliability({"shaky": 0.5, "steady": 0.97})
    d = e.match(Ask(units=8, **DELIVERS))
    assert ids(d) == [["steady"], ["new"], ["shaky"]]  # a newcomer (0.9) between the two
    assert [e.annotate(o).allocations[0].reliability for o in d.options] == [0.97, 0.9, 0.5]
    assert d.options[0].expected_cost == D("16.00") * (1 + (1 - D("0.97")) * D(repr(F)))
    assert d.options[0].total_cost == D("16.00")  # the price is the price


def test_a_cheaper_pool_wins_only_by_more_than_its_expected_failover() -> None:
    # shaky at 0.5 costs 1 + 0.5 F per unit of price, steady at 0.97 costs 1 + 0.03 F
    e = engine(pool("shaky", "us-east", "1.60"), pool("steady", "us-east", "2.00"))
    e.set_reliability({"shaky": 0.5, "steady": 0.97})
    assert first(e.match(Ask(units=8, **DELIVERS))) == "steady"
    cheap = engine(pool("shaky", "us-east", "1.00"), pool("steady", "us-east", "2.00"))
    cheap.set_reliability({"shaky": 0.5, "steady": 0.97})
    assert first(cheap.match(Ask(units=8, **DELIVERS))) == "shaky"


def test_a_pool_registered_after_the_scores_keeps_its_score() -> None:
    """Scores arrive every few seconds; a pool (re-)registered in between moves into a cell
    whose bound must then allow for it."""
    e = engine(pool("a", "us-east", "2.00"))
    e.set_reliability({"a": 0.9, "late": 0.99})
    e.upsert(pool("late", "us-east", "2.05", model=A100))  # another cell: another model
    d = e.match(Ask(units=8, **DELIVERS), limit=1)
    assert ids(d) == [["late"]]  # 2.05 x 1.01 < 2.00 x 1.1


def test_capacity_only_asks_rank_by_price_alone() -> None:
    e = engine(pool("shaky", "us-east", "1.99"), pool("steady", "us-east", "2.00"))
    e.set_reliability({"shaky": 0.5, "steady": 0.97})
    d = e.match(Ask(units=8))
    assert ids(d) == [["shaky"], ["steady"]]
    assert d.options[0].expected_cost is None and e.annotate(d.options[0]).reliability == 0.5


def test_min_reliability_prunes_and_says_why() -> None:
    e = engine(pool("shaky", "us-east", "1.00"), pool("steady", "us-east", "2.00"), pool("new", "us-east", "1.50"))
    e.set_reliability({"shaky": 0.5, "steady": 0.97})
    assert ids(e.match(Ask(units=8, min_reliability=0.8))) == [["new"], ["steady"]]
    assert ids(e.match(Ask(units=8, min_reliability=0.95))) == [["steady"]]
    d = e.match(Ask(units=8, min_reliability=0.99))
    assert d.never
    assert reason(d) == ("all 3 matching pools are scored below min_reliability 0.99 (best: 0.970; "
                         "a pool without a record scores 0.9)")


def test_min_reliability_above_the_prior_needs_a_record() -> None:
    e = engine(pool("a", "us-east", "1.00"), pool("b", "us-east", "2.00"))
    assert reason(e.match(Ask(units=8, min_reliability=0.95))).startswith(
        "all 2 matching pools are scored below min_reliability 0.95 (best: 0.900")


def test_pruned_pools_are_noted_when_the_rest_is_full() -> None:
    e = engine(pool("shaky", "us-east", "1.00"), pool("steady", "us-east", "2.00", free=2, capacity=8))
    e.set_reliability({"shaky": 0.5, "steady": 0.97})
    d = e.match(Ask(units=8, min_reliability=0.9))
    assert not d.never
    assert "1 matching pools scored below min_reliability 0.9 (not considered)" in d.reasons
    assert "no single pool has 8 free units" in reason(d)


def test_split_options_rank_by_expected_cost_and_skip_pruned_pools() -> None:
    pools = [pool("a", "us-east", "1.00", free=4), pool("b", "us-east", "1.00", free=4),
             pool("c", "us-west", "1.00", free=4), pool("d", "us-west", "1.00", free=4)]
    e = engine(*pools)
    e.set_reliability({"a": 0.5, "b": 0.5, "c": 0.99, "d": 0.99})
    d = e.match(Ask(units=8, gang=False, max_pools=2, **DELIVERS))
    assert sorted(ids(d)[0]) == ["c", "d"] and e.annotate(d.options[0]).reliability == 0.99
    d = e.match(Ask(units=8, gang=False, max_pools=4, max_regions=2, min_reliability=0.6))
    assert sorted(ids(d)[0]) == ["c", "d"]


SCORES = st.one_of(st.none(), st.floats(0.05, 0.999).map(lambda x: round(x, 6)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(100, 300), st.integers(0, 8), SCORES, st.sampled_from([H100, A100, ASCEND]),
                          st.sampled_from(["us-east", "us-west"])), min_size=1, max_size=24),
       st.integers(1, 8), st.integers(1, 4), st.one_of(st.none(), st.floats(0.3, 0.99)), st.integers(0, 24))
def test_gang_ranking_is_the_exact_expected_cost_order(rows, units, limit, floor, late) -> None:
    """Against brute force over every pool (in several cells; some pools joining after the
    scores were set): the best ``limit`` pools by price x (1 + (1 - score) F), none of them
    scored below min_reliability."""
    pools = [pool(f"p{i:02d}", region, f"{cents / 100:.2f}", free=free, capacity=8, model=model)
             for i, (cents, free, _, model, region) in enumerate(rows)]
    scores = {f"p{i:02d}": s for i, (_, _, s, _, _) in enumerate(rows) if s is not None}
    e = engine(*pools[:late])
    e.set_reliability(scores)
    for p in pools[late:]:
        e.upsert(p)
    d = e.match(Ask(units=units, min_reliability=floor, **DELIVERS), limit=limit)

    def expected(p) -> D:
        s = scores.get(p.pool_id, 0.9)
        return p.on_demand * units * (1 + (1 - D(f"{s:.6f}")) * D(repr(F)))

    eligible = [p for p in pools if p.free >= units and (floor is None or scores.get(p.pool_id, 0.9) >= floor)]
    want = sorted(expected(p) for p in eligible)[:limit]
    got = [o.expected_cost for o in d.options]
    assert got == [w.quantize(D("0.000001")) for w in want]


REGIONS = ["us-east", "us-west", "eu-west", "cn-gz"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(100, 300), st.integers(0, 8), SCORES, st.sampled_from(REGIONS)),
                min_size=1, max_size=20), st.integers(1, 8), st.integers(1, 3), st.booleans(),
       st.sampled_from([1.0, 10.0, 100.0]))
def test_with_data_the_walk_stops_only_when_nothing_better_is_left(rows, units, limit, time_first, gb) -> None:
    """With data to move (transfer cost per region, the region-group walk), the best
    ``limit`` options are the first ``limit`` of all options ranked by expected cost."""
    pools = [pool(f"p{i:02d}", region, f"{cents / 100:.2f}", free=free, capacity=8)
             for i, (cents, free, _, region) in enumerate(rows)]
    e = engine(*pools)
    e.set_reliability({f"p{i:02d}": s for i, (_, _, s, _) in enumerate(rows) if s is not None})
    ask = Ask(units=units, data_region="us-east", data_gb=gb, objective="time" if time_first else "cost",
              **DELIVERS)
    everything = e.match(ask, limit=len(pools))
    top = e.match(ask, limit=limit)
    key = (lambda o: (o.transfer_s, o.expected_cost)) if time_first else (lambda o: (o.expected_cost, o.transfer_s))
    assert [key(o) for o in top.options] == sorted(key(o) for o in everything.options)[:limit]
