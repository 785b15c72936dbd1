"""Batch placement (``place_batch``): never overbooks, never dearer than one at a time in
order, and finds what one at a time cannot."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.broker.matching import Ask, Engine, place_batch

from .test_engine import engine, pool
from .test_engine_props import asks, pools

UNSERVED = Decimal(10) ** 9


def one_at_a_time(e: Engine, batch: list[Ask]) -> Decimal:
    """Cost of placing ``batch`` in order, each on its best option (unserved at UNSERVED)."""
    total = Decimal(0)
    for ask in batch:
        d = e.match(ask, limit=1)
        if not d.options:
            total += UNSERVED
            continue
        for a in d.options[0].allocations:
            e.set_free(a.pool_id, e.get(a.pool_id).free - a.units)
        total += d.options[0].total_cost
    return total


def test_batch_serves_the_request_that_one_at_a_time_strands() -> None:
    # the cheap pool is the only one in us-east; the flexible request comes first
    world = [pool("cheap-east", "us-east", "2.00"), pool("dear-west", "us-west", "3.00")]
    flexible = Ask(units=8, hours=Decimal(1))
    pinned = Ask(units=8, hours=Decimal(72), regions=frozenset({"us-east"}))
    assert one_at_a_time(engine(*world), [flexible, pinned]) >= UNSERVED  # pinned left out
    result = place_batch(engine(*world), [flexible, pinned], unserved_cost=UNSERVED, time_budget_s=0.5)
    assert result.unserved == 0
    flex, pin = result.placements
    assert [a.pool_id for a in pin.allocations] == ["cheap-east"]
    assert [a.pool_id for a in flex.allocations] == ["dear-west"]
    assert result.cost == Decimal("2.00") * 8 * 72 + Decimal("3.00") * 8


def test_batch_puts_long_jobs_on_cheap_capacity() -> None:
    world = [pool("cheap", "us-east", "1.00"), pool("dear", "us-east", "2.00")]
    short, long_ = Ask(units=8, hours=Decimal(1)), Ask(units=8, hours=Decimal(100))
    result = place_batch(engine(*world), [short, long_], unserved_cost=UNSERVED, time_budget_s=0.5)
    assert [a.pool_id for a in result.placements[1].allocations] == ["cheap"]
    assert result.cost == Decimal(8 * 100 + 2 * 8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_batch_never_overbooks_and_never_costs_more_than_in_order(data: st.DataObject) -> None:
    world = data.draw(pools(n_max=10))
    ids = [p.pool_id for p in world]
    batch = [msgspec.structs.replace(a, objective="cost")
             for a in data.draw(st.lists(asks(ids), min_size=1, max_size=6))]
    free0 = {p.pool_id: p.free for p in world}
    e = engine(*[msgspec.structs.replace(p) for p in world])  # the engine changes free units in place
    result = place_batch(e, batch, unserved_cost=UNSERVED, time_budget_s=0.05)
    used: Counter[str] = Counter()
    for ask, placement in zip(batch, result.placements, strict=True):
        if placement is None:
            continue
        assert placement.units >= (ask.units or 1)
        for a in placement.allocations:
            used[a.pool_id] += a.units
            assert a.pool_id not in ask.exclude_pools
    for pid, units in used.items():
        assert units <= free0[pid], f"{pid}: {units} placed on {free0[pid]} free"
        assert e.get(pid).free == free0[pid] - units  # the engine's books say the same
    for pid in set(free0) - set(used):
        assert e.get(pid).free == free0[pid]
    batch_cost = result.cost + UNSERVED * result.unserved
    in_order = one_at_a_time(engine(*[msgspec.structs.replace(p) for p in world]), batch)
    assert batch_cost <= in_order


def test_queue_plan_serves_the_queue_in_order_and_places_jointly() -> None:
    from services.broker.matching.batch import plan_queue

    e = engine(pool("cheap-east", "us-east", "2.00"), pool("dear-west", "us-west", "3.00"))
    flexible = Ask(units=8, hours=Decimal(1))
    pinned = Ask(units=8, hours=Decimal(72), regions=frozenset({"us-east"}))
    plan = plan_queue(e, [flexible, pinned])
    assert {i: [a.pool_id for a in p.allocations] for i, p in plan.items()} == {0: ["dear-west"],
                                                                                 1: ["cheap-east"]}
    assert e.free_units() == {"cheap-east": 8, "dear-west": 8}  # planning reserved nothing


def test_queue_plan_never_serves_others_instead_of_the_head(monkeypatch) -> None:
    from services.broker.matching import batch as batch_module

    e = engine(pool("only", "us-east", "2.00"))
    head, later = Ask(units=8, hours=Decimal(72)), Ask(units=8, hours=Decimal(1))
    later_there = e.match(later, limit=1).options[0]

    def skips_the_head(engine_, asks_, **kw):  # a joint plan that would serve "later" instead
        return batch_module.BatchResult(placements=[None, later_there], cost=later_there.total_cost,
                                        unserved=1, decisions=0, moves=0)

    monkeypatch.setattr(batch_module, "place_batch", skips_the_head)
    assert batch_module.plan_queue(e, [head, later]) == {}  # so the queue goes one at a time, head first
    assert e.free_units() == {"only": 8}


def test_a_queue_of_fewer_than_two_is_not_planned_and_no_pool_is_touched(monkeypatch) -> None:
    """A pass over an empty queue runs every second: it must not snapshot and restore
    every pool's free units (at 100,000 pools that was milliseconds a pass)."""
    from services.broker.matching.batch import plan_queue

    e = engine(pool("cheap-east", "us-east", "2.00"), pool("dear-west", "us-west", "3.00"))
    touched: list[str] = []
    monkeypatch.setattr(e, "free_units", lambda: touched.append("free_units") or {})
    monkeypatch.setattr(e, "set_free", lambda pool_id, free: touched.append(pool_id))
    assert plan_queue(e, []) == {}
    assert plan_queue(e, [Ask(units=8, hours=Decimal(1))]) == {}
    assert touched == []
