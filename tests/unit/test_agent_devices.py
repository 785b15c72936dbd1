"""Device bookkeeping: two leases never hold one device, a release gives back exactly
what was held, and a restart rebuilds the book from the broker's record and the backend."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.agent.devices import DeviceBook, DeviceConflict

POOLS = {"pool-a": [0, 1, 2, 3, 4], "pool-b": [5, 6, 7]}


class Bookkeeping(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.book = DeviceBook(POOLS)
        self.model: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.unhealthy: set[int] = set()
        self.counter = 0

    @rule(pool=st.sampled_from(sorted(POOLS)), units=st.integers(min_value=0, max_value=6))
    def allocate(self, pool, units):
        self.counter += 1
        lease = f"lease-{self.counter}"
        free_before = self.book.free(pool)
        got = self.book.allocate(lease, pool, units)
        if got is None:
            assert units < 1 or units > len(free_before)
            assert self.book.free(pool) == free_before  # nothing taken on refusal
            assert self.book.held(lease) == ()
        else:
            assert len(got) == units and set(got) <= set(free_before)
            self.model[lease] = (pool, got)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def release(self, data):
        lease = data.draw(st.sampled_from(sorted(self.model)))
        _, held = self.model.pop(lease)
        assert self.book.release(lease) == held
        assert self.book.release(lease) == ()  # twice: a no-op

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def allocate_again_is_idempotent(self, data):
        lease = data.draw(st.sampled_from(sorted(self.model)))
        pool, held = self.model[lease]
        assert self.book.allocate(lease, pool, len(held)) == held

    @rule(indices=st.sets(st.integers(min_value=0, max_value=7), max_size=3))
    def mark_unhealthy(self, indices):
        self.unhealthy = set(indices)
        self.book.set_unhealthy(indices)

    @invariant()
    def never_two_leases_on_one_device(self):
        seen: dict[int, str] = {}
        for lease, devices in self.book.leases().items():
            for index in devices:
                assert index not in seen, f"device {index} held by {seen[index]} and {lease}"
                seen[index] = lease

    @invariant()
    def book_matches_the_model(self):
        assert self.book.leases() == {lease: devices for lease, (_, devices) in self.model.items()}
        for pool, indices in POOLS.items():
            held = {i for p, devices in self.model.values() if p == pool for i in devices}
            assert set(self.book.free(pool)) == set(indices) - held - self.unhealthy


TestBookkeeping = Bookkeeping.TestCase
TestBookkeeping.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_pools_sharing_a_device_are_refused():
    with pytest.raises(DeviceConflict, match="device 2 is in pools 'a' and 'b'"):
        DeviceBook({"a": [0, 1, 2], "b": [2, 3]})


def test_restore_after_restart_from_broker_record_and_backend():
    book = DeviceBook(POOLS)
    records = {"lease-1": [0, 1], "lease-2": [2], "lease-gone": [3]}
    gone = book.restore("pool-a", records, running=["lease-1", "lease-2", "lease-not-ours"])
    assert gone == ["lease-gone"]  # the broker thinks it lives; its work is gone: reported lost
    assert book.leases() == {"lease-1": (0, 1), "lease-2": (2,)}
    assert book.free("pool-a") == [3, 4]  # the gone lease's device is free again
    assert book.allocate("lease-3", "pool-a", 3) is None
    assert book.allocate("lease-3", "pool-a", 2) == (3, 4)


def test_restore_refuses_records_that_share_a_device_or_name_a_foreign_one():
    book = DeviceBook(POOLS)
    with pytest.raises(DeviceConflict, match="both record device 1"):
        book.restore("pool-a", {"lease-1": [0, 1], "lease-2": [1]}, running=["lease-1", "lease-2"])
    with pytest.raises(DeviceConflict, match="which pool 'pool-a' does not have"):
        DeviceBook(POOLS).restore("pool-a", {"lease-1": [6]}, running=["lease-1"])


class SharedBookkeeping(RuleBasedStateMachine):
    """Leases that name their devices (the broker's) and shares of them, mixed with
    whole-device leases the book picks: never more than 1,000 milli of a device held, a
    refused take changes nothing, a release gives back exactly what was taken."""

    def __init__(self) -> None:
        super().__init__()
        self.book = DeviceBook(POOLS)
        self.model: dict[str, tuple[tuple[int, ...], int]] = {}  # lease → (devices, milli)
        self.counter = 0

    def used(self, index: int) -> int:
        return sum(m for devices, m in self.model.values() if index in devices)

    @rule(devices=st.lists(st.integers(min_value=0, max_value=7), min_size=1, max_size=3),
          milli=st.sampled_from([1, 100, 250, 400, 500, 750, 999, 1000, 1001, 0]))
    def take(self, devices, milli):
        self.counter += 1
        lease = f"lease-{self.counter}"
        before = self.book.leases()
        why = self.book.take(lease, "pool-a", devices, milli)
        fits = (1 <= milli <= 1000 and len(set(devices)) == len(devices)
                and all(i in POOLS["pool-a"] and self.used(i) + milli <= 1000 for i in devices))
        assert (why is None) == fits, why
        if why is None:
            self.model[lease] = (tuple(devices), milli)
            assert self.book.take(lease, "pool-a", devices, milli) is None  # idempotent
        else:
            assert self.book.leases() == before and "\n" not in why

    @rule(units=st.integers(min_value=1, max_value=3))
    def allocate_whole(self, units):
        self.counter += 1
        lease = f"lease-{self.counter}"
        got = self.book.allocate(lease, "pool-a", units)
        if got is not None:
            assert all(self.used(i) == 0 for i in got)  # never a whole device with a share on it
            self.model[lease] = (got, 1000)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def release(self, data):
        lease = data.draw(st.sampled_from(sorted(self.model)))
        devices, _ = self.model.pop(lease)
        assert self.book.release(lease) == devices

    @invariant()
    def never_above_a_whole_device(self):
        for index in POOLS["pool-a"]:
            assert self.book.free_milli(index) == 1000 - self.used(index) >= 0
        assert self.book.free("pool-a") == [i for i in POOLS["pool-a"] if self.used(i) == 0]
        assert self.book.leases() == {lease: devices for lease, (devices, _) in self.model.items()}


TestSharedBookkeeping = SharedBookkeeping.TestCase
TestSharedBookkeeping.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_take_names_why_not_and_restore_keeps_shares():
    book = DeviceBook(POOLS)
    assert book.take("lease-1", "pool-a", [3], 600) is None
    assert book.take("lease-2", "pool-a", [3], 500) == "device 3 has 400 milli free here (lease-1 hold the rest); 500 leased"
    assert book.take("lease-2", "pool-a", [6], 500) == "pool 'pool-a' has no device 6"
    book.set_unhealthy([4])
    assert book.take("lease-2", "pool-a", [4], 100) == "device 4 is reported unhealthy"
    assert book.holders([3, 4]) == {"lease-1"}
    again = DeviceBook(POOLS)  # a restart: two shares of device 3 come back, a third would not fit
    again.restore("pool-a", {"lease-1": [3], "lease-2": [3]}, running=["lease-1", "lease-2"],
                  milli={"lease-1": 600, "lease-2": 400})
    assert again.free_milli(3) == 0 and 3 not in again.free("pool-a")
    with pytest.raises(DeviceConflict, match="both record device 3"):
        again.restore("pool-a", {"lease-3": [3]}, running=["lease-3"], milli={"lease-3": 100})
