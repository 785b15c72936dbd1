"""The engine's delivery pruning: an ask carrying a workload kind is matched only on
pools that deliver it, with the reason when none does; an ask without one is matched as
before, on every pool."""

from __future__ import annotations

from services.broker.matching import Ask

from .test_engine import ASCEND, engine, first, ids, pool, reason

CAP = pool("cap", "cn-gz", "1.00", model=ASCEND)  # the cheapest, capacity only
SSH = pool("ssh", "cn-gz", "1.50", model=ASCEND, delivery=frozenset({"ssh", "process"}))
BOX = pool("box", "cn-yrd", "2.00", model=ASCEND, delivery=frozenset({"container"}))


def test_without_a_workload_every_pool_is_eligible() -> None:
    e = engine(CAP, SSH, BOX)
    assert ids(e.match(Ask(units=4))) == [["cap"], ["ssh"], ["box"]]


def test_a_workload_kind_prunes_pools_that_do_not_deliver_it() -> None:
    e = engine(CAP, SSH, BOX)
    assert ids(e.match(Ask(units=4, delivery="ssh"))) == [["ssh"]]
    assert ids(e.match(Ask(units=4, delivery="process"))) == [["ssh"]]
    assert ids(e.match(Ask(units=4, delivery="container"))) == [["box"]]
    # a split is made of delivering pools only: 10 units fit on cap + ssh, not on ssh alone
    assert sorted(ids(e.match(Ask(units=10, gang=False, max_pools=4)))[0]) == ["cap", "ssh"]
    d = e.match(Ask(units=10, delivery="ssh", gang=False, max_pools=4))
    assert not d.placed and "not enough" in reason(d)


def test_the_reason_names_the_kind_and_the_scope() -> None:
    e = engine(CAP, SSH, BOX)
    d = e.match(Ask(units=1, delivery="container", regions=frozenset({"cn-gz"})))
    assert d.never
    assert reason(d) == "no pool in allowed regions ['cn-gz'] delivers containers; they deliver ['process', 'ssh']"
    d = engine(CAP).match(Ask(units=1, delivery="slurm"))
    assert reason(d) == "no pool delivers slurm jobs; they are capacity only"


def test_delivery_is_part_of_the_cell_and_follows_updates() -> None:
    """A pool that starts delivering is found; one that stops is pruned (the cell moves)."""
    e = engine(CAP, SSH)
    assert first(e.match(Ask(units=1, delivery="ssh"))) == "ssh"
    e.upsert(pool("cap", "cn-gz", "1.00", model=ASCEND, delivery=frozenset({"ssh"})))
    assert first(e.match(Ask(units=1, delivery="ssh"))) == "cap"  # now the cheapest that delivers
    e.upsert(pool("cap", "cn-gz", "1.00", model=ASCEND))
    e.upsert(pool("ssh", "cn-gz", "1.50", model=ASCEND))
    assert not e.match(Ask(units=1, delivery="ssh")).placed
    assert first(e.match(Ask(units=1))) == "cap"
